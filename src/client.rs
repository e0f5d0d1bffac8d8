//! The CLI's end of a session with one agent: [`AgentClient`], a cloneable
//! handle that every consumer of the session shares (the sync engine, the
//! intercept, commands from the dashboard).
//!
//! [`AgentClient::open`] does the handshake and waits for the agent's
//! `Hello`; then one task (the dispatcher) owns the incoming side: it
//! answers pending requests (index parts, batch acknowledgements) and
//! turns the agent's reports (command and app output, app state) into
//! events. Acknowledgements are registered in a small shared table rather
//! than sent to the dispatcher: a request would wake the dispatcher as
//! well as the writer, and two tasks woken at once make tokio wake a
//! second worker thread, on an edit's critical path.

use crate::endpoint::Io;
use crate::events::{Kind, Reporter};
use devloop_agent::handshake::{self, ConnectError};
use devloop_agent::mux::{self, close_code, End, Heartbeat, Incoming, Mux, Role, Stream, StreamWriter};
use devloop_agent::paths::WirePath;
use devloop_agent::protocol::{
    AppSpec, AppState, CommandSpec, Control, Encoding, Entry, HeaderMatch, InterceptPort, OutputSource, PathError,
    StdStream, StreamHeader, CHUNK_SIZE, STREAM_WINDOW, TCP_WINDOW,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot, watch};

/// How long the agent gets to answer the handshake and say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Connect(String),
    #[error("the agent did not answer within {0:?} (is the target command right? its output is above)")]
    Timeout(Duration),
    #[error("connection to the agent lost: {0}")]
    Lost(String),
    #[error("the agent said: {0}")]
    Agent(String),
}

impl ClientError {
    /// What the user can do about it.
    pub fn hint(&self) -> Option<String> {
        match self {
            ClientError::Connect(_) => Some("install matching versions of devloop and devloop-agent".into()),
            ClientError::Timeout(_) | ClientError::Lost(_) => {
                Some("the agent's own messages (agent: ...) above say why; check target in devloop.yaml".into())
            }
            ClientError::Agent(_) => None,
        }
    }
}

impl From<ConnectError> for ClientError {
    fn from(e: ConnectError) -> ClientError {
        ClientError::Connect(crate::error::chain(&e))
    }
}

/// The agent's answer to a batch.
#[derive(Debug, Clone)]
pub struct Applied {
    pub written: u64,
    pub deleted: u64,
    pub bytes: u64,
    pub errors: Vec<PathError>,
    pub apply_us: u64,
}

/// The agent's index of the target.
#[derive(Debug, Default)]
pub struct Index {
    pub entries: Vec<Entry>,
    /// Files whose hash came from the agent's cache, not read.
    pub reused: u64,
}

type IndexReply = oneshot::Sender<Result<Index, ClientError>>;
type InterceptReply = oneshot::Sender<Result<Vec<String>, ClientError>>;
type EnvReply = oneshot::Sender<Result<Vec<(String, String)>, ClientError>>;

/// A request whose answer the dispatcher routes back, registered before
/// the request is sent (so before its answer can come).
enum Req {
    Index(u64, IndexReply),
    Intercept(InterceptReply, mpsc::UnboundedSender<mux::Accepted>),
    Env(u64, EnvReply),
}
type BatchReply = oneshot::Sender<Result<Applied, ClientError>>;

/// Batches awaiting their acknowledgement; `None` once the dispatcher has
/// ended (a registration then fails instead of waiting forever).
type AckTable = Arc<Mutex<Option<HashMap<u64, BatchReply>>>>;

fn lock(t: &AckTable) -> std::sync::MutexGuard<'_, Option<HashMap<u64, BatchReply>>> {
    t.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where a batch's acknowledgement arrives.
pub type PendingAck = oneshot::Receiver<Result<Applied, ClientError>>;

/// A session with one agent. Clones share it.
#[derive(Clone)]
pub struct AgentClient {
    inner: Arc<Inner>,
}

struct Inner {
    mux: Mux,
    req: mpsc::UnboundedSender<Req>,
    acks: AckTable,
    next_id: AtomicU64,
    ended: watch::Receiver<Option<String>>,
    agent_version: String,
    pid: u32,
    root: String,
    /// Whether batch streams travel in zstd blocks (see [`compression`]).
    compress: bool,
}

/// Whether to compress batch streams: when the agent reads zstd blocks
/// and the bytes cross a network; `DEVLOOP_COMPRESS=0` or `1` decides
/// instead (for comparisons).
fn compression(remote: bool, features: &[String]) -> bool {
    let agent_reads = features.iter().any(|f| f == devloop_agent::codec::FEATURE_ZSTD);
    let wanted = match std::env::var("DEVLOOP_COMPRESS").as_deref() {
        Ok("0") => false,
        Ok("1") => true,
        _ => remote,
    };
    agent_reads && wanted
}

