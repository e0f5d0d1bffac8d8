//! A loopback stand-in for an API server and its kubelet, for testing the
//! Kubernetes target's request sequence without a cluster.
//!
//! It knows the pods of namespace `dev` (at first one, `web`; the test can
//! replace them, as a rollout does), each with a container `main`, and
//! serves what devloop asks of them: a pod, the list, a log (held open,
//! empty), exec and port-forward over WebSocket (`v4.channel.k8s.io`).
//! Exec runs the command on this machine, with the pod's paths (`/tmp/...`,
//! the sync root) moved under the pod's own directory (`<root>/<pod>`);
//! port-forward connects to the port on loopback. So
//! the real agent is uploaded, verified, started and reached exactly as in
//! a pod, and the test can see every request, count the bytes that went up,
//! and cut every port-forward to see devloop recover.

use futures_util::{SinkExt, StreamExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

pub struct FakeKube {
    pub url: String,
    /// Every request: method and path, with exec commands decoded
    /// (`EXEC sh -c ...`) and port-forwards as `PORTFORWARD <port>`.
    pub log: Arc<Mutex<Vec<String>>>,
    /// Bytes received on exec stdin streams.
    pub stdin_bytes: Arc<AtomicU64>,
    /// The pods' filesystems: `/tmp/x` in pod P is `<root>/P/tmp/x` here.
    pub root: PathBuf,
    pods: Arc<Mutex<Vec<String>>>,
    cut: broadcast::Sender<()>,
}

impl FakeKube {
    /// Serves on loopback until the runtime ends. `pod_root` is the
    /// temporary directory that stands for the pod's filesystem.
    pub async fn start(pod_root: &Path) -> FakeKube {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let fake = FakeKube {
            url,
            log: Arc::default(),
            stdin_bytes: Arc::default(),
            root: pod_root.to_path_buf(),
            pods: Arc::default(),
            cut: broadcast::channel(4).0,
        };
        fake.set_pods(&["web"]);
        let ctx = Ctx {
            log: fake.log.clone(),
            stdin: fake.stdin_bytes.clone(),
            root: fake.root.clone(),
            pods: fake.pods.clone(),
            cut: fake.cut.clone(),
        };
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let _ = sock.set_nodelay(true);
                tokio::spawn(serve(sock, ctx.clone()));
            }
        });
        fake
    }

    /// A kubeconfig file naming this server, namespace `dev`.
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("fake.kubeconfig");
        let doc = serde_json::json!({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "u", "user": {}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "u", "namespace": "dev"}}],
            "current-context": "fake"
        });
        std::fs::write(&path, doc.to_string()).unwrap();
        path
    }

    /// The pods there are from now on (each with its own filesystem).
    pub fn set_pods(&self, names: &[&str]) {
        for n in names {
            std::fs::create_dir_all(self.root.join(n).join("tmp")).unwrap();
        }
        *self.pods.lock().unwrap() = names.iter().map(|n| n.to_string()).collect();
    }

    /// Where pod `pod` keeps `path`.
    pub fn file(&self, pod: &str, path: &str) -> PathBuf {
        self.root.join(pod).join(path.trim_start_matches('/'))
    }

    /// Cuts every open port-forward, as a flaky API server or load balancer
    /// does; exec streams stay.
    pub fn cut_port_forwards(&self) {
        let _ = self.cut.send(());
    }

    /// The requests so far, without log-stream polls.
    pub fn requests(&self) -> Vec<String> {
        self.log.lock().unwrap().iter().filter(|r| !r.contains("/log?")).cloned().collect()
    }
}

#[derive(Clone)]
struct Ctx {
    log: Arc<Mutex<Vec<String>>>,
    stdin: Arc<AtomicU64>,
    root: PathBuf,
    pods: Arc<Mutex<Vec<String>>>,
    cut: broadcast::Sender<()>,
}

fn pod_json(name: &str) -> String {
    serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "dev", "labels": {"app": "web"}},
        "spec": {"containers": [{"name": "main", "image": "x"}]},
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
    })
    .to_string()
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap_or(b'?'));
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The query's values for `key`, in order.
fn query(path: &str, key: &str) -> Vec<String> {
    let q = path.split_once('?').map(|(_, q)| q).unwrap_or("");
    q.split('&').filter_map(|kv| kv.split_once('=')).filter(|(k, _)| *k == key).map(|(_, v)| decode(v)).collect()
}

