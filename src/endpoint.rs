//! Endpoints: how the CLI gets a byte stream to an agent, for each kind of
//! target in devloop.yaml.
//!
//! Every target ends in the same place, a stream that speaks the devloop
//! protocol, so the sync engine does not know or care where the agent runs:
//!
//! - [`local`]: the agent as a child process of devloop, over its stdio;
//! - [`exec`]: any command whose stdio is the agent (`docker exec -i`,
//!   `ssh`, `kubectl exec -i`).
//!
//! - [`kubernetes`]: a pod's container, through the API server's exec.

pub mod exec;
pub mod forwarder;
pub mod helper;
pub mod kubernetes;
pub mod local;
mod pod_link;
pub mod steer;
pub mod workload;

use crate::config::{Target, TokenVia};
use crate::events::{Kind, Reporter};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

/// A byte stream to an agent.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// Why an agent could not be started or reached.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("devloop-agent binary not found (looked in {looked})")]
    AgentNotFound { looked: String },
    #[error("cannot start `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot hand the session token to `{command}`")]
    Token {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Kubernetes(Box<kubernetes::KubeError>),
    #[error("devloop-forward binary not found (looked in {looked})")]
    ForwarderNotFound { looked: String },
    #[error("the intercept's forwarder did not start (its log, {log}, says: {message})")]
    Forwarder { message: String, log: std::path::PathBuf },
}

impl TargetError {
    /// What the user can do about it.
    pub fn hint(&self) -> Option<String> {
        match self {
            TargetError::AgentNotFound { .. } => Some(
                "build it with `cargo build --workspace` (it lands next to devloop), install it with \
                 `cargo install --path agent`, or set DEVLOOP_AGENT_BIN to its path"
                    .into(),
            ),
            TargetError::Spawn { .. } => {
                Some("check that the command exists and is executable (target.exec.command)".into())
            }
            TargetError::Token { .. } => None,
            TargetError::ForwarderNotFound { .. } => Some(
                "install devloop with `scripts/install` (it puts devloop-forward next to devloop), build it with `scripts/build-agent` in the source tree, or set DEVLOOP_FORWARD_BIN to its path"
                    .into(),
            ),
            TargetError::Forwarder { .. } => {
                Some("another process may hold the intercept's address (`listen:`); free it, or change it".into())
            }
            TargetError::Kubernetes(k) => k.hint(),
        }
    }
}

/// A started agent: the stream to it and the process that carries it.
pub struct Started {
    pub io: Box<dyn Io>,
    pub process: Process,
    /// How the stream reaches the agent, for people (`agent_connected`).
    pub via: String,
}

/// The process behind a connection: a local child (the agent itself, or
/// the exec command), or an exec stream into a pod. Stopped on shutdown;
/// killed if it does not end by itself.
pub struct Process {
    kind: ProcessKind,
}

enum ProcessKind {
    /// A child, and the task passing its stderr on as log lines.
    Local(Child, tokio::task::JoinHandle<()>),
    /// The exec stream, and the tasks forwarding its output.
    Remote(kube::api::AttachedProcess, Vec<tokio::task::JoinHandle<()>>),
    /// An agent listening in a pod, reached through a port-forward.
    Forwarded(Box<pod_link::Forwarded>),
}

impl Process {
    fn remote(p: kube::api::AttachedProcess, forwarders: Vec<tokio::task::JoinHandle<()>>) -> Process {
        Process { kind: ProcessKind::Remote(p, forwarders) }
    }

    fn forwarded(f: pod_link::Forwarded) -> Process {
        Process { kind: ProcessKind::Forwarded(Box::new(f)) }
    }

    /// A new stream to the same agent, when the process can give one: a
    /// dropped port-forward is opened again while the agent lives on (its
    /// lifeline, the exec stream, is separate). None means start afresh.
    pub async fn reopen(&mut self, rep: &Reporter) -> Option<Box<dyn Io>> {
        match &mut self.kind {
            ProcessKind::Forwarded(f) => f.reopen(rep).await,
            _ => None,
        }
    }

