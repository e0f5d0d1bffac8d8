//! One WebSocket connection between the CLI and an agent, over any byte
//! stream (TCP, a child's stdio, an exec stream).
//!
//! - [`connect`] / [`accept`]: the upgrade carries the session token
//!   (`Authorization: Bearer`) and the protocol version
//!   (`Sec-WebSocket-Protocol`), so a wrong token or version is refused
//!   before any frame, with an HTTP status and a sentence saying why.
//! - [`spawn`] splits the socket into two tasks. The writer sends control
//!   messages before data chunks (biased), so a heartbeat or a small message
//!   never waits behind a large batch for more than one chunk. The reader
//!   declares the peer dead when nothing (not even a ping) arrived for
//!   [`Heartbeat::dead_after`].
//! - Data streams use credit: a sender may have [`STREAM_WINDOW`] bytes
//!   unacknowledged, so a slow consumer of one stream never makes the reader
//!   block, and never stalls heartbeats or other streams.

use crate::protocol::{self, Control, Frame, CHUNK_SIZE, MAX_MESSAGE, STREAM_WINDOW};
use futures_util::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, Semaphore};
use tokio_tungstenite::tungstenite::{
    self,
    client::IntoClientRequest,
    handshake::server::{ErrorResponse, Request, Response},
    http::{HeaderValue, StatusCode},
    protocol::{frame::coding::CloseCode, CloseFrame, Role, WebSocketConfig},
    Message,
};
use tokio_tungstenite::WebSocketStream;

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

/// WebSocket limits both sides use.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default().max_message_size(Some(MAX_MESSAGE)).max_frame_size(Some(MAX_MESSAGE))
}

/// Why the CLI could not open a session with an agent.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("the agent refused the session token (HTTP 401): the agent was started for another session; restart it, or check that {env} reaches it", env = protocol::TOKEN_ENV)]
    BadToken,
    #[error("protocol mismatch: {0}. Install the same version of devloop and devloop-agent")]
    Version(String),
    #[error("the agent refused the connection (HTTP {status}): {message}")]
    Rejected { status: u16, message: String },
    #[error("WebSocket handshake with the agent failed")]
    Handshake(#[source] tungstenite::Error),
}

/// Opens a session as the client (the CLI side).
/// Returns the socket and the agent's version.
pub async fn connect<S>(stream: S, token: &str) -> Result<(WebSocketStream<S>, String), ConnectError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // Parsing a constant URL cannot fail.
    let mut req = "ws://devloop-agent/".into_client_request().expect("static url");
    let h = req.headers_mut();
    let bearer = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| ConnectError::BadToken)?;
    h.insert("authorization", bearer);
    h.insert(
        "sec-websocket-protocol",
        HeaderValue::from_str(&protocol::subprotocol(protocol::PROTOCOL_VERSION)).expect("ascii"),
    );
    match tokio_tungstenite::client_async_with_config(req, stream, Some(ws_config())).await {
        Ok((ws, resp)) => {
            let v = resp
                .headers()
                .get(protocol::AGENT_VERSION_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("unknown")
                .to_string();
            Ok((ws, v))
        }
        Err(tungstenite::Error::Http(resp)) => {
            let status = resp.status().as_u16();
            let message =
                resp.body().as_ref().map(|b| String::from_utf8_lossy(b).trim().to_string()).unwrap_or_default();
            Err(match status {
                401 => ConnectError::BadToken,
                426 => ConnectError::Version(message),
                _ => ConnectError::Rejected { status, message },
            })
        }
        Err(e) => Err(ConnectError::Handshake(e)),
    }
}