/// One HTTP/1.1 request as a test server sees it.
pub struct Request {
    pub method: String,
    pub path: String,
    /// Names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone())
    }
}

/// Reads the next request on a connection; None when it closes.
pub async fn read_request<R: tokio::io::AsyncBufRead + Unpin>(io: &mut R) -> Option<Request> {
    let mut line = String::new();
    if io.read_line(&mut line).await.unwrap_or(0) == 0 {
        return None;
    }
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if io.read_line(&mut h).await.unwrap_or(0) == 0 {
            return None;
        }
        if h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
    let mut req = Request { method, path, headers, body: Vec::new() };
    let len: usize = req.header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    req.body = vec![0u8; len];
    io.read_exact(&mut req.body).await.ok()?;
    Some(req)
}

async fn serve(sock: TcpStream, ctx: Ctx) {
    let mut io = BufReader::new(sock);
    while let Some(req) = read_request(&mut io).await {
        let header = |k: &str| req.header(k);
        let (method, path) = (req.method.clone(), req.path.clone());
        let base = path.split('?').next().unwrap_or("").to_string();

        if header("upgrade").is_some_and(|u| u.eq_ignore_ascii_case("websocket")) {
            let key = header("sec-websocket-key").unwrap_or_default();
            let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
            let resp = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: v4.channel.k8s.io\r\n\r\n"
            );
            if io.write_all(resp.as_bytes()).await.is_err() {
                return;
            }
            let ws = WebSocketStream::from_raw_socket(io, Role::Server, None).await;
            let pod = base.split('/').nth(6).unwrap_or("").to_string();
            if base.ends_with("/exec") {
                let cmd = query(&path, "command");
                ctx.log.lock().unwrap().push(format!("EXEC {}", cmd.join(" ")));
                let stdin = query(&path, "stdin").first().map(String::as_str) == Some("true");
                exec(ws, cmd, stdin, &ctx.root.join(&pod), &ctx).await;
            } else if base.ends_with("/portforward") {
                let port: u16 = query(&path, "ports").first().and_then(|p| p.parse().ok()).unwrap_or(0);
                ctx.log.lock().unwrap().push(format!("PORTFORWARD {port}"));
                forward(ws, port, ctx.cut.subscribe()).await;
            }
            return;
        }

        ctx.log.lock().unwrap().push(format!("{method} {path}"));
        let pods = ctx.pods.lock().unwrap().clone();
        let named: Option<Vec<&str>> =
            base.strip_prefix("/api/v1/namespaces/dev/pods/").map(|r| r.split('/').collect());
        let (status, body) = if base == "/api/v1/namespaces/dev/pods" {
            let items: Vec<String> = pods.iter().map(|p| pod_json(p)).collect();
            let list = format!(
                "{{\"apiVersion\":\"v1\",\"kind\":\"PodList\",\"metadata\":{{}},\"items\":[{}]}}",
                items.join(",")
            );
            (200, list)
        } else if let Some([name]) = named.as_deref().filter(|n| pods.iter().any(|p| p == n[0])) {
            (200, pod_json(name))
        } else if let Some([_, "log"]) = named.as_deref() {
            // A log that never says anything: hold the stream open.
            let _ = io
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n")
                .await;
            let _ = io.flush().await;
            std::future::pending::<()>().await;
            return;
        } else {
            (404, "{\"kind\":\"Status\",\"apiVersion\":\"v1\",\"status\":\"Failure\",\"code\":404,\"reason\":\"NotFound\"}".into())
        };
        let resp = format!(
            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        if io.write_all(resp.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// A pod path as a path on this machine.
fn in_pod(root: &Path, arg: &str) -> String {
    let r = root.display().to_string();
    // Whole arguments that are absolute paths (the agent, its root), and
    // the agent's path inside shell scripts.
    if arg.starts_with('/') && !arg.contains(' ') {
        return format!("{r}{arg}");
    }
    arg.replace("/tmp/devloop-agent", &format!("{r}/tmp/devloop-agent"))
}

async fn exec<S>(ws: WebSocketStream<S>, cmd: Vec<String>, stdin: bool, pod_root: &Path, ctx: &Ctx)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let args: Vec<String> = cmd.iter().map(|a| in_pod(pod_root, a)).collect();
    let (mut tx, mut rx) = ws.split();
    let Some((prog, rest)) = args.split_first() else { return };
    let mut child = match tokio::process::Command::new(prog)
        .args(rest)
        .stdin(if stdin { std::process::Stdio::piped() } else { std::process::Stdio::null() })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            let status = format!("{{\"status\":\"Failure\",\"message\":\"{e}\"}}");
            let _ = tx.send(Message::binary([&[3u8][..], status.as_bytes()].concat())).await;
            return;
        }
    };
    let (out_tx, mut out_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    for (ch, pipe) in [(1u8, child.stdout.take().map(boxed)), (2u8, child.stderr.take().map(boxed))] {
        let Some(mut pipe) = pipe else { continue };
        let out_tx = out_tx.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 << 10];
            while let Ok(n) = pipe.read(&mut buf).await {
                if n == 0 || out_tx.send([&[ch][..], &buf[..n]].concat()).is_err() {
                    break;
                }
            }
        });
    }
    drop(out_tx);
    let mut child_in = child.stdin.take();
    let counter = ctx.stdin.clone();
    // Client → process stdin; ends when the client goes away, which closes
    // stdin, as a kubelet does.
    let input = tokio::spawn(async move {
        while let Some(Ok(m)) = rx.next().await {
            if let Message::Binary(b) = m {
                if b.first() == Some(&0) && b.len() > 1 {
                    counter.fetch_add(b.len() as u64 - 1, Ordering::Relaxed);
                    if let Some(w) = child_in.as_mut() {
                        let _ = w.write_all(&b[1..]).await;
                    }
                }
            } else if m.is_close() {
                break;
            }
        }
    });
    while let Some(frame) = out_rx.recv().await {
        if tx.send(Message::binary(frame)).await.is_err() {
            break;
        }
    }
    let status = child.wait().await.ok().and_then(|s| s.code()).unwrap_or(-1);
    let status = if status == 0 {
        "{\"metadata\":{},\"status\":\"Success\"}".to_string()
    } else {
        format!(
            "{{\"metadata\":{{}},\"status\":\"Failure\",\"reason\":\"NonZeroExitCode\",\"details\":{{\"causes\":[{{\"reason\":\"ExitCode\",\"message\":\"{status}\"}}]}}}}"
        )
    };
    let _ = tx.send(Message::binary([&[3u8][..], status.as_bytes()].concat())).await;
    let _ = tx.close().await;
    input.abort();
}

