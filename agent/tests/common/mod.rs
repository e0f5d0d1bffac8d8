//! Starting the real agent binary on loopback, and opening a session with
//! it, for the suites that drive it directly.
#![allow(dead_code)]

use devloop_agent::handshake;
use devloop_agent::mux::{self, Heartbeat, Incoming, Mux, Role};
use devloop_agent::protocol::Control;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use tokio::net::TcpStream;

pub const TOKEN: &str = "s3cret-token-for-tests";

pub struct Agent {
    pub child: Child,
    pub port: u16,
    /// What the agent printed on stderr so far.
    pub stderr: std::sync::Arc<std::sync::Mutex<String>>,
    _dir: tempfile::TempDir,
    pub root: PathBuf,
    pub outside: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the agent on a free loopback port; `root` and a sibling
/// `outside` directory (with a file that must survive) live in one temp dir.
pub fn start_agent(heartbeat_ms: Option<u64>) -> Agent {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("victim"), "untouched").unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_devloop-agent"));
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--root"])
        .arg(&root)
        .env("DEVLOOP_AGENT_TOKEN", TOKEN)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(ms) = heartbeat_ms {
        cmd.env("DEVLOOP_HEARTBEAT_MS", ms.to_string());
    }
    let mut child = cmd.spawn().unwrap();
    let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let (log, pipe) = (stderr.clone(), child.stderr.take().unwrap());
    std::thread::spawn(move || {
        for l in BufReader::new(pipe).lines().map_while(Result::ok) {
            let mut log = log.lock().unwrap();
            log.push_str(&l);
            log.push('\n');
        }
    });
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    // "devloop-agent X protocol N listening on 127.0.0.1:PORT root DIR"
    let addr =
        line.split_whitespace().skip_while(|w| *w != "on").nth(1).unwrap_or_else(|| panic!("readiness line: {line}"));
    let port = addr.rsplit(':').next().unwrap().parse().unwrap();
    Agent { child, port, stderr, _dir: dir, root, outside }
}

pub async fn session(a: &Agent) -> (Mux, tokio::sync::mpsc::Receiver<Incoming>) {
    let tcp = TcpStream::connect(("127.0.0.1", a.port)).await.unwrap();
    let (io, rest, _) = handshake::connect(tcp, TOKEN).await.unwrap();
    let (out, mut rx) = mux::spawn(io, rest, Role::Client, Heartbeat::from_env());
    match rx.recv().await {
        Some(Incoming::Control(Control::Hello { .. })) => {}
        other => panic!("expected hello, got {other:?}"),
    }
    (out, rx)
}
