//! One connection between the CLI and an agent, over any byte stream (TCP,
//! a child's stdio, a pod's exec or port-forward), carrying control
//! messages and any number of streams in both directions. Both sides run
//! this same code; the frames are in [`crate::protocol`].
//!
//! [`spawn`] starts two tasks over an established connection:
//! - the **reader** decodes frames, and owns the stream table: data goes
//!   straight to its stream, with the receive window enforced (a peer
//!   that sends past it is cut off); control messages, one-frame batches
//!   and streams the peer opens come out, in wire order, as [`Incoming`];
//! - the **writer** sends what is queued: control messages, stream
//!   lifecycle frames and small data first, then bulk data chunks, so a
//!   heartbeat, an edit or a short request never waits behind more than
//!   one chunk of a large transfer. Data of one stream keeps its order.
//!
//! [`Mux`] is the cloneable sending side: control messages, and
//! [`Mux::open`], which returns a [`Stream`] at once (data may follow the
//! OPEN without a round trip). A [`Stream`] is `AsyncRead + AsyncWrite`;
//! `shutdown` sends FIN (half-close), [`Stream::reset`] aborts both ways
//! with a reason, dropping it closes our side. Blocking adapters
//! ([`StreamReader::blocking`], [`StreamWriter::blocking`]) serve threads
//! that read or build tar archives.

use crate::protocol::{self, encode_control, Control, Frame, StreamHeader, CHUNK_SIZE, MAX_MESSAGE, MAX_WINDOW};
use bytes::{Bytes, BytesMut};
use futures_util::task::AtomicWaker;
use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::mpsc;
use tokio_util::sync::PollSender;

/// How often each side pings, and when silence means the peer is gone.
#[derive(Debug, Clone, Copy)]
pub struct Heartbeat {
    pub interval: Duration,
    pub dead_after: Duration,
}

impl Heartbeat {
    /// 1 s pings, dead after 5 s of silence; `DEVLOOP_HEARTBEAT_MS` sets the
    /// interval (the timeout stays 5 intervals), for tests and slow links.
    pub fn from_env() -> Heartbeat {
        let ms = std::env::var("DEVLOOP_HEARTBEAT_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(1000u64).max(10);
        Heartbeat { interval: Duration::from_millis(ms), dead_after: Duration::from_millis(ms * 5) }
    }
}

/// Which side of the connection this is: the CLI opens odd stream ids,
/// the agent even ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Client,
    Server,
}

/// Close codes (as WebSocket's, which devloop spoke before).
pub mod close_code {
    pub const NORMAL: u16 = 1000;
    pub const SHUTDOWN: u16 = 1001;
    pub const PROTOCOL: u16 = 1002;
    pub const TOO_BIG: u16 = 1009;
}

/// How a session ended.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum End {
    #[error("the connection closed")]
    Eof,
    #[error("closed by the peer ({code}{})", if reason.is_empty() { String::new() } else { format!(": {reason}") })]
    Closed { code: u16, reason: String },
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("no heartbeat for {0:?}: the peer is unreachable")]
    Dead(Duration),
    #[error("I/O error: {0}")]
    Io(String),
}

/// A stream the peer opened.
pub struct Accepted {
    pub header: StreamHeader,
    pub stream: Stream,
}

/// What the reader hands to the session, in wire order. Ends with exactly
/// one [`Incoming::Ended`].
pub enum Incoming {
    Control(Control),
    Batch { control: Control, archive: Vec<u8> },
    Open(Accepted),
    Ended(End),
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Incoming::Control(c) => write!(f, "Control({c:?})"),
            Incoming::Batch { control, archive } => write!(f, "Batch({control:?}, {} bytes)", archive.len()),
            Incoming::Open(a) => write!(f, "Open({}, {:?})", a.stream.id(), a.header),
            Incoming::Ended(e) => write!(f, "Ended({e})"),
        }
    }
}

/// The connection is gone.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("connection closed")]
pub struct Closed;

/// Streams the peer may have open at once; past it, its OPENs are refused.
pub const MAX_STREAMS: usize = 8192;
/// Data frames up to this size go ahead of bulk data (when their stream
/// has no bulk data queued: a stream's data keeps its order).
const SMALL_FRAME: usize = 4 << 10;
/// Bulk frames queued for the writer: enough to keep the connection busy,
/// few enough that what queues behind them waits little.
const BULK_QUEUE: usize = 8;
/// How long a side that closed for a protocol error keeps reading, so the
/// peer gets its CLOSE before the connection goes.
const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// How much the reader asks of the connection at once.
const READ_CHUNK: usize = 256 << 10;

enum Out {
    Frame(Vec<u8>),
    /// A stream's data (or FIN) in the bulk queue; `pending` counts that
    /// stream's frames there.
    Bulk(Vec<u8>, Arc<AtomicUsize>),
    Close(u16, String),
}

/// Registrations with the reader, which owns the stream table.
enum Reg {
    Open(u32, Slot),
    /// Both halves of a stream of ours are gone.
    Forget(u32),
}

/// The reader's view of one stream.
struct Slot {
    to_reader: mpsc::UnboundedSender<Recv>,
    /// Bytes the peer may still send: the window, plus every WINDOW we
    /// sent, minus what came.
    budget: Arc<AtomicI64>,
    credit: Arc<Credit>,
    /// Data chunks sent to the reader and not yet taken by it.
    queued: Arc<AtomicUsize>,
    fin_received: bool,
    /// Both our halves are gone (the slot goes once the peer's side ends
    /// too).
    forgotten: bool,
}

enum Recv {
    Data(Bytes),
    Fin,
    Reset(String),
}

/// What this side may still send on a stream, grown by the peer's WINDOW
/// frames; or why the stream is gone.
#[derive(Default)]
struct Credit {
    state: Mutex<CreditState>,
    waker: AtomicWaker,
}