/// Accepts a session as the agent. Refuses, with an HTTP error the client
/// shows to its user, a wrong token or protocol version.
pub async fn accept<S>(stream: S, token: &str, agent_version: &str) -> Result<WebSocketStream<S>, tungstenite::Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let ours = protocol::subprotocol(protocol::PROTOCOL_VERSION);
    // The callback's signature is tungstenite's; its error type is large by
    // design (an HTTP response).
    #[allow(clippy::result_large_err)]
    let check = |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        let reject = |status: StatusCode, msg: String| {
            let mut r = ErrorResponse::new(Some(msg + "\n"));
            *r.status_mut() = status;
            r
        };
        let given = req.headers().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("");
        let given = given.strip_prefix("Bearer ").unwrap_or("");
        if !constant_time_eq(given.as_bytes(), token.as_bytes()) {
            return Err(reject(StatusCode::UNAUTHORIZED, "wrong or missing session token".into()));
        }
        let offered: Vec<&str> = req
            .headers()
            .get_all("sec-websocket-protocol")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect();
        if !offered.contains(&ours.as_str()) {
            let theirs = offered.iter().find_map(|o| protocol::parse_subprotocol(o));
            let msg = match theirs {
                Some(v) => format!(
                    "this agent (devloop-agent {agent_version}) speaks protocol v{} and the client speaks v{v}",
                    protocol::PROTOCOL_VERSION
                ),
                None => format!(
                    "the client offered no devloop protocol; this agent (devloop-agent {agent_version}) speaks v{}",
                    protocol::PROTOCOL_VERSION
                ),
            };
            return Err(reject(StatusCode::UPGRADE_REQUIRED, msg));
        }
        let h = resp.headers_mut();
        h.insert("sec-websocket-protocol", HeaderValue::from_str(&ours).expect("ascii"));
        if let Ok(v) = HeaderValue::from_str(agent_version) {
            h.insert(protocol::AGENT_VERSION_HEADER, v);
        }
        Ok(resp)
    };
    tokio_tungstenite::accept_hdr_async_with_config(stream, check, Some(ws_config())).await
}

/// Wraps a stream that is already past the upgrade (tests of raw frames).
pub async fn from_raw<S>(stream: S, role: Role) -> WebSocketStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    WebSocketStream::from_raw_socket(stream, role, Some(ws_config())).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What the reader hands to the session, in arrival order.
#[derive(Debug)]
pub enum Incoming {
    Control(Control),
    Data {
        stream: u32,
        bytes: Vec<u8>,
    },
    /// A batch that came with its whole archive in one message.
    Batch {
        control: Control,
        archive: Vec<u8>,
    },
    /// Always the last item: how the connection ended.
    Ended(End),
}

/// How a connection ended.
#[derive(Debug, Clone, PartialEq)]
pub enum End {
    /// The peer closed it with a close frame.
    Closed { code: u16, reason: String },
    /// The byte stream ended without a close frame (peer killed, pipe closed).
    Eof,
    /// Nothing arrived for this long.
    Dead(Duration),
    /// The peer sent something that is not this protocol; we closed it.
    Protocol(String),
    /// The socket failed.
    Io(String),
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Closed { code, reason } if reason.is_empty() => {
                write!(f, "closed by peer (code {code})")
            }
            End::Closed { code, reason } => write!(f, "closed by peer (code {code}): {reason}"),
            End::Eof => write!(f, "connection ended without a close frame (peer exited or was killed)"),
            End::Dead(d) => write!(f, "no heartbeat for {:.1}s: peer is gone or stuck", d.as_secs_f64()),
            End::Protocol(m) => write!(f, "protocol error: {m}"),
            End::Io(m) => write!(f, "connection failed: {m}"),
        }
    }
}

enum Out {
    Control(Control),
    /// Pre-encoded messages written together (a small batch: its
    /// announcement, data and end marker).
    Group(Vec<Vec<u8>>),
    Data(Vec<u8>),
    Ping,
    Close(u16, String),
}

/// The sending half. Cheap to clone; every clone feeds the same writer.
#[derive(Clone)]
pub struct Outbound {
    ctl: mpsc::UnboundedSender<Out>,
    data: mpsc::Sender<Vec<u8>>,
}

/// The connection is gone; nothing more can be sent.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("connection closed")]
pub struct Closed;

impl Outbound {
    /// Queues a control message ahead of any data.
    pub fn control(&self, c: Control) -> Result<(), Closed> {
        self.ctl.send(Out::Control(c)).map_err(|_| Closed)
    }

    /// Sends a batch and its whole archive as one message (the archive at
    /// most [`CHUNK_SIZE`], so it delays nothing queued behind it more than
    /// a data chunk would).
    pub fn batch_with_archive(&self, batch: &Control, archive: &[u8]) -> Result<(), Closed> {
        debug_assert!(archive.len() <= CHUNK_SIZE);
        self.ctl.send(Out::Group(vec![protocol::encode_batch(batch, archive)])).map_err(|_| Closed)
    }

    /// Sends a control message and a whole small stream (announced by that
    /// message) in one write. Only for a fresh stream whose bytes fit its
    /// window ([`STREAM_WINDOW`]), so no credit is needed.
    pub fn control_with_stream(&self, c: Control, stream: u32, bytes: &[u8]) -> Result<(), Closed> {
        debug_assert!(bytes.len() <= STREAM_WINDOW as usize);
        let mut g = vec![Frame::Control(c).encode()];
        g.extend(bytes.chunks(CHUNK_SIZE).map(|c| protocol::encode_data(stream, c)));
        g.push(protocol::encode_data(stream, &[]));
        self.ctl.send(Out::Group(g)).map_err(|_| Closed)
    }