impl AgentClient {
    /// Handshake, hello, and the dispatcher task.
    /// `remote`: the bytes cross a network (batches are compressed then).
    pub async fn open(io: Box<dyn Io>, token: &str, rep: Reporter, remote: bool) -> Result<AgentClient, ClientError> {
        let (io, rest, agent_version) = tokio::time::timeout(HELLO_TIMEOUT, handshake::connect(io, token))
            .await
            .map_err(|_| ClientError::Timeout(HELLO_TIMEOUT))??;
        let (mux, mut rx) = mux::spawn(io, rest, Role::Client, Heartbeat::from_env());
        let first =
            tokio::time::timeout(HELLO_TIMEOUT, rx.recv()).await.map_err(|_| ClientError::Timeout(HELLO_TIMEOUT))?;
        let (pid, root, compress) = match first {
            Some(Incoming::Control(Control::Hello { pid, root, features, .. })) => {
                (pid, root, compression(remote, &features))
            }
            Some(Incoming::Ended(e)) => return Err(ClientError::Lost(e.to_string())),
            Some(Incoming::Control(Control::Error { message, .. })) => return Err(ClientError::Agent(message)),
            other => return Err(ClientError::Lost(format!("expected hello, got {other:?}"))),
        };
        let (req, req_rx) = mpsc::unbounded_channel();
        let (ended_tx, ended) = watch::channel(None);
        let acks: AckTable = Arc::new(Mutex::new(Some(HashMap::new())));
        tokio::spawn(dispatch(rx, req_rx, acks.clone(), mux.clone(), rep, ended_tx));
        let inner = Inner { mux, req, acks, next_id: AtomicU64::new(1), ended, agent_version, pid, root, compress };
        Ok(AgentClient { inner: Arc::new(inner) })
    }

    pub fn agent_version(&self) -> &str {
        &self.inner.agent_version
    }

    pub fn pid(&self) -> u32 {
        self.inner.pid
    }

    pub fn root(&self) -> &str {
        &self.inner.root
    }

    /// Whether [`AgentClient::stream_batch`]'s archive is to be written
    /// through a [`devloop_agent::codec::CompressWriter`].
    pub fn compresses(&self) -> bool {
        self.inner.compress
    }