#[derive(Default)]
struct CreditState {
    avail: u64,
    gone: Option<String>,
}

impl Credit {
    fn new(window: u32) -> Credit {
        Credit { state: Mutex::new(CreditState { avail: window as u64, gone: None }), waker: AtomicWaker::new() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CreditState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn add(&self, n: u32) {
        self.lock().avail += n as u64;
        self.waker.wake();
    }

    fn end(&self, why: String) {
        let mut s = self.lock();
        if s.gone.is_none() {
            s.gone = Some(why);
        }
        drop(s);
        self.waker.wake();
    }

    /// How much may be sent now; Pending (woken on a WINDOW) when nothing.
    fn poll_avail(&self, cx: &mut Context<'_>) -> Poll<Result<u64, String>> {
        self.waker.register(cx.waker());
        let s = self.lock();
        if let Some(why) = &s.gone {
            return Poll::Ready(Err(why.clone()));
        }
        if s.avail > 0 {
            return Poll::Ready(Ok(s.avail));
        }
        Poll::Pending
    }

    fn take(&self, n: u64) {
        let mut s = self.lock();
        s.avail = s.avail.saturating_sub(n);
    }
}

/// The sending side of a session, shared by everything that talks on it.
#[derive(Clone)]
pub struct Mux {
    shared: Arc<Shared>,
}

struct Shared {
    role: Role,
    urgent: mpsc::UnboundedSender<Out>,
    bulk: mpsc::Sender<Out>,
    reg: mpsc::UnboundedSender<Reg>,
    next_id: AtomicU32,
    /// When the last frame came from the peer (ms since `epoch`).
    heard: std::sync::atomic::AtomicU64,
    epoch: std::time::Instant,
    /// Run once when the session ends, before its streams are reset; None
    /// once it has ended.
    at_end: Mutex<Option<Vec<EndHook>>>,
}

type EndHook = Box<dyn FnOnce() + Send>;

impl Mux {
    /// Queues a control message ahead of any bulk data.
    pub fn control(&self, c: Control) -> Result<(), Closed> {
        self.shared.urgent.send(Out::Frame(encode_control(&c))).map_err(|_| Closed)
    }

    /// Queues a control message as a PACKED (compressed) frame; only for
    /// a peer that asked for them.
    pub fn control_packed(&self, c: Control) -> Result<(), Closed> {
        self.shared.urgent.send(Out::Frame(protocol::encode_control_packed(&c))).map_err(|_| Closed)
    }

    /// Sends a batch and its whole archive as one frame (the archive at
    /// most [`CHUNK_SIZE`], so it delays nothing queued behind it more than
    /// a data chunk would).
    pub fn batch_with_archive(&self, batch: &Control, archive: &[u8]) -> Result<(), Closed> {
        debug_assert!(archive.len() <= CHUNK_SIZE);
        self.shared.urgent.send(Out::Frame(protocol::encode_batch(batch, archive))).map_err(|_| Closed)
    }

    /// Opens a stream whose two directions each have `window` bytes of
    /// flow control. Data may be written at once.
    pub fn open(&self, header: &StreamHeader, window: u32) -> Result<Stream, Closed> {
        let id = self.shared.next_id.fetch_add(2, Ordering::Relaxed);
        let (stream, slot) = Stream::new(id, window, self.clone());
        // Registered before the OPEN is queued, so before any answer to it
        // can be read (the reader takes registrations before each frame).
        self.shared.reg.send(Reg::Open(id, slot)).map_err(|_| Closed)?;
        let open = Frame::Open { stream: id, window, header: header.encode() }.encode();
        self.shared.urgent.send(Out::Frame(open)).map_err(|_| Closed)?;
        Ok(stream)
    }

    /// Sends a close frame (with a reason the peer shows) after what is
    /// queued, then stops the writer.
    pub fn close(&self, code: u16, reason: impl Into<String>) {
        let _ = self.shared.urgent.send(Out::Close(code, reason.into()));
    }

    /// Runs `f` when the session ends, before its streams are reset (at
    /// once if it has ended): what must be undone before the streams'
    /// owners hear of the end.
    pub fn at_end(&self, f: impl FnOnce() + Send + 'static) {
        let mut hooks = self.shared.at_end.lock().unwrap_or_else(|e| e.into_inner());
        match hooks.as_mut() {
            Some(v) => v.push(Box::new(f)),
            None => {
                drop(hooks);
                f();
            }
        }
    }

    /// True once the writer has stopped (the session is over).
    pub fn is_closed(&self) -> bool {
        self.shared.urgent.is_closed()
    }

    /// How long since the last frame came from the peer (its pings come
    /// every heartbeat interval, so this stays under one while it is there).
    pub fn silent_for(&self) -> Duration {
        let heard = self.shared.heard.load(Ordering::Relaxed);
        self.shared.epoch.elapsed().saturating_sub(Duration::from_millis(heard))
    }

    fn urgent(&self, frame: Vec<u8>) {
        let _ = self.shared.urgent.send(Out::Frame(frame));
    }
}

/// Starts the reader and writer tasks over an established connection
/// (after [`crate::handshake`]; `leftover` is what it read past its head).
pub fn spawn<S>(io: S, leftover: Vec<u8>, role: Role, hb: Heartbeat) -> (Mux, mpsc::Receiver<Incoming>)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (rd, wr) = tokio::io::split(io);
    let (urgent_tx, urgent_rx) = mpsc::unbounded_channel();
    let (bulk_tx, bulk_rx) = mpsc::channel(BULK_QUEUE);
    let (reg_tx, reg_rx) = mpsc::unbounded_channel();
    let (in_tx, in_rx) = mpsc::channel(256);
    let first_id = match role {
        Role::Client => 1,
        Role::Server => 2,
    };
    let mux = Mux {
        shared: Arc::new(Shared {
            role,
            urgent: urgent_tx,
            bulk: bulk_tx,
            reg: reg_tx,
            next_id: AtomicU32::new(first_id),
            heard: std::sync::atomic::AtomicU64::new(0),
            epoch: std::time::Instant::now(),
            at_end: Mutex::new(Some(Vec::new())),
        }),
    };
    tokio::spawn(write_loop(wr, urgent_rx, bulk_rx, hb));
    let reader = Reader {
        mux: mux.clone(),
        streams: HashMap::new(),
        peer_max: 0,
        peer_open: 0,
        in_tx,
        reg_rx,
        hb,
        buf: BytesMut::from(&leftover[..]),
    };
    tokio::spawn(reader.run(rd));
    (mux, in_rx)
}

/// Writes queued frames: urgent first, bulk after, pings on a timer.
async fn write_loop<W: AsyncWrite + Unpin>(
    wr: W,
    mut urgent: mpsc::UnboundedReceiver<Out>,
    mut bulk: mpsc::Receiver<Out>,
    hb: Heartbeat,
) {
    let mut w = tokio::io::BufWriter::with_capacity(256 << 10, wr);
    let mut ping = tokio::time::interval(hb.interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut bulk_open = true;
    'run: loop {
        let first = tokio::select! {
            biased;
            o = urgent.recv() => o.unwrap_or(Out::Close(close_code::NORMAL, String::new())),
            _ = ping.tick() => Out::Frame(Frame::Ping.encode()),
            b = bulk.recv(), if bulk_open => match b {
                Some(b) => b,
                None => { bulk_open = false; continue }
            },
        };
        // Whatever else is ready goes out in the same write, so the peer
        // wakes once. Urgent still goes first; a bound on the number of
        // items keeps the flush prompt.
        let mut item = Some(first);
        let mut n = 0;
        while let Some(o) = item.take() {
            let r = match o {
                Out::Frame(f) => w.write_all(&f).await,
                Out::Bulk(f, pending) => {
                    let r = write_frame(&mut w, &f).await;
                    pending.fetch_sub(1, Ordering::AcqRel);
                    r
                }
                Out::Close(code, reason) => {
                    let reason: String = reason.chars().take(200).collect();
                    let _ = w.write_all(&Frame::Close { code, reason }.encode()).await;
                    let _ = w.flush().await;
                    let _ = w.shutdown().await;
                    break 'run;
                }
            };
            if r.is_err() {
                break 'run;
            }
            n += 1;
            if n == 64 {
                break;
            }
            item = urgent.try_recv().ok().or_else(|| bulk.try_recv().ok());
        }
        if w.flush().await.is_err() {
            break;
        }
    }
    // Closed: frames still queued have nowhere to go.
    urgent.close();
    bulk.close();
}

/// A data chunk goes to the connection as it is, after what is buffered
/// ahead of it: copying 64 KiB into the buffer first would cost a copy of
/// every byte carried. Small frames are gathered, so the peer wakes once.
async fn write_frame<W: AsyncWrite + Unpin>(w: &mut tokio::io::BufWriter<W>, f: &[u8]) -> io::Result<()> {
    if f.len() < BYPASS {
        return w.write_all(f).await;
    }
    w.flush().await?;
    w.get_mut().write_all(f).await
}

/// Frames at least this large bypass the writer's buffer.
const BYPASS: usize = 16 << 10;

struct Reader {
    mux: Mux,
    streams: HashMap<u32, Slot>,
    /// The highest stream id the peer opened (ids only grow).
    peer_max: u32,
    /// Streams the peer opened that are still here.
    peer_open: usize,
    in_tx: mpsc::Sender<Incoming>,
    reg_rx: mpsc::UnboundedReceiver<Reg>,
    hb: Heartbeat,
    /// Bytes read and not yet parsed; its spare capacity is room to read
    /// into. A large data frame's payload is handed to its stream as a
    /// slice of this buffer, not copied out of it.
    buf: BytesMut,
}

/// Data payloads at least this large go to their stream as slices of the
/// read buffer; smaller ones are copied, so that a few bytes left unread
/// on an idle stream do not keep a whole read buffer alive.
const SLICE_MIN: usize = 8 << 10;

/// What handling a frame asks of the reader.
enum Next {
    Go,
    End(End),
}

impl Reader {
    async fn run<R: AsyncRead + Unpin>(mut self, mut rd: R) {
        let end = self.read_all(&mut rd).await;
        let hooks = self.mux.shared.at_end.lock().unwrap_or_else(|e| e.into_inner()).take();
        for f in hooks.into_iter().flatten() {
            f();
        }
        let why = format!("the session ended ({end})");
        for (_, s) in self.streams.drain() {
            let _ = s.to_reader.send(Recv::Reset(why.clone()));
            s.credit.end(why.clone());
        }
        // Streams registered but not yet seen end with the session too.
        self.reg_rx.close();
        while let Ok(r) = self.reg_rx.try_recv() {
            if let Reg::Open(_, s) = r {
                let _ = s.to_reader.send(Recv::Reset(why.clone()));
                s.credit.end(why.clone());
            }
        }
        let we_closed = matches!(end, End::Protocol(_));
        let _ = self.in_tx.send(Incoming::Ended(end)).await;
        if we_closed {
            // Our CLOSE says why. Closing with the peer's data unread would
            // reset the connection before the peer reads it: read on
            // (discarding) until the peer closes too, or a moment passes.
            let mut sink = vec![0u8; 64 << 10];
            let _ = tokio::time::timeout(CLOSE_LINGER, async {
                while matches!(rd.read(&mut sink).await, Ok(n) if n > 0) {}
            })
            .await;
        }
    }