    /// Sends a close frame after what is queued, then stops the writer.
    pub fn close(&self, code: u16, reason: impl Into<String>) {
        let _ = self.ctl.send(Out::Close(code, reason.into()));
    }

    async fn raw_data(&self, stream: u32, bytes: &[u8]) -> Result<(), Closed> {
        self.data.send(protocol::encode_data(stream, bytes)).await.map_err(|_| Closed)
    }
}

/// Close codes used by devloop (4000-4999 is the private range).
pub mod close_code {
    pub const NORMAL: u16 = 1000;
    pub const PROTOCOL: u16 = 1002;
    pub const TOO_BIG: u16 = 1009;
    pub const SHUTDOWN: u16 = 1001;
}

/// Starts the reader and writer tasks for an established socket.
/// Returns the sending half and the stream of incoming items, which ends
/// with exactly one [`Incoming::Ended`].
pub fn spawn<S>(ws: WebSocketStream<S>, hb: Heartbeat) -> (Outbound, mpsc::Receiver<Incoming>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sink, mut stream) = ws.split();
    let (ctl_tx, mut ctl_rx) = mpsc::unbounded_channel::<Out>();
    // A few chunks of buffering: enough to keep the socket busy, small
    // enough that a control message never queues behind much data.
    let (data_tx, mut data_rx) = mpsc::channel::<Vec<u8>>(4);
    let (in_tx, in_rx) = mpsc::channel::<Incoming>(256);
    let out = Outbound { ctl: ctl_tx, data: data_tx };

    // Writer: control first, then data; pings on a timer.
    tokio::spawn(async move {
        let mut ping = tokio::time::interval(hb.interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        'run: loop {
            let first = tokio::select! {
                biased;
                c = ctl_rx.recv() => c.unwrap_or(Out::Close(close_code::NORMAL, String::new())),
                _ = ping.tick() => Out::Ping,
                d = data_rx.recv() => match d {
                    Some(d) => Out::Data(d),
                    // Every Outbound is gone (data and control close together).
                    None => continue,
                },
            };
            // Whatever else is ready goes out in the same write, so the peer
            // wakes once. Control still goes first; a bound on the number of
            // items keeps the flush prompt.
            let mut item = Some(first);
            let mut n = 0;
            while let Some(o) = item.take() {
                match to_messages(o) {
                    Ok(msgs) => {
                        for m in msgs {
                            if sink.feed(m).await.is_err() {
                                break 'run;
                            }
                        }
                    }
                    Err(close) => {
                        let _ = sink.send(Message::Close(Some(close))).await;
                        break 'run;
                    }
                }
                n += 1;
                if n == 32 {
                    break;
                }
                item = ctl_rx.try_recv().ok().or_else(|| data_rx.try_recv().ok().map(Out::Data));
            }
            if sink.flush().await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });

    // Reader: decode, hand over, watch for silence.
    let closer = out.clone();
    tokio::spawn(async move {
        let end = loop {
            let next = match tokio::time::timeout(hb.dead_after, stream.next()).await {
                Err(_) => {
                    let end = End::Dead(hb.dead_after);
                    closer.close(close_code::SHUTDOWN, end.to_string().chars().take(120).collect::<String>());
                    break end;
                }
                Ok(None) => break End::Eof,
                Ok(Some(Err(e))) => break read_error(e, &closer),
                Ok(Some(Ok(m))) => m,
            };
            let item = match next {
                Message::Binary(b) => match Frame::decode(&b) {
                    Ok(Frame::Control(c)) => Incoming::Control(c),
                    Ok(Frame::Data { stream, bytes }) => Incoming::Data { stream, bytes },
                    Ok(Frame::Batch { control, archive }) => Incoming::Batch { control, archive },
                    Err(e) => {
                        let m = e.to_string();
                        closer.close(close_code::PROTOCOL, truncate(&m, 120));
                        break End::Protocol(m);
                    }
                },
                Message::Text(_) => {
                    let m = "text frames are not part of the devloop protocol".to_string();
                    closer.close(close_code::PROTOCOL, m.clone());
                    break End::Protocol(m);
                }
                Message::Close(f) => {
                    break match f {
                        Some(f) => End::Closed { code: f.code.into(), reason: f.reason.to_string() },
                        None => End::Closed { code: close_code::NORMAL, reason: String::new() },
                    }
                }
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
            };
            if in_tx.send(item).await.is_err() {
                // The session is gone; nobody is listening.
                return;
            }
        };
        // (A dead peer reads nothing: no point waiting for it.)
        let we_closed = matches!(end, End::Protocol(_));
        let _ = in_tx.send(Incoming::Ended(end)).await;
        if we_closed {
            // Our close frame says why. Closing the socket with the peer's
            // data still unread would reset the connection, and the peer
            // would never read it: read on (discarding) until the peer
            // closes too, or a moment has passed.
            let _ = tokio::time::timeout(CLOSE_LINGER, async {
                while let Some(Ok(m)) = stream.next().await {
                    if matches!(m, Message::Close(_)) {
                        break;
                    }
                }
            })
            .await;
        }
    });
    (out, in_rx)
}