    fn id(&self) -> u64 {
        self.inner.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Asks the agent for the index of these root-relative trees.
    pub async fn index(&self, under: Vec<WirePath>, prune: Vec<WirePath>) -> Result<Index, ClientError> {
        let id = self.id();
        let (reply, rx) = oneshot::channel();
        // Registered before the request is sent (the dispatcher takes
        // registrations before incoming messages), so before its answer.
        self.inner.req.send(Req::Index(id, reply)).map_err(|_| self.lost())?;
        let packed = self.inner.compress;
        self.inner.mux.control(Control::IndexRequest { id, under, prune, packed }).map_err(|_| self.lost())?;
        rx.await.map_err(|_| self.lost())?
    }

    /// Registers a batch's acknowledgement before the batch is sent.
    fn expect_ack(&self, id: u64) -> Result<PendingAck, ClientError> {
        let (reply, applied) = oneshot::channel();
        match lock(&self.inner.acks).as_mut() {
            Some(t) => t.insert(id, reply),
            None => return Err(self.lost()),
        };
        Ok(applied)
    }

    /// A batch with no archive (deletions, commands, a restart).
    pub fn batch(
        &self,
        deletes: Vec<WirePath>,
        commands: Vec<CommandSpec>,
        restart: bool,
    ) -> Result<PendingAck, ClientError> {
        let id = self.id();
        let applied = self.expect_ack(id)?;
        self.inner.mux.control(Control::Batch { id, deletes, commands, restart }).map_err(|_| self.lost())?;
        Ok(applied)
    }

    /// A batch whose archive is written to the returned stream (and
    /// finished with `shutdown`), then acknowledged. `encoding`: what the
    /// writer writes (zstd only when [`AgentClient::compresses`]).
    pub fn stream_batch(
        &self,
        deletes: Vec<WirePath>,
        commands: Vec<CommandSpec>,
        restart: bool,
        encoding: Option<Encoding>,
    ) -> Result<(StreamWriter, PendingAck), ClientError> {
        let id = self.id();
        let applied = self.expect_ack(id)?;
        let header = StreamHeader::Batch { id, deletes, commands, restart, encoding };
        let stream = self.inner.mux.open(&header, STREAM_WINDOW).map_err(|_| self.lost())?;
        Ok((stream.into_split().1, applied))
    }

    /// Sends a batch with an archive built in memory: one frame when it
    /// fits a chunk (an edit), else a stream. Returns the acknowledgement.
    pub async fn inline_batch(
        &self,
        deletes: Vec<WirePath>,
        commands: Vec<CommandSpec>,
        restart: bool,
        archive: &[u8],
    ) -> Result<PendingAck, ClientError> {
        if archive.len() <= CHUNK_SIZE {
            let id = self.id();
            let applied = self.expect_ack(id)?;
            let batch = Control::Batch { id, deletes, commands, restart };
            self.inner.mux.batch_with_archive(&batch, archive).map_err(|_| self.lost())?;
            return Ok(applied);
        }
        let (mut w, applied) = self.stream_batch(deletes, commands, restart, None)?;
        let sent = async {
            w.write_all(archive).await?;
            w.shutdown().await
        };
        sent.await.map_err(|e| ClientError::Lost(e.to_string()))?;
        Ok(applied)
    }

    /// Takes the intercept (see [`Control::Intercept`]); returns the
    /// addresses the agent listens on, and the connections it accepts
    /// there, as streams. A later call replaces the intercept (and the
    /// earlier receiver ends).
    pub async fn intercept(
        &self,
        ports: Vec<InterceptPort>,
        header: Option<HeaderMatch>,
        lease_ms: u64,
    ) -> Result<(Vec<String>, mpsc::UnboundedReceiver<mux::Accepted>), ClientError> {
        let (reply, rx) = oneshot::channel();
        let (inbound, accepted) = mpsc::unbounded_channel();
        self.inner.req.send(Req::Intercept(reply, inbound)).map_err(|_| self.lost())?;
        self.inner.mux.control(Control::Intercept { ports, header, lease_ms }).map_err(|_| self.lost())?;
        let listening = rx.await.map_err(|_| self.lost())??;
        Ok((listening, accepted))
    }

    /// Releases the intercept.
    pub fn intercept_stop(&self) {
        let _ = self.inner.mux.control(Control::InterceptStop {});
    }

    /// The agent's environment (the container's, as the app sees it).
    pub async fn env(&self) -> Result<Vec<(String, String)>, ClientError> {
        let id = self.id();
        let (reply, rx) = oneshot::channel();
        self.inner.req.send(Req::Env(id, reply)).map_err(|_| self.lost())?;
        self.inner.mux.control(Control::EnvRequest { id }).map_err(|_| self.lost())?;
        rx.await.map_err(|_| self.lost())?
    }

    /// Opens a connection to `host:port` from the agent's side.
    pub fn dial(&self, host: &str, port: u16) -> Result<Stream, ClientError> {
        let header = StreamHeader::Dial { host: host.to_string(), port };
        self.inner.mux.open(&header, TCP_WINDOW).map_err(|_| self.lost())
    }

    /// Restarts the app the agent runs.
    pub fn restart_app(&self) -> Result<(), ClientError> {
        self.inner.mux.control(Control::AppRestart {}).map_err(|_| self.lost())
    }

    /// Sets (or clears) the app the agent runs.
    pub fn configure_app(&self, app: Option<AppSpec>) {
        let _ = self.inner.mux.control(Control::AppConfigure { app });
    }

    /// Resolves when the session has ended, with the reason.
    pub async fn ended(&self) -> String {
        let mut ended = self.inner.ended.clone();
        loop {
            if let Some(r) = ended.borrow().clone() {
                return r;
            }
            if ended.changed().await.is_err() {
                return "connection closed".into();
            }
        }
    }

    /// True once the session has ended.
    pub fn is_ended(&self) -> bool {
        self.inner.ended.borrow().is_some()
    }

    /// Closes the session normally.
    pub fn close(&self) {
        self.inner.mux.close(close_code::NORMAL, "");
    }

    fn lost(&self) -> ClientError {
        ClientError::Lost(self.inner.ended.borrow().clone().unwrap_or_else(|| "connection closed".into()))
    }
}

async fn dispatch(
    mut rx: mpsc::Receiver<Incoming>,
    mut req: mpsc::UnboundedReceiver<Req>,
    acks: AckTable,
    mux: Mux,
    rep: Reporter,
    ended: watch::Sender<Option<String>>,
) {
    let mut indexes: HashMap<u64, (Index, IndexReply)> = HashMap::new();
    let mut envs: HashMap<u64, EnvReply> = HashMap::new();
    let mut intercept_reply: Option<InterceptReply> = None;
    // Where connections the agent accepts for the intercept go.
    let mut inbound: Option<mpsc::UnboundedSender<mux::Accepted>> = None;
    let end: String = loop {
        tokio::select! {
            // Requests first: a request is always registered before the
            // agent can answer it.
            biased;
            r = req.recv() => match r {
                Some(Req::Index(id, reply)) => { indexes.insert(id, (Index::default(), reply)); }
                Some(Req::Env(id, reply)) => { envs.insert(id, reply); }
                Some(Req::Intercept(reply, to)) => {
                    intercept_reply = Some(reply);
                    inbound = Some(to);
                }
                // Every handle was dropped: close the session.
                None => {
                    mux.close(close_code::NORMAL, "");
                    break "closed by devloop".to_string();
                }
            },
            item = rx.recv() => match item {
                None => break End::Eof.to_string(),
                Some(Incoming::Ended(e)) => break e.to_string(),
                Some(Incoming::Batch { .. }) => {
                    mux.close(close_code::PROTOCOL, "unexpected batch from the agent");
                    break "the agent sent a batch, which only devloop sends".to_string();
                }
                Some(Incoming::Open(a)) => match (&a.header, &inbound) {
                    (StreamHeader::Inbound { .. }, Some(to)) => {
                        if let Err(mpsc::error::SendError(a)) = to.send(a) {
                            a.stream.reset("devloop no longer holds this intercept");
                        }
                    }
                    _ => a.stream.reset(&format!("devloop does not accept {:?} streams here", a.header)),
                },
                Some(Incoming::Control(c)) => match c {
                    Control::IndexPart { id, entries, done, reused } => {
                        if let Some((acc, _)) = indexes.get_mut(&id) {
                            acc.entries.extend(entries);
                            acc.reused += reused;
                        }
                        if done {
                            if let Some((acc, reply)) = indexes.remove(&id) {
                                let _ = reply.send(Ok(acc));
                            }
                        }
                    }
                    Control::InterceptHeld { listening } => {
                        if let Some(r) = intercept_reply.take() {
                            let _ = r.send(Ok(listening));
                        }
                    }
                    Control::InterceptFailed { message } => {
                        inbound = None;
                        if let Some(r) = intercept_reply.take() {
                            let _ = r.send(Err(ClientError::Agent(message)));
                        }
                    }
                    Control::Env { id, vars } => {
                        if let Some(r) = envs.remove(&id) {
                            let _ = r.send(Ok(vars));
                        }
                    }
                    Control::Applied { id, written, deleted, bytes, errors, apply_us } => {
                        if let Some(reply) = lock(&acks).as_mut().and_then(|t| t.remove(&id)) {
                            let _ = reply.send(Ok(Applied { written, deleted, bytes, errors, apply_us }));
                        }
                    }
                    Control::Error { message, fatal: true, .. } => {
                        rep.send(Kind::Error { message: format!("agent: {message}"), hint: None });
                    }
                    // An error that answers a request fails that request
                    // only; any other is reported and the session goes on.
                    Control::Error { message, request: Some(id), .. } if indexes.contains_key(&id) => {
                        if let Some((_, reply)) = indexes.remove(&id) {
                            let _ = reply.send(Err(ClientError::Agent(message)));
                        }
                    }
                    other => report(&rep, other),
                },
            },
        }
    };
    for (_, (_, reply)) in indexes.drain() {
        let _ = reply.send(Err(ClientError::Lost(end.clone())));
    }
    for (_, reply) in envs.drain() {
        let _ = reply.send(Err(ClientError::Lost(end.clone())));
    }
    if let Some(r) = intercept_reply {
        let _ = r.send(Err(ClientError::Lost(end.clone())));
    }
    let registered = lock(&acks).take().unwrap_or_default();
    for (_, reply) in registered {
        let _ = reply.send(Err(ClientError::Lost(end.clone())));
    }
    let _ = ended.send(Some(end));
}

fn report(rep: &Reporter, c: Control) {
    match c {
        Control::CommandStarted { command, .. } => rep.send(Kind::CommandStarted { command }),
        Control::CommandExited { command, code, ms, .. } => rep.send(Kind::CommandExited { command, code, ms }),
        Control::Output { source, stream, line } => {
            let stream = match stream {
                StdStream::Stdout => "stdout",
                StdStream::Stderr => "stderr",
            }
            .to_string();
            match source {
                OutputSource::App => rep.send(Kind::AppOutput { stream, line }),
                OutputSource::Command { command, .. } => rep.send(Kind::CommandOutput { command, stream, line }),
            }
        }
        Control::App { state } => rep.send(match state {
            AppState::Started { pid } => Kind::AppStarted { pid },
            AppState::Exited { code } => Kind::AppExited { code },
            AppState::Stopped => Kind::AppStopped,
            AppState::FailedToStart { message } => Kind::AppFailed { message },
        }),
        Control::Error { message, .. } => rep.send(Kind::Warning { message: format!("agent: {message}") }),
        _ => {}
    }
}