    fn fail(&self, code: u16, message: String) -> End {
        self.mux.close(code, message.clone());
        End::Protocol(message)
    }

    async fn read_all<R: AsyncRead + Unpin>(&mut self, rd: &mut R) -> End {
        let mut deadline = tokio::time::Instant::now() + self.hb.dead_after;
        loop {
            // Every complete frame in the buffer.
            loop {
                let avail = &self.buf[..];
                if avail.len() < 4 {
                    break;
                }
                let len = u32::from_be_bytes([avail[0], avail[1], avail[2], avail[3]]) as usize;
                if len > MAX_MESSAGE {
                    let m = format!("frame of {len} bytes is larger than the limit of {MAX_MESSAGE} bytes");
                    return self.fail(close_code::TOO_BIG, m);
                }
                if avail.len() < 4 + len {
                    break;
                }
                let framed = self.buf.split_to(4 + len);
                self.take_registrations();
                // Tag, stream id, payload.
                let next = if framed[4] == protocol::TAG_DATA && len >= 5 + SLICE_MIN {
                    let stream = u32::from_be_bytes([framed[5], framed[6], framed[7], framed[8]]);
                    self.data(stream, framed.freeze().slice(9..), true)
                } else {
                    match Frame::decode(&framed[4..]) {
                        Ok(f) => self.handle(f).await,
                        Err(e) => return self.fail(close_code::PROTOCOL, e.to_string()),
                    }
                };
                if let Next::End(e) = next {
                    return e;
                }
            }
            // A large batch grew the buffer: give it back once idle.
            if self.buf.is_empty() && self.buf.capacity() > 4 * READ_CHUNK {
                self.buf = BytesMut::new();
            }
            // Room to read into. Where slices of the buffer are still out
            // with their streams, this takes a new one (and moves the few
            // bytes of a partial frame into it).
            if self.buf.capacity() - self.buf.len() < READ_CHUNK {
                self.buf.reserve(READ_CHUNK);
            }
            let read = tokio::select! {
                biased;
                r = self.reg_rx.recv() => {
                    if let Some(r) = r {
                        self.register(r);
                    }
                    continue;
                }
                r = rd.read_buf(&mut self.buf) => r,
                _ = tokio::time::sleep_until(deadline) => {
                    let end = End::Dead(self.hb.dead_after);
                    self.mux.close(close_code::SHUTDOWN, end.to_string());
                    return end;
                }
            };
            match read {
                Ok(0) => return End::Eof,
                Ok(_) => {
                    deadline = tokio::time::Instant::now() + self.hb.dead_after;
                    let s = &self.mux.shared;
                    s.heard.store(s.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return End::Eof,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return End::Eof,
                Err(e) => return End::Io(e.to_string()),
            }
        }
    }

    fn take_registrations(&mut self) {
        while let Ok(r) = self.reg_rx.try_recv() {
            self.register(r);
        }
    }

    fn register(&mut self, r: Reg) {
        match r {
            Reg::Open(id, slot) => {
                self.streams.insert(id, slot);
            }
            Reg::Forget(id) => {
                // Our direction is finished (a dropped writer sent FIN). If
                // the peer's is not, the slot stays until its FIN or RESET:
                // what it still sends is dropped and its window handed
                // back (see `data`), so it never waits on a reader that
                // is gone.
                if let Some(s) = self.streams.get_mut(&id) {
                    s.forgotten = true;
                    if s.fin_received {
                        self.forget(id);
                    }
                }
            }
        }
    }

    fn forget(&mut self, id: u32) {
        if self.streams.remove(&id).is_some() && self.is_peers(id) {
            self.peer_open -= 1;
        }
    }

    fn is_peers(&self, id: u32) -> bool {
        let ours_odd = self.mux.shared.role == Role::Client;
        (id % 2 == 1) != ours_odd
    }

    /// Is `id` one that was opened and has since gone (data for it may
    /// still be in flight), rather than one never opened?
    fn was_open(&self, id: u32) -> bool {
        if self.is_peers(id) {
            id <= self.peer_max
        } else {
            id < self.mux.shared.next_id.load(Ordering::Relaxed)
        }
    }

    async fn handle(&mut self, frame: Frame) -> Next {
        match frame {
            Frame::Control(c) => self.deliver(Incoming::Control(c)).await,
            Frame::Batch { control: control @ Control::Batch { .. }, archive } => {
                if archive.len() > CHUNK_SIZE {
                    let m = format!(
                        "a batch came with an archive of {} bytes in one frame; larger than {CHUNK_SIZE} bytes must be a stream",
                        archive.len()
                    );
                    return Next::End(self.fail(close_code::PROTOCOL, m));
                }
                self.deliver(Incoming::Batch { control, archive }).await
            }
            Frame::Batch { .. } => {
                let m = "only a batch may come with an archive".to_string();
                Next::End(self.fail(close_code::PROTOCOL, m))
            }
            Frame::Data { stream, bytes } => self.data(stream, Bytes::from(bytes), false),
            Frame::Open { stream, window, header } => self.open(stream, window, &header).await,
            Frame::Fin { stream } => {
                if let Some(s) = self.streams.get_mut(&stream) {
                    s.fin_received = true;
                    let _ = s.to_reader.send(Recv::Fin);
                    // Our halves may still be sending (and need WINDOWs):
                    // the slot goes only when they are gone too.
                    if s.forgotten {
                        self.forget(stream);
                    }
                }
                Next::Go
            }
            Frame::Reset { stream, reason } => {
                if let Some(s) = self.streams.get(&stream) {
                    let (to_reader, credit) = (s.to_reader.clone(), s.credit.clone());
                    self.forget(stream);
                    let why = if reason.is_empty() { "reset by the peer".to_string() } else { reason };
                    let s = (to_reader, credit);
                    let _ = s.0.send(Recv::Reset(why.clone()));
                    s.1.end(why);
                }
                Next::Go
            }
            Frame::Window { stream, bytes } => {
                if let Some(s) = self.streams.get(&stream) {
                    s.credit.add(bytes);
                }
                Next::Go
            }
            Frame::Ping => Next::Go,
            Frame::Close { code, reason } => Next::End(End::Closed { code, reason }),
        }
    }

    async fn deliver(&mut self, item: Incoming) -> Next {
        // Nobody listens any more: the session is over on this side.
        if self.in_tx.send(item).await.is_err() {
            return Next::End(End::Closed { code: close_code::NORMAL, reason: "closed by this side".into() });
        }
        Next::Go
    }

    /// Data for a stream; `slice`: a slice of the read buffer.
    fn data(&mut self, stream: u32, bytes: Bytes, slice: bool) -> Next {
        let Some(s) = self.streams.get_mut(&stream) else {
            if self.was_open(stream) {
                // Reset or forgotten meanwhile: what was in flight is dropped.
                return Next::Go;
            }
            return Next::End(
                self.fail(close_code::PROTOCOL, format!("data on stream {stream}, which was never opened")),
            );
        };
        let n = bytes.len() as i64;
        let left = s.budget.fetch_sub(n, Ordering::AcqRel) - n;
        if left < 0 {
            let m = format!("stream {stream}: the peer sent {} bytes past its window; it must wait for WINDOW", -left);
            return Next::End(self.fail(close_code::PROTOCOL, m));
        }
        if s.fin_received {
            return Next::End(self.fail(close_code::PROTOCOL, format!("stream {stream}: data after FIN")));
        }
        // A slice keeps the whole read buffer it is in alive: it goes only
        // to a reader that has taken everything before it (and takes this
        // at once). A reader that falls behind gets copies, so its backlog
        // holds its own bytes and no more.
        let behind = s.queued.fetch_add(1, Ordering::AcqRel) > 0;
        let bytes = if slice && behind { Bytes::copy_from_slice(&bytes) } else { bytes };
        if s.to_reader.send(Recv::Data(bytes)).is_err() {
            // The read half is gone: the data is dropped, and its room is
            // handed back, so the peer's writes go on.
            s.budget.fetch_add(n, Ordering::AcqRel);
            self.mux.urgent(Frame::Window { stream, bytes: n as u32 }.encode());
        }
        Next::Go
    }

    async fn open(&mut self, id: u32, window: u32, header: &[u8]) -> Next {
        if !self.is_peers(id) || id <= self.peer_max {
            let m = format!("stream {id} was opened twice, or by the wrong side");
            return Next::End(self.fail(close_code::PROTOCOL, m));
        }
        self.peer_max = id;
        let refuse = |why: String| {
            self.mux.urgent(Frame::Reset { stream: id, reason: why }.encode());
            Next::Go
        };
        if window == 0 || window > MAX_WINDOW {
            return refuse(format!("window {window} is out of range (1..={MAX_WINDOW})"));
        }
        if self.peer_open >= MAX_STREAMS {
            return refuse(format!("too many streams open (at most {MAX_STREAMS})"));
        }
        let header = match StreamHeader::parse(header) {
            Ok(h) => h,
            Err(why) => return refuse(why),
        };
        let (stream, slot) = Stream::new(id, window, self.mux.clone());
        self.streams.insert(id, slot);
        self.peer_open += 1;
        self.deliver(Incoming::Open(Accepted { header, stream })).await
    }
}

/// Sent when both halves of a stream are gone.
struct SlotGuard {
    id: u32,
    reg: mpsc::UnboundedSender<Reg>,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        let _ = self.reg.send(Reg::Forget(self.id));
    }
}

/// One stream: both halves. Dropping it closes our side (FIN); the peer's
/// side, if still open, is refused from then on (RESET).
pub struct Stream {
    r: StreamReader,
    w: StreamWriter,
}

/// The receiving half of a stream.
pub struct StreamReader {
    id: u32,
    rx: mpsc::UnboundedReceiver<Recv>,
    /// Shared with the stream's slot: data chunks not yet taken.
    queued: Arc<AtomicUsize>,
    cur: Bytes,
    pos: usize,
    /// Taken and not yet acknowledged with a WINDOW.
    unacked: u32,
    window: u32,
    budget: Arc<AtomicI64>,
    mux: Mux,
    eof: bool,
    error: Option<String>,
    /// Bytes handed on so far (read, or copied out).
    delivered: u64,
    _guard: Arc<SlotGuard>,
}

/// The sending half of a stream.
pub struct StreamWriter {
    id: u32,
    credit: Arc<Credit>,
    mux: Mux,
    bulk: PollSender<Out>,
    /// This stream's frames in the bulk queue.
    pending: Arc<AtomicUsize>,
    fin_sent: bool,
    /// Set once reset (by us): nothing more is sent.
    reset: Arc<AtomicBool>,
    _guard: Arc<SlotGuard>,
}

impl Stream {
    fn new(id: u32, window: u32, mux: Mux) -> (Stream, Slot) {
        let (tx, rx) = mpsc::unbounded_channel();
        let budget = Arc::new(AtomicI64::new(window as i64));
        let credit = Arc::new(Credit::new(window));
        let queued = Arc::new(AtomicUsize::new(0));
        let guard = Arc::new(SlotGuard { id, reg: mux.shared.reg.clone() });
        let slot = Slot {
            to_reader: tx,
            budget: budget.clone(),
            credit: credit.clone(),
            queued: queued.clone(),
            fin_received: false,
            forgotten: false,
        };
        let r = StreamReader {
            id,
            rx,
            queued: queued.clone(),
            cur: Bytes::new(),
            pos: 0,
            unacked: 0,
            window,
            budget,
            mux: mux.clone(),
            eof: false,
            error: None,
            delivered: 0,
            _guard: guard.clone(),
        };
        let w = StreamWriter {
            id,
            credit,
            bulk: PollSender::new(mux.shared.bulk.clone()),
            mux,
            pending: Arc::new(AtomicUsize::new(0)),
            fin_sent: false,
            reset: Arc::new(AtomicBool::new(false)),
            _guard: guard,
        };
        (Stream { r, w }, slot)
    }