/// How long a side that closed for a protocol error keeps reading, so the
/// peer gets its close frame.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// What one queued item becomes on the wire; `Err` means close and stop.
fn to_messages(o: Out) -> Result<Vec<Message>, CloseFrame> {
    match o {
        Out::Control(c) => Ok(vec![Message::Binary(Frame::Control(c).encode().into())]),
        Out::Group(g) => Ok(g.into_iter().map(|m| Message::Binary(m.into())).collect()),
        Out::Data(d) => Ok(vec![Message::Binary(d.into())]),
        Out::Ping => Ok(vec![Message::Ping(Vec::new().into())]),
        Out::Close(code, reason) => Err(CloseFrame { code: CloseCode::from(code), reason: reason.into() }),
    }
}

fn read_error(e: tungstenite::Error, closer: &Outbound) -> End {
    use tungstenite::error::{CapacityError, ProtocolError};
    match e {
        tungstenite::Error::Capacity(CapacityError::MessageTooLong { size, max_size }) => {
            let m = format!("message of {size} bytes is larger than the limit of {max_size} bytes");
            closer.close(close_code::TOO_BIG, truncate(&m, 120));
            End::Protocol(m)
        }
        tungstenite::Error::Protocol(ProtocolError::ResetWithoutClosingHandshake) => End::Eof,
        tungstenite::Error::Protocol(p) => {
            let m = p.to_string();
            closer.close(close_code::PROTOCOL, truncate(&m, 120));
            End::Protocol(m)
        }
        tungstenite::Error::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => End::Eof,
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => End::Eof,
        e => End::Io(e.to_string()),
    }
}

fn truncate(s: &str, max: usize) -> String {
    // Close reasons must fit in a control frame (125 bytes).
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// Credit windows of the streams this side sends on, keyed by stream id.
/// Owned by the task that reads [`Incoming`], which feeds it
/// [`Control::Credit`] messages.
#[derive(Default)]
pub struct Credits {
    windows: HashMap<u32, Arc<Semaphore>>,
}

impl Credits {
    /// Opens a stream with a full window and returns its sender.
    pub fn open(&mut self, stream: u32, out: Outbound) -> StreamSender {
        let s = StreamSender::new(stream, out);
        self.register(&s);
        s
    }

    /// Registers a sender created elsewhere (so its creator need not wait
    /// for the task that owns this table).
    pub fn register(&mut self, s: &StreamSender) {
        self.windows.insert(s.stream, s.credit.clone());
    }

    /// Applies a credit message; unknown streams (already finished) are ignored.
    pub fn grant(&mut self, stream: u32, bytes: u32) {
        if let Some(s) = self.windows.get(&stream) {
            s.add_permits(bytes as usize);
        }
    }

    pub fn finish(&mut self, stream: u32) {
        self.windows.remove(&stream);
    }

    /// The connection ended: wake every sender waiting for credit with an
    /// error instead of leaving it waiting forever.
    pub fn close_all(&mut self) {
        for (_, s) in self.windows.drain() {
            s.close();
        }
    }
}

/// Sends one data stream within its credit window. Clones share the window.
#[derive(Clone)]
pub struct StreamSender {
    stream: u32,
    out: Outbound,
    credit: Arc<Semaphore>,
}

impl StreamSender {
    /// A sender with a full window; register it with [`Credits`].
    pub fn new(stream: u32, out: Outbound) -> StreamSender {
        StreamSender { stream, out, credit: Arc::new(Semaphore::new(STREAM_WINDOW as usize)) }
    }

    /// Sends bytes, cut into chunks, waiting for credit as needed.
    pub async fn send(&self, mut bytes: &[u8]) -> Result<(), Closed> {
        while !bytes.is_empty() {
            let n = bytes.len().min(CHUNK_SIZE);
            self.credit.acquire_many(n as u32).await.map_err(|_| Closed)?.forget();
            self.out.raw_data(self.stream, &bytes[..n]).await?;
            bytes = &bytes[n..];
        }
        Ok(())
    }

    /// Marks the end of the stream.
    pub async fn finish(self) -> Result<(), Closed> {
        self.out.raw_data(self.stream, &[]).await
    }

    /// A `std::io::Write` for blocking threads (e.g. a tar builder); needs
    /// the runtime handle to wait for credit.
    pub fn blocking_writer(self, rt: tokio::runtime::Handle) -> BlockingStreamWriter {
        BlockingStreamWriter { inner: Some(self), rt, buf: Vec::with_capacity(CHUNK_SIZE) }
    }
}

/// Buffers writes into chunks and sends them from a blocking thread.
pub struct BlockingStreamWriter {
    inner: Option<StreamSender>,
    rt: tokio::runtime::Handle,
    buf: Vec<u8>,
}

impl BlockingStreamWriter {
    fn send_buf(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let s = self.inner.as_ref().ok_or_else(closed_io)?;
        let buf = std::mem::take(&mut self.buf);
        self.rt.block_on(s.send(&buf)).map_err(|_| closed_io())?;
        self.buf = buf;
        self.buf.clear();
        Ok(())
    }

    /// Sends what is buffered and the end-of-stream marker.
    pub fn finish(mut self) -> std::io::Result<()> {
        self.send_buf()?;
        let s = self.inner.take().ok_or_else(closed_io)?;
        self.rt.block_on(s.finish()).map_err(|_| closed_io())
    }
}

fn closed_io() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::BrokenPipe, "connection to the agent closed")
}