    /// Waits for the process to end after the session closed, then kills
    /// it (or drops the exec stream, which ends the agent) if it is still
    /// there.
    pub async fn stop(self, grace: Duration) {
        match self.kind {
            ProcessKind::Local(mut child, stderr) => {
                if tokio::time::timeout(grace, child.wait()).await.is_err() {
                    let _ = child.kill().await;
                }
                // Its last lines, then no more: a process it left behind
                // (`cmd &` in an exec target's shell) may hold its stderr
                // open for as long as it lives.
                let abort = stderr.abort_handle();
                if tokio::time::timeout(Duration::from_millis(100), stderr).await.is_err() {
                    abort.abort();
                }
            }
            ProcessKind::Remote(mut p, forwarders) => {
                // The agent exits once its session is closed, which ends the
                // exec cleanly; only a stuck one is cut off.
                if let Some(status) = p.take_status() {
                    let _ = tokio::time::timeout(grace, status).await;
                }
                p.abort();
                // After an abort the output streams never report their end.
                for f in forwarders {
                    f.abort();
                }
            }
            // Closing the exec stream closes the agent's stdin, its
            // lifeline: it stops its app and exits.
            ProcessKind::Forwarded(mut f) => f.stop(),
        }
    }
}

/// What one session connects to.
#[derive(Clone)]
pub enum Endpoint {
    Local { root: std::path::PathBuf },
    Exec { command: Vec<String>, token: TokenVia },
    Pod(std::sync::Arc<kubernetes::PodEndpoint>),
}

impl Endpoint {
    /// The endpoint of a local or exec target (a Kubernetes target has one
    /// per pod; see `session`).
    pub fn of(target: &Target) -> Option<Endpoint> {
        match target {
            Target::Local { root } => Some(Endpoint::Local { root: root.clone() }),
            Target::Exec { command, token } => Some(Endpoint::Exec { command: command.clone(), token: *token }),
            Target::Kubernetes(_) => None,
        }
    }

    /// Whether the agent's bytes cross a network (a pod, or an exec
    /// command such as ssh), where compressing them pays.
    pub fn crosses_network(&self) -> bool {
        !matches!(self, Endpoint::Local { .. })
    }

    pub fn describe(&self) -> String {
        match self {
            Endpoint::Local { root } => Target::Local { root: root.clone() }.describe(),
            Endpoint::Exec { command, token } => Target::Exec { command: command.clone(), token: *token }.describe(),
            Endpoint::Pod(p) => p.describe(),
        }
    }
}

/// Starts the agent for an endpoint.
pub async fn start(ep: &Endpoint, token: &str, rep: &Reporter) -> Result<Started, TargetError> {
    rep.send(Kind::AgentStarting { target: ep.describe() });
    match ep {
        Endpoint::Local { root } => {
            let cmd = local::command(root)?;
            spawn_stdio(cmd, token, TokenVia::Env, rep).await
        }
        Endpoint::Exec { command, token: via } => spawn_stdio(exec::command(command), token, *via, rep).await,
        Endpoint::Pod(p) => kubernetes::start(p, token, rep).await,
    }
}

/// A pipe to or from the agent holds 1 MiB instead of 64 KiB: a 64 KiB
/// chunk then no longer fills it, so the writer does not wait for the
/// reader to wake before each chunk.
#[cfg(target_os = "linux")]
fn deepen_pipe(p: &impl std::os::fd::AsRawFd) {
    // SAFETY: F_SETPIPE_SZ on a pipe this process holds; failure (a
    // lower pipe-max-size) leaves the pipe as it was.
    unsafe {
        libc::fcntl(p.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20);
    }
}

#[cfg(not(target_os = "linux"))]
fn deepen_pipe(_: &impl std::os::fd::AsRawFd) {}

/// Spawns a process whose stdio is the agent's, hands it the token, and
/// forwards its stderr as agent log events.
async fn spawn_stdio(mut cmd: Command, token: &str, via: TokenVia, rep: &Reporter) -> Result<Started, TargetError> {
    let shown = format!("{:?}", cmd.as_std().get_program());
    if via == TokenVia::Env {
        cmd.env(devloop_agent::protocol::TOKEN_ENV, token);
    }
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|source| TargetError::Spawn { command: shown.clone(), source })?;
    // All three were requested as pipes just above.
    let mut stdin = child.stdin.take().expect("piped stdin");
    let stdout = child.stdout.take().expect("piped stdout");
    deepen_pipe(&stdin);
    deepen_pipe(&stdout);
    let stderr = child.stderr.take().expect("piped stderr");
    if via == TokenVia::Stdin {
        stdin
            .write_all(format!("{token}\n").as_bytes())
            .await
            .map_err(|source| TargetError::Token { command: shown.clone(), source })?;
    }
    let rep = rep.clone();
    let stderr = tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            rep.send(Kind::AgentLog { line });
        }
    });
    Ok(Started {
        io: Box::new(tokio::io::join(stdout, stdin)),
        process: Process { kind: ProcessKind::Local(child, stderr) },
        via: "stdio".into(),
    })
}