    pub fn id(&self) -> u32 {
        self.r.id
    }

    pub fn into_split(self) -> (StreamReader, StreamWriter) {
        (self.r, self.w)
    }

    /// Aborts the stream both ways; the peer sees `reason`.
    pub fn reset(self, reason: &str) {
        self.w.reset(reason);
    }
}

impl StreamReader {
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Hands room back to the peer as data is taken, in quarter windows,
    /// so it rarely waits.
    /// Bytes this stream has handed on so far.
    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    fn consumed(&mut self, n: usize) {
        self.delivered += n as u64;
        self.unacked += n as u32;
        if self.unacked >= (self.window / 4).max(1) {
            self.budget.fetch_add(self.unacked as i64, Ordering::AcqRel);
            self.mux.urgent(Frame::Window { stream: self.id, bytes: self.unacked }.encode());
            self.unacked = 0;
        }
    }

    fn take(&mut self, item: Option<Recv>) {
        match item {
            Some(Recv::Data(v)) => {
                self.queued.fetch_sub(1, Ordering::AcqRel);
                self.cur = v;
                self.pos = 0;
            }
            Some(Recv::Fin) => self.eof = true,
            Some(Recv::Reset(why)) => self.error = Some(why),
            None => self.error = Some("the session ended".into()),
        }
    }

