//! The CLI's end of a session with one agent.
//!
//! [`Link::open`] does the handshake and waits for the agent's `Hello`; then
//! one task (the dispatcher) owns the incoming side: it answers pending
//! requests (index, batch acknowledgements), feeds stream credit, and turns
//! the agent's reports (command and app output, app state) into events.
//! The sync engine talks to it through a request channel, except for the
//! acknowledgement of an inline batch (the single-edit path), which is
//! registered in a small shared table instead: a request would wake the
//! dispatcher as well as the writer, and two tasks woken at once make tokio
//! wake a second worker thread, on the edit's critical path.

use crate::events::{Kind, Reporter};
use crate::target::Io;
use devloop_agent::paths::WirePath;
use devloop_agent::protocol::{
    AppSpec, AppState, CommandSpec, Control, Entry, OutputSource, PathError, StdStream, CHUNK_SIZE,
};
use devloop_agent::transport::{self, ConnectError, Credits, End, Heartbeat, Incoming, Outbound, StreamSender};
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

/// How long the agent gets to answer the handshake and say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("the agent did not answer within {0:?} (is the target command right? its output is above)")]
    Timeout(Duration),
    #[error("connection to the agent lost: {0}")]
    Lost(String),
    #[error("the agent said: {0}")]
    Agent(String),
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

type IndexReply = oneshot::Sender<Result<Vec<Entry>, LinkError>>;
type BatchReply = oneshot::Sender<Result<Applied, LinkError>>;

/// Inline batches awaiting their acknowledgement; `None` once the
/// dispatcher has ended (a registration then fails instead of waiting
/// forever).
type InlineTable = std::sync::Arc<std::sync::Mutex<Option<HashMap<u64, BatchReply>>>>;

fn lock(t: &InlineTable) -> std::sync::MutexGuard<'_, Option<HashMap<u64, BatchReply>>> {
    t.lock().unwrap_or_else(|e| e.into_inner())
}

enum Req {
    Index { id: u64, reply: IndexReply },
    Batch { id: u64, stream: Option<StreamSender>, reply: BatchReply },
}

/// An open session.
pub struct Link {
    out: Outbound,
    req: mpsc::UnboundedSender<Req>,
    inline: InlineTable,
    next_id: u64,
    ended: watch::Receiver<Option<String>>,
    pub agent_version: String,
    pub pid: u32,
    pub root: String,
}

/// A batch whose data is being sent.
pub struct PendingBatch {
    pub id: u64,
    pub stream: Option<StreamSender>,
    pub applied: oneshot::Receiver<Result<Applied, LinkError>>,
}

