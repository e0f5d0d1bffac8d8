//! How the CLI reaches an agent in a pod, once it is injected: a
//! port-forward to the agent's loopback port, with the exec stream that
//! started it kept open as its lifeline (the default), or the exec
//! stream's stdin/stdout themselves (the fallback).

use super::kubernetes::{api_err, KubeError, PodEndpoint};
use super::{Process, Started};
use crate::events::{Kind, Reporter};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, AttachParams};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// Which step of a port-forwarded start failed: starting the agent is an
/// error; the port-forward itself can fall back to the exec stream.
pub(super) enum Step {
    Start(KubeError),
    Forward(KubeError),
}

/// How long the agent may take to print its readiness line.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Starts the agent listening on a loopback port in the pod, with the exec
/// stream as its lifeline (and its stderr as log lines), then opens a
/// port-forward to that port.
pub(super) async fn start_forwarded(
    ep: &PodEndpoint,
    container: &str,
    remote: &str,
    root: &str,
    token: &str,
    rep: &Reporter,
) -> Result<Started, Step> {
    let pods: Api<Pod> = Api::namespaced(ep.cluster.client.clone(), &ep.cluster.namespace);
    let cache = cache_dir(remote);
    let cmd = [remote, "serve", "--listen", "127.0.0.1:0", "--token-stdin", "--root", root, "--cache-dir", cache];
    let Launched { process, stdin, stdout, forwarders } =
        launch(ep, container, &cmd, token, rep).await.map_err(Step::Start)?;
    // "devloop-agent V protocol N listening on 127.0.0.1:PORT root DIR"
    let mut out = BufReader::new(stdout);
    let mut line = String::new();
    let read = tokio::time::timeout(READY_TIMEOUT, out.read_line(&mut line)).await;
    let port = line
        .split_once(" listening on ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
        .map(|a| a.port());
    let Some(port) = port else {
        process.abort();
        for f in &forwarders {
            f.abort();
        }
        return Err(Step::Start(match read {
            Err(_) => KubeError::Timeout {
                pod: ep.pod.clone(),
                command: format!("{remote} serve --listen"),
                secs: READY_TIMEOUT.as_secs(),
            },
            Ok(_) => KubeError::Unsupported {
                what: format!("the agent in pod {}", ep.pod),
                message: format!(
                    "it did not say where it listens (it printed {:?}; its own messages are above)",
                    line.trim()
                ),
            },
        }));
    };
    // The agent prints nothing more on stdout; this task ends when the agent
    // does, which tells `reopen` not to bother.
    let alive = tokio::spawn(async move {
        let mut sink = tokio::io::sink();
        let _ = tokio::io::copy(&mut out, &mut sink).await;
    });
    let mut f = Forwarded {
        exec: process,
        stdin: Box::new(stdin),
        forwarders,
        alive,
        pods,
        pod: ep.pod.clone(),
        port,
        pf: None,
    };
    match f.open().await {
        Ok(io) => Ok(Started { io, process: Process::forwarded(f), via: format!("port-forward 127.0.0.1:{port}") }),
        Err(e) => {
            f.stop();
            Err(Step::Forward(e))
        }
    }
}

/// An agent listening in a pod: the exec stream that started it (its
/// lifeline), and the port-forward to it.
pub struct Forwarded {
    exec: kube::api::AttachedProcess,
    /// Held open: when it closes, the agent exits.
    stdin: Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
    forwarders: Vec<tokio::task::JoinHandle<()>>,
    /// Ends when the agent's stdout does, i.e. when the agent is gone.
    alive: tokio::task::JoinHandle<()>,
    pods: Api<Pod>,
    pod: String,
    port: u16,
    pf: Option<kube::api::Portforwarder>,
}

/// How long opening a port-forward may take.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

impl Forwarded {
    /// Opens a port-forward to the agent's port.
    async fn open(&mut self) -> Result<Box<dyn super::Io>, KubeError> {
        if let Some(old) = self.pf.take() {
            old.abort();
        }
        let what = format!("port-forward to port {} of pod {}", self.port, self.pod);
        let mut pf = tokio::time::timeout(FORWARD_TIMEOUT, self.pods.portforward(&self.pod, &[self.port]))
            .await
            .map_err(|_| KubeError::Timeout {
                pod: self.pod.clone(),
                command: "port-forward".into(),
                secs: FORWARD_TIMEOUT.as_secs(),
            })?
            .map_err(|e| api_err(what.clone(), e))?;
        let io = pf
            .take_stream(self.port)
            .ok_or_else(|| KubeError::Unsupported { what, message: "the port-forward has no stream".into() })?;
        self.pf = Some(pf);
        Ok(Box::new(io))
    }

    /// A new port-forward to the same agent, if it is still running.
    pub async fn reopen(&mut self, rep: &Reporter) -> Option<Box<dyn super::Io>> {
        if self.alive.is_finished() {
            return None;
        }
        match self.open().await {
            Ok(io) => {
                rep.send(Kind::AgentLog {
                    line: format!("port-forward to the agent in pod {} opened again", self.pod),
                });
                Some(io)
            }
            Err(e) => {
                rep.send(Kind::Warning { message: crate::error::chain(&e) });
                None
            }
        }
    }

    /// Closes the port-forward and the exec stream; the agent, its stdin
    /// gone, exits.
    pub fn stop(&mut self) {
        if let Some(pf) = self.pf.take() {
            pf.abort();
        }
        let _ = &self.stdin;
        self.exec.abort();
        self.alive.abort();
        for f in &self.forwarders {
            f.abort();
        }
    }
}

/// How much of the exec stream's stdin and stdout kube buffers.
const EXEC_PIPE: usize = 1 << 20;

/// The agent, started by an exec with its token handed over on stdin.
struct Launched {
    process: kube::api::AttachedProcess,
    stdin: std::pin::Pin<Box<dyn tokio::io::AsyncWrite + Send>>,
    stdout: std::pin::Pin<Box<dyn tokio::io::AsyncRead + Send>>,
    forwarders: Vec<tokio::task::JoinHandle<()>>,
}

/// Runs `cmd` (the agent) in the container, hands it the session token as
/// the first line of its stdin, and passes its stderr on as log lines.
async fn launch(
    ep: &PodEndpoint,
    container: &str,
    cmd: &[&str],
    token: &str,
    rep: &Reporter,
) -> Result<Launched, KubeError> {
    let pods: Api<Pod> = Api::namespaced(ep.cluster.client.clone(), &ep.cluster.namespace);
    // kube's default pipes hold 1 KiB, and each read of one becomes a
    // WebSocket message, a TLS record and a write: a 256 MiB batch was
    // 262,144 of them. With deeper pipes a message carries the 4 KiB that
    // kube reads at once.
    let ap = AttachParams::default()
        .container(container)
        .stdin(true)
        .stdout(true)
        .stderr(true)
        .max_stdin_buf_size(EXEC_PIPE)
        .max_stdout_buf_size(EXEC_PIPE);
    let mut process = pods
        .exec(&ep.pod, cmd.iter().map(|s| s.to_string()).collect::<Vec<_>>(), &ap)
        .await
        .map_err(|e| api_err(format!("start the agent in pod {}", ep.pod), e))?;
    let what = || format!("exec in pod {}", ep.pod);
    let (Some(stdin), Some(stdout)) = (process.stdin(), process.stdout()) else {
        return Err(KubeError::Unsupported { what: what(), message: "no stdio".into() });
    };
    let (mut stdin, stdout) = (Box::pin(stdin), Box::pin(stdout));
    let handed = async {
        stdin.write_all(format!("{token}\n").as_bytes()).await?;
        stdin.flush().await
    };
    if let Err(e) = handed.await {
        process.abort();
        return Err(KubeError::Unsupported { what: what(), message: format!("cannot hand the agent its token: {e}") });
    }
    let forwarders = forward_stderr(&mut process, rep);
    Ok(Launched { process, stdin, stdout, forwarders })
}

/// Passes the agent's stderr on as log lines.
fn forward_stderr(p: &mut kube::api::AttachedProcess, rep: &Reporter) -> Vec<tokio::task::JoinHandle<()>> {
    let Some(stderr) = p.stderr() else { return Vec::new() };
    let rep = rep.clone();
    vec![tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            rep.send(Kind::AgentLog { line });
        }
    })]
}

/// Starts the agent with the exec stream's stdio as its connection.
pub(super) async fn start_stdio(
    ep: &PodEndpoint,
    container: &str,
    remote: &str,
    root: &str,
    token: &str,
    rep: &Reporter,
) -> Result<Started, KubeError> {
    let cache = cache_dir(remote);
    let cmd = [remote, "serve", "--stdio", "--token-stdin", "--root", root, "--cache-dir", cache];
    let Launched { process, stdin, stdout, forwarders } = launch(ep, container, &cmd, token, rep).await?;
    Ok(Started {
        io: Box::new(tokio::io::join(stdout, stdin)),
        process: Process::remote(process, forwarders),
        via: "exec".into(),
    })
}

/// Where the agent at `remote` keeps its hash cache: beside its binary,
/// where `devloop down` clears it.
fn cache_dir(remote: &str) -> &str {
    remote.rsplit_once('/').map_or("/tmp", |(d, _)| d)
}