    fn failed(&self) -> Option<io::Error> {
        self.error.as_ref().map(|why| io::Error::new(io::ErrorKind::ConnectionReset, why.clone()))
    }

    /// Copies the rest of the stream into `w`, straight from the chunks as
    /// they came (no buffer in between). Returns the bytes copied; an
    /// error if the stream was reset or the session ended.
    pub async fn copy_to<W: AsyncWrite + Unpin>(&mut self, w: &mut W) -> io::Result<u64> {
        let mut total = 0u64;
        loop {
            if self.pos < self.cur.len() {
                let n = w.write(&self.cur[self.pos..]).await?;
                if n == 0 {
                    return Err(io::ErrorKind::WriteZero.into());
                }
                self.pos += n;
                total += n as u64;
                self.consumed(n);
                continue;
            }
            if self.eof {
                return Ok(total);
            }
            if let Some(e) = self.failed() {
                return Err(e);
            }
            let item = self.rx.recv().await;
            self.take(item);
        }
    }

    /// A `std::io::Read` for blocking threads (the apply thread reading an
    /// archive).
    pub fn blocking(self) -> BlockingReader {
        BlockingReader { inner: self }
    }
}

impl AsyncRead for StreamReader {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        loop {
            if me.pos < me.cur.len() {
                let n = buf.remaining().min(me.cur.len() - me.pos);
                buf.put_slice(&me.cur[me.pos..me.pos + n]);
                me.pos += n;
                me.consumed(n);
                return Poll::Ready(Ok(()));
            }
            if me.eof {
                return Poll::Ready(Ok(()));
            }
            if let Some(e) = me.failed() {
                return Poll::Ready(Err(e));
            }
            match me.rx.poll_recv(cx) {
                Poll::Ready(item) => me.take(item),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// The receiving half as a blocking `std::io::Read`.
pub struct BlockingReader {
    inner: StreamReader,
}

impl BlockingReader {
    /// Reads and discards the rest of the stream (so the sender is not left
    /// waiting for window after an error).
    pub fn drain(&mut self) {
        let mut sink = vec![0u8; CHUNK_SIZE];
        while matches!(io::Read::read(self, &mut sink), Ok(n) if n > 0) {}
    }
}

impl io::Read for BlockingReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let r = &mut self.inner;
        loop {
            if r.pos < r.cur.len() {
                let n = buf.len().min(r.cur.len() - r.pos);
                buf[..n].copy_from_slice(&r.cur[r.pos..r.pos + n]);
                r.pos += n;
                r.consumed(n);
                return Ok(n);
            }
            if r.eof {
                return Ok(0);
            }
            if let Some(e) = r.failed() {
                return Err(e);
            }
            let item = r.rx.blocking_recv();
            r.take(item);
        }
    }
}

impl StreamWriter {
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Aborts the stream both ways; the peer sees `reason`.
    pub fn reset(mut self, reason: &str) {
        self.reset.store(true, Ordering::Relaxed);
        self.fin_sent = true;
        self.credit.end(format!("reset: {reason}"));
        self.mux.urgent(Frame::Reset { stream: self.id, reason: reason.to_string() }.encode());
    }