impl std::io::Write for BlockingStreamWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let room = CHUNK_SIZE - self.buf.len();
        let n = data.len().min(room);
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK_SIZE {
            self.send_buf()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send_buf()
    }
}

/// The receiving end of one stream, as a blocking `std::io::Read`: chunks
/// arrive through a channel, and credit goes back as they are consumed.
pub struct BlockingStreamReader {
    stream: u32,
    rx: mpsc::UnboundedReceiver<Vec<u8>>,
    out: Outbound,
    /// Credit granted to the sender so far (beyond the first window): the
    /// session task checks the sender against it.
    granted: Arc<std::sync::atomic::AtomicU64>,
    cur: Vec<u8>,
    pos: usize,
    unacked: u32,
    done: bool,
}

impl BlockingStreamReader {
    /// Returns the reader, the sender the session task feeds with the
    /// stream's chunks (an empty chunk marks the end), and the credit the
    /// reader has granted so far. The channel is unbounded only because
    /// the feeder enforces the window: it refuses a sender that has more
    /// than [`STREAM_WINDOW`] beyond `granted` in flight.
    pub fn new(
        stream: u32,
        out: Outbound,
    ) -> (BlockingStreamReader, mpsc::UnboundedSender<Vec<u8>>, Arc<std::sync::atomic::AtomicU64>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let granted = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let r = BlockingStreamReader {
            stream,
            rx,
            out,
            granted: granted.clone(),
            cur: Vec::new(),
            pos: 0,
            unacked: 0,
            done: false,
        };
        (r, tx, granted)
    }

    /// Reads and discards the rest of the stream (so credit keeps flowing
    /// and the sender is not left waiting after an error).
    pub fn drain(&mut self) {
        let mut sink = [0u8; CHUNK_SIZE];
        while let Ok(n) = std::io::Read::read(self, &mut sink) {
            if n == 0 {
                break;
            }
        }
    }
}

impl std::io::Read for BlockingStreamReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.cur.len() {
            if self.done {
                return Ok(0);
            }
            match self.rx.blocking_recv() {
                Some(c) if c.is_empty() => self.done = true,
                Some(c) => {
                    // Grant credit as chunks are taken, in quarter windows,
                    // so the sender rarely waits.
                    self.unacked += c.len() as u32;
                    if self.unacked >= STREAM_WINDOW / 4 {
                        self.granted.fetch_add(self.unacked as u64, std::sync::atomic::Ordering::Relaxed);
                        let _ = self.out.control(Control::Credit { stream: self.stream, bytes: self.unacked });
                        self.unacked = 0;
                    }
                    self.cur = c;
                    self.pos = 0;
                }
                None => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "stream ended early: the connection closed",
                    ))
                }
            }
        }
        let n = buf.len().min(self.cur.len() - self.pos);
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}