impl Link {
    /// Handshake, hello, and the dispatcher task.
    pub async fn open(io: Box<dyn Io>, token: &str, rep: Reporter) -> Result<Link, LinkError> {
        let (ws, agent_version) = tokio::time::timeout(HELLO_TIMEOUT, transport::connect(io, token))
            .await
            .map_err(|_| LinkError::Timeout(HELLO_TIMEOUT))??;
        let (out, mut rx) = transport::spawn(ws, Heartbeat::from_env());
        let first =
            tokio::time::timeout(HELLO_TIMEOUT, rx.recv()).await.map_err(|_| LinkError::Timeout(HELLO_TIMEOUT))?;
        let (pid, root) = match first {
            Some(Incoming::Control(Control::Hello { pid, root, .. })) => (pid, root),
            Some(Incoming::Ended(e)) => return Err(LinkError::Lost(e.to_string())),
            Some(Incoming::Control(Control::Error { message, .. })) => return Err(LinkError::Agent(message)),
            other => return Err(LinkError::Lost(format!("expected hello, got {other:?}"))),
        };
        let (req_tx, req_rx) = mpsc::unbounded_channel();
        let (ended_tx, ended) = watch::channel(None);
        let inline: InlineTable = std::sync::Arc::new(std::sync::Mutex::new(Some(HashMap::new())));
        tokio::spawn(dispatch(rx, req_rx, inline.clone(), out.clone(), rep, ended_tx));
        Ok(Link { out, req: req_tx, inline, next_id: 1, ended, agent_version, pid, root })
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Asks the agent for the index of these root-relative trees.
    pub async fn index(&mut self, under: Vec<WirePath>, prune: Vec<WirePath>) -> Result<Vec<Entry>, LinkError> {
        let id = self.id();
        let (reply, rx) = oneshot::channel();
        self.req.send(Req::Index { id, reply }).map_err(|_| self.lost())?;
        self.out.control(Control::IndexRequest { id, under, prune }).map_err(|_| self.lost())?;
        rx.await.map_err(|_| self.lost())?
    }

    /// Announces a batch; the caller sends its archive on the returned stream
    /// (when `with_data`), finishes it, and then awaits `applied`.
    pub async fn begin_batch(
        &mut self,
        deletes: Vec<WirePath>,
        commands: Vec<CommandSpec>,
        restart: bool,
        with_data: bool,
    ) -> Result<PendingBatch, LinkError> {
        let id = self.id();
        let stream_id = with_data.then_some(id as u32);
        let (reply, applied) = oneshot::channel();
        let stream = stream_id.map(|s| StreamSender::new(s, self.out.clone()));
        // The dispatcher registers the batch and its credit window. It reads
        // requests before incoming messages (biased), and this request is
        // queued before the batch is announced, so it is registered before
        // any answer to the batch can be read.
        let registration = stream.clone();
        self.req.send(Req::Batch { id, stream: registration, reply }).map_err(|_| self.lost())?;
        self.out
            .control(Control::Batch { id, deletes, stream: stream_id, commands, restart })
            .map_err(|_| self.lost())?;
        Ok(PendingBatch { id, stream, applied })
    }

    /// Sends a small batch whole: announcement, archive and end marker in
    /// one write (the archive must fit a stream window). Returns the
    /// acknowledgement to await.
    pub fn inline_batch(
        &mut self,
        deletes: Vec<WirePath>,
        commands: Vec<CommandSpec>,
        restart: bool,
        archive: &[u8],
    ) -> Result<oneshot::Receiver<Result<Applied, LinkError>>, LinkError> {
        let id = self.id();
        let (reply, applied) = oneshot::channel();
        // No credit window to register: the whole archive fits a fresh one.
        // Registered before it is sent, so before it can be answered.
        match lock(&self.inline).as_mut() {
            Some(t) => t.insert(id, reply),
            None => return Err(self.lost()),
        };
        // An edit's archive fits one message with its batch; a larger one
        // goes as a stream of chunks, so it cannot hold up a heartbeat.
        let sent = if archive.len() <= CHUNK_SIZE {
            self.out.batch_with_archive(&Control::Batch { id, deletes, stream: None, commands, restart }, archive)
        } else {
            let batch = Control::Batch { id, deletes, stream: Some(id as u32), commands, restart };
            self.out.control_with_stream(batch, id as u32, archive)
        };
        sent.map_err(|_| self.lost())?;
        Ok(applied)
    }

    /// Sets (or clears) the app the agent runs.
    pub fn configure_app(&self, app: Option<AppSpec>) {
        let _ = self.out.control(Control::AppConfigure { app });
    }

    /// Resolves when the session has ended, with the reason.
    pub async fn ended(&mut self) -> String {
        loop {
            if let Some(r) = self.ended.borrow().clone() {
                return r;
            }
            if self.ended.changed().await.is_err() {
                return "connection closed".into();
            }
        }
    }

    /// Closes the session normally.
    pub fn close(&self) {
        self.out.close(transport::close_code::NORMAL, "");
    }

    fn lost(&self) -> LinkError {
        LinkError::Lost(self.ended.borrow().clone().unwrap_or_else(|| "connection closed".into()))
    }
}

async fn dispatch(
    mut rx: mpsc::Receiver<Incoming>,
    mut req_rx: mpsc::UnboundedReceiver<Req>,
    inline: InlineTable,
    out: Outbound,
    rep: Reporter,
    ended: watch::Sender<Option<String>>,
) {
    let mut credits = Credits::default();
    let mut indexes: HashMap<u64, (Vec<Entry>, IndexReply)> = HashMap::new();
    let mut batches: HashMap<u64, BatchReply> = HashMap::new();
    let end: String = loop {
        tokio::select! {
            // Requests first: a request is always registered before the
            // agent can answer it.
            biased;
            r = req_rx.recv() => match r {
                Some(Req::Index { id, reply }) => { indexes.insert(id, (Vec::new(), reply)); }
                Some(Req::Batch { id, stream, reply }) => {
                    if let Some(s) = &stream {
                        credits.register(s);
                    }
                    batches.insert(id, reply);
                }
                // The Link was dropped: close the session.
                None => {
                    out.close(transport::close_code::NORMAL, "");
                    break "closed by devloop".to_string();
                }
            },
            item = rx.recv() => match item {
                None => break End::Eof.to_string(),
                Some(Incoming::Ended(e)) => break e.to_string(),
                Some(Incoming::Data { stream, .. }) => {
                    out.close(transport::close_code::PROTOCOL, "unexpected data from the agent");
                    break format!("the agent sent data on stream {stream}, which devloop never opened");
                }
                Some(Incoming::Batch { .. }) => {
                    out.close(transport::close_code::PROTOCOL, "unexpected batch from the agent");
                    break "the agent sent a batch, which only devloop sends".to_string();
                }
                Some(Incoming::Control(c)) => match c {
                    Control::IndexPart { id, entries, done } => {
                        if let Some((acc, _)) = indexes.get_mut(&id) {
                            acc.extend(entries);
                        }
                        if done {
                            if let Some((acc, reply)) = indexes.remove(&id) {
                                let _ = reply.send(Ok(acc));
                            }
                        }
                    }
                    Control::Applied { id, written, deleted, bytes, errors, apply_us } => {
                        credits.finish(id as u32);
                        let reply = batches.remove(&id).or_else(|| lock(&inline).as_mut().and_then(|t| t.remove(&id)));
                        if let Some(reply) = reply {
                            let _ = reply.send(Ok(Applied { written, deleted, bytes, errors, apply_us }));
                        }
                    }
                    Control::Credit { stream, bytes } => credits.grant(stream, bytes),
                    Control::Error { message, fatal: true, .. } => {
                        rep.send(Kind::Error { message: format!("agent: {message}"), hint: None });
                    }
                    // An error that answers a request fails that request
                    // only; any other is reported and the session goes on.
                    Control::Error { message, request: Some(id), .. } if indexes.contains_key(&id) => {
                        if let Some((_, reply)) = indexes.remove(&id) {
                            let _ = reply.send(Err(LinkError::Agent(message)));
                        }
                    }
                    other => report(&rep, other),
                },
            },
        }
    };
    credits.close_all();
    for (_, (_, reply)) in indexes.drain() {
        let _ = reply.send(Err(LinkError::Lost(end.clone())));
    }
    let registered = lock(&inline).take().unwrap_or_default();
    for (_, reply) in batches.drain().chain(registered) {
        let _ = reply.send(Err(LinkError::Lost(end.clone())));
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