    /// Queues one frame of this stream: ahead of bulk data when it is
    /// small and nothing of this stream waits in the bulk queue (so its
    /// order holds), else behind. Pending when the bulk queue is full.
    fn poll_queue(
        &mut self,
        cx: &mut Context<'_>,
        small: bool,
        frame: impl FnOnce() -> Vec<u8>,
    ) -> Poll<io::Result<()>> {
        if small && self.pending.load(Ordering::Acquire) == 0 {
            self.mux.urgent(frame());
            return Poll::Ready(Ok(()));
        }
        match self.bulk.poll_reserve(cx) {
            Poll::Ready(Ok(())) => {
                self.pending.fetch_add(1, Ordering::AcqRel);
                let item = Out::Bulk(frame(), self.pending.clone());
                if self.bulk.send_item(item).is_err() {
                    self.pending.fetch_sub(1, Ordering::AcqRel);
                    return Poll::Ready(Err(closed_io()));
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(_)) => Poll::Ready(Err(closed_io())),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Copies `r` into the stream to its end, reading each chunk straight
    /// into the frame that carries it: no buffer in between, so one copy
    /// less per byte than writing through [`AsyncWrite`]. Returns the bytes
    /// copied.
    pub async fn copy_from<R: AsyncRead + Unpin>(&mut self, r: &mut R) -> io::Result<u64> {
        let mut total = 0u64;
        // A frame read into and not sent (its data was small): reused.
        let mut spare: Option<Vec<u8>> = None;
        loop {
            if self.fin_sent {
                return Err(io::Error::new(io::ErrorKind::BrokenPipe, "write after shutdown or reset"));
            }
            let avail = std::future::poll_fn(|cx| self.credit.poll_avail(cx))
                .await
                .map_err(|why| io::Error::new(io::ErrorKind::ConnectionReset, why))?;
            let room = (avail as usize).min(CHUNK_SIZE);
            let mut frame = match spare.take() {
                Some(f) if f.capacity() - f.len() >= room => f,
                _ => protocol::data_frame_with_room(self.id, room),
            };
            let head = frame.len();
            // Read no more than the window allows, into the frame's room.
            let n = (&mut *r).take(room as u64).read_buf(&mut frame).await?;
            if n == 0 {
                return Ok(total);
            }
            // A small read (a request, an answer) goes in a frame of its
            // own size, and the large one is kept for the next read.
            let frame = if n <= SMALL_FRAME {
                let small = protocol::encode_data(self.id, &frame[head..]);
                frame.truncate(head);
                spare = Some(frame);
                small
            } else {
                protocol::seal_data(frame)
            };
            let mut frame = Some(frame);
            std::future::poll_fn(|cx| self.poll_queue(cx, n <= SMALL_FRAME, || frame.take().expect("queued once")))
                .await?;
            self.credit.take(n as u64);
            total += n as u64;
        }
    }

    /// A `std::io::Write` for blocking threads (a tar builder); needs the
    /// runtime handle to wait for window.
    pub fn blocking(self, rt: tokio::runtime::Handle) -> BlockingWriter {
        BlockingWriter { inner: Some(self), rt, buf: Vec::with_capacity(CHUNK_SIZE) }
    }
}

fn closed_io() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the connection to the peer closed")
}

impl AsyncWrite for StreamWriter {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if me.fin_sent {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "write after shutdown or reset")));
        }
        let avail = match me.credit.poll_avail(cx) {
            Poll::Ready(Ok(a)) => a,
            Poll::Ready(Err(why)) => return Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionReset, why))),
            Poll::Pending => return Poll::Pending,
        };
        let n = buf.len().min(CHUNK_SIZE).min(avail as usize);
        let id = me.id;
        match me.poll_queue(cx, n <= SMALL_FRAME, || protocol::encode_data(id, &buf[..n])) {
            Poll::Ready(Ok(())) => {
                me.credit.take(n as u64);
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Queued is sent: the writer task flushes as soon as it can.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if me.fin_sent {
            return Poll::Ready(Ok(()));
        }
        let id = me.id;
        match me.poll_queue(cx, true, || Frame::Fin { stream: id }.encode()) {
            Poll::Ready(r) => {
                me.fin_sent = true;
                Poll::Ready(r)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for StreamWriter {
    fn drop(&mut self) {
        if !self.fin_sent && !self.reset.load(Ordering::Relaxed) {
            // As a TCP close: what was written arrives, then the end. (The
            // FIN waits behind this stream's bulk data, if any, to keep its
            // order; the bulk queue is bounded, so it may have to go the
            // unbounded way with a small wait on the writer task.)
            let fin = Frame::Fin { stream: self.id }.encode();
            if self.pending.load(Ordering::Acquire) == 0 {
                self.mux.urgent(fin);
            } else if let Some(tx) = self.bulk.get_ref().cloned() {
                let pending = self.pending.clone();
                pending.fetch_add(1, Ordering::AcqRel);
                tokio::spawn(async move {
                    let _ = tx.send(Out::Bulk(fin, pending)).await;
                });
            }
        }
    }
}

/// The sending half as a blocking `std::io::Write`: buffers writes into
/// chunks and sends them, waiting for window as needed.
pub struct BlockingWriter {
    inner: Option<StreamWriter>,
    rt: tokio::runtime::Handle,
    buf: Vec<u8>,
}

impl BlockingWriter {
    fn send_buf(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let w = self.inner.as_mut().ok_or_else(closed_io)?;
        self.rt.block_on(w.write_all(&self.buf))?;
        self.buf.clear();
        Ok(())
    }

    /// Sends what is buffered and the end of the stream (FIN).
    pub fn finish(mut self) -> io::Result<()> {
        self.send_buf()?;
        let mut w = self.inner.take().ok_or_else(closed_io)?;
        self.rt.block_on(w.shutdown())
    }
}

impl io::Write for BlockingWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = CHUNK_SIZE - self.buf.len();
        let n = data.len().min(room);
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK_SIZE {
            self.send_buf()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_buf()
    }
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().r).poll_read(cx, buf)
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().w).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().w).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().w).poll_shutdown(cx)
    }
}

