//! A scripted API server on loopback: answers each request from a script,
//! in order, and records what was asked (and each body), so a test can
//! assert the exact request sequence and how answers (including RBAC
//! refusals) become devloop's errors.
#![allow(dead_code)]

use super::fake_kube;
use devloop::endpoint::kubernetes::Cluster;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// One scripted answer: the request it expects (method and path with
/// query) and what it returns.
pub struct Step {
    pub request: &'static str,
    pub status: u16,
    pub body: String,
}

/// Serves the script in order; records every request line it received.
/// A request that does not match the next step gets a 500 and is recorded,
/// so the test's assertion on the sequence shows what went wrong.
pub async fn scripted_server(script: Vec<Step>) -> (String, Arc<Mutex<Vec<String>>>) {
    let (url, seen, _) = scripted_server_with_bodies(script).await;
    (url, seen)
}

/// The same, also recording each request's body.
pub async fn scripted_server_with_bodies(
    script: Vec<Step>,
) -> (String, Arc<Mutex<Vec<String>>>, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let body_log = bodies.clone();
    let script = Arc::new(Mutex::new(script.into_iter().collect::<std::collections::VecDeque<_>>()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let (script, log, body_log) = (script.clone(), log.clone(), body_log.clone());
            tokio::spawn(async move {
                let (r, mut w) = sock.into_split();
                let mut r = BufReader::new(r);
                while let Some(req) = fake_kube::read_request(&mut r).await {
                    let request = format!("{} {}", req.method, req.path);
                    log.lock().unwrap().push(request.clone());
                    body_log.lock().unwrap().push(String::from_utf8_lossy(&req.body).into_owned());
                    let step = script.lock().unwrap().pop_front();
                    let (status, body) = match step {
                        Some(s) if s.request == request => (s.status, s.body),
                        Some(s) => (500, format!("{{\"expected\":\"{}\"}}", s.request)),
                        None => (500, "{\"expected\":\"nothing\"}".into()),
                    };
                    let resp = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if w.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, seen, bodies)
}

pub async fn cluster(url: &str) -> Cluster {
    let config = kube::Config::new(url.parse().unwrap());
    Cluster { client: kube::Client::try_from(config).unwrap(), namespace: "dev".into() }
}

pub fn status(code: u16, reason: &str, message: &str) -> String {
    serde_json::json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "code": code, "reason": reason, "message": message})
        .to_string()
}