fn boxed(r: impl tokio::io::AsyncRead + Unpin + Send + 'static) -> Box<dyn tokio::io::AsyncRead + Unpin + Send> {
    Box::new(r)
}

async fn forward<S>(ws: WebSocketStream<S>, port: u16, mut cut: broadcast::Receiver<()>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut tx, mut rx) = ws.split();
    let p = port.to_le_bytes();
    // Each port's data and error channels open with the port number.
    if tx.send(Message::binary(vec![0, p[0], p[1]])).await.is_err()
        || tx.send(Message::binary(vec![1, p[0], p[1]])).await.is_err()
    {
        return;
    }
    let Ok(sock) = TcpStream::connect(("127.0.0.1", port)).await else {
        let msg = format!("error forwarding port {port}: connection refused");
        let _ = tx.send(Message::binary([&[1u8][..], msg.as_bytes()].concat())).await;
        return;
    };
    let _ = sock.set_nodelay(true);
    let (mut r, mut w) = sock.into_split();
    let up = async {
        while let Some(Ok(m)) = rx.next().await {
            match m {
                Message::Binary(b) if b.first() == Some(&0) && b.len() > 1 && w.write_all(&b[1..]).await.is_err() => {
                    break;
                }
                m if m.is_close() => break,
                _ => {}
            }
        }
    };
    let down = async {
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(n) = r.read(&mut buf).await {
            if n == 0 || tx.send(Message::binary([&[0u8][..], &buf[..n]].concat())).await.is_err() {
                break;
            }
        }
        let _ = tx.close().await;
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
        _ = cut.recv() => {}
    }
}