/// Carries a TCP connection over a stream, both ways, with half-close
/// passed on in each direction (EOF on one side is FIN on the other, and
/// the other way round). A reset of the stream drops the connection; a
/// failed connection resets the stream with its error. Returns the bytes
/// carried each way (to the connection, from it).
pub async fn splice(stream: Stream, tcp: tokio::net::TcpStream) -> (u64, u64) {
    let _ = tcp.set_nodelay(true);
    let (mut sr, mut sw) = stream.into_split();
    let (tr, mut tw) = tcp.into_split();
    let to_tcp = async move {
        let r = sr.copy_to(&mut tw).await;
        if r.is_ok() {
            let _ = tw.shutdown().await;
        }
        r
    };
    let from_tcp = async move {
        let mut tr = tr;
        let r = sw.copy_from(&mut tr).await;
        match &r {
            Ok(_) => {
                let _ = sw.shutdown().await;
            }
            Err(e) => sw.reset(&format!("the connection failed: {e}")),
        }
        r
    };
    tokio::pin!(to_tcp, from_tcp);
    // The first direction to fail ends both (returning drops the other
    // with its halves): a reset stream drops the connection, a failed
    // connection has reset the stream.
    let (mut a, mut b) = (None, None);
    loop {
        tokio::select! {
            r = &mut to_tcp, if a.is_none() => match r {
                Ok(n) => a = Some(n),
                Err(_) => return (0, b.unwrap_or(0)),
            },
            r = &mut from_tcp, if b.is_none() => match r {
                Ok(n) => b = Some(n),
                Err(_) => return (a.unwrap_or(0), 0),
            },
        }
        if let (Some(x), Some(y)) = (a, b) {
            return (x, y);
        }
    }
}

/// Raises this process's soft limit on open files to its hard limit (at
/// most 1 Mi): each stream that carries a connection holds a socket, and
/// many systems start processes with a soft limit of 1024.
pub fn raise_open_files_limit() {
    // SAFETY: getrlimit and setrlimit only read and write the struct
    // passed, which lives across the calls.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            let want = r.rlim_max.min(1 << 20);
            if r.rlim_cur < want {
                r.rlim_cur = want;
                libc::setrlimit(libc::RLIMIT_NOFILE, &r);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// Two ends of one session over an in-memory pipe.
    fn pair() -> ((Mux, mpsc::Receiver<Incoming>), (Mux, mpsc::Receiver<Incoming>)) {
        let (a, b) = tokio::io::duplex(256 << 10);
        let hb = Heartbeat { interval: Duration::from_secs(1), dead_after: Duration::from_secs(30) };
        (spawn(a, Vec::new(), Role::Client, hb), spawn(b, Vec::new(), Role::Server, hb))
    }

    /// Accepts every stream and echoes it back, FIN included.
    fn echo_all(mut rx: mpsc::Receiver<Incoming>) {
        tokio::spawn(async move {
            while let Some(Incoming::Open(a)) = rx.recv().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = a.stream.into_split();
                    r.copy_to(&mut w).await.unwrap();
                    w.shutdown().await.unwrap();
                });
            }
        });
    }

    async fn round(s: Stream, data: Vec<u8>) -> Vec<u8> {
        let (mut r, mut w) = s.into_split();
        let send = tokio::spawn(async move {
            w.write_all(&data).await.unwrap();
            w.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        send.await.unwrap();
        got
    }

    fn dial() -> StreamHeader {
        StreamHeader::Dial { host: "h".into(), port: 1 }
    }

    /// Either side opens streams (odd ids from the client, even from the
    /// server), and both carry data both ways, byte-exact.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn streams_open_from_either_side_and_carry_data_both_ways() {
        let ((client, crx), (server, srx)) = pair();
        echo_all(crx);
        echo_all(srx);
        let mut tasks = Vec::new();
        for i in 0..400u32 {
            let (from, window) = if i % 2 == 0 { (&client, 64 << 10) } else { (&server, 1 << 20) };
            let s = from.open(&dial(), window).unwrap();
            assert_eq!(s.id() % 2, if i % 2 == 0 { 1 } else { 0 }, "ids by side");
            let data: Vec<u8> = (0..(i as usize * 997) % 300_000).map(|k| (k as u32 * 31 + i) as u8).collect();
            tasks.push(tokio::spawn(async move { round(s, data.clone()).await == data }));
        }
        for t in tasks {
            assert!(tokio::time::timeout(Duration::from_secs(60), t).await.unwrap().unwrap());
        }
    }

    /// A writer whose own reading half is gone, on a stream the peer has
    /// already finished (FIN), still gets its window back: it must not
    /// stall after its first window.
    #[tokio::test]
    async fn a_writer_keeps_its_window_after_the_peers_fin_and_its_reader_is_gone() {
        let ((client, _crx), (_server, mut srx)) = pair();
        let s = client.open(&dial(), 16 << 10).unwrap();
        let (_, mut w) = s.into_split();
        let Some(Incoming::Open(a)) = srx.recv().await else { panic!("no open") };
        let (mut r, mut their_w) = a.stream.into_split();
        their_w.shutdown().await.unwrap();
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            r.read_to_end(&mut all).await.unwrap();
            all.len()
        });
        let data = vec![7u8; 40 * (16 << 10)];
        tokio::time::timeout(Duration::from_secs(20), async {
            w.write_all(&data).await.unwrap();
            w.shutdown().await.unwrap();
        })
        .await
        .expect("the writer never stalls");
        assert_eq!(reader.await.unwrap(), data.len());
    }

    /// A reset reaches the other side's reader and writer, with its reason.
    #[tokio::test]
    async fn a_reset_reaches_both_halves_with_its_reason() {
        let ((client, _crx), (_server, mut srx)) = pair();
        let s = client.open(&dial(), 16 << 10).unwrap();
        let Some(Incoming::Open(a)) = srx.recv().await else { panic!("no open") };
        s.reset("enough");
        let (mut r, mut w) = a.stream.into_split();
        let e = r.read_to_end(&mut Vec::new()).await.unwrap_err();
        assert!(e.to_string().contains("enough"), "{e}");
        let e = tokio::time::timeout(Duration::from_secs(5), w.write_all(b"late")).await.unwrap().unwrap_err();
        assert!(e.to_string().contains("enough"), "{e}");
    }
}
