//! The wire format between the devloop CLI and devloop-agent.
//!
//! These types *are* the protocol. After an HTTP upgrade (see
//! `handshake`, which carries the session token and this version), one
//! byte stream carries everything as frames: a 4-byte big-endian length
//! (of what follows), a tag, and the tag's payload.
//!
//! ```text
//! 0x01 CONTROL  JSON(Control)                               a control message
//! 0x02 DATA     stream (u32) | bytes (not empty)            data on a stream
//! 0x03 BATCH    length (u32) | JSON(Control::Batch) | archive
//!                                                           a batch with its whole (small) archive
//! 0x04 OPEN     stream (u32) | window (u32) | JSON(StreamHeader)
//!                                                           a new stream, and what it is for
//! 0x05 FIN      stream (u32)                                no more data from this side
//! 0x06 RESET    stream (u32) | reason (UTF-8)               the stream is aborted, both ways
//! 0x07 WINDOW   stream (u32) | bytes (u32)                  the receiver took this much more
//! 0x08 PING                                                 (any frame proves the peer alive)
//! 0x09 CLOSE    code (u16) | reason (UTF-8)                 the session ends, and why
//! 0x0A PACKED   zstd(JSON(Control))                         a control message, compressed
//!                                                           (only to a peer that asked: an
//!                                                           index request with `packed`)
//! ```
//!
//! Streams: the side that opens one picks its id, odd for the CLI and even
//! for the agent, so ids never collide; data may follow an OPEN at once.
//! Each direction of a stream has its own window: a sender may have
//! `window` bytes (from the OPEN) beyond what the receiver acknowledged
//! with WINDOW frames in flight, and a receiver cuts off a peer that sends
//! more. FIN closes one direction (as TCP's half-close does); RESET both.
//!
//! The BATCH form carries a small batch in one frame: an edit then costs
//! the agent one frame to decode and hand over. Only a [`Control::Batch`]
//! may come this way, with an archive of at most [`CHUNK_SIZE`]; a larger
//! archive is a stream whose [`StreamHeader::Batch`] is the batch.
//!
//! Control messages and stream headers are JSON so that adding an optional
//! field is a safe change; removing or renaming one, changing a meaning,
//! or a new frame tag, needs a new [`PROTOCOL_VERSION`]. A stream header
//! of a kind the receiver does not know is refused (RESET), and the
//! session goes on. What only some agents do is negotiated instead: the
//! agent's hello lists its `features` (`zstd`: it reads compressed batch
//! streams and sends PACKED frames when asked), and the CLI uses a
//! feature only with an agent that lists it.

use crate::paths::WirePath;
use serde::{Deserialize, Serialize};

/// Bump on any incompatible change to [`Control`] or the frame layout.
/// v3: paths are bytes ([`WirePath`]: a string, or `{"hex": ...}`).
/// v4: the devloop framing replaces WebSocket; real streams.
pub const PROTOCOL_VERSION: u32 = 4;
/// Environment variable that carries the session token to the agent.
pub const TOKEN_ENV: &str = "DEVLOOP_AGENT_TOKEN";
/// HTTP header on the upgrade's answer that carries the agent's version.
pub const AGENT_VERSION_HEADER: &str = "x-devloop-agent-version";
/// Largest frame either side accepts. Data is sent in [`CHUNK_SIZE`]
/// pieces, so only a hostile or broken peer comes near it.
pub const MAX_MESSAGE: usize = 8 << 20;
/// Size of the data chunks streams are cut into. Small enough that a control
/// message queued behind one waits well under a millisecond on loopback.
pub const CHUNK_SIZE: usize = 64 << 10;
/// The window of a stream that carries a sync batch's archive.
pub const STREAM_WINDOW: u32 = 4 << 20;
/// The window of a stream that carries a TCP connection: enough to keep a
/// fast link busy, small enough that a thousand of them stay bounded.
pub const TCP_WINDOW: u32 = 256 << 10;
/// The largest window a receiver accepts in an OPEN.
pub const MAX_WINDOW: u32 = 16 << 20;
/// Prefix of the temporary names the agent writes beside their targets.
pub const TEMP_PREFIX: &str = ".devloop-tmp-";

/// The subprotocol name for a protocol version (in the upgrade request's
/// `Sec-WebSocket-Protocol`, where an agent of any version looks for it).
pub fn subprotocol(version: u32) -> String {
    format!("devloop.v{version}")
}

/// Parses `devloop.vN` back into N.
pub fn parse_subprotocol(s: &str) -> Option<u32> {
    s.trim().strip_prefix("devloop.v")?.parse().ok()
}

const TAG_CONTROL: u8 = 1;
pub(crate) const TAG_DATA: u8 = 2;
const TAG_BATCH: u8 = 3;
const TAG_OPEN: u8 = 4;
const TAG_FIN: u8 = 5;
const TAG_RESET: u8 = 6;
const TAG_WINDOW: u8 = 7;
const TAG_PING: u8 = 8;
const TAG_CLOSE: u8 = 9;
#[cfg(feature = "transport")]
const TAG_PACKED: u8 = 10;

/// One decoded frame (its length prefix already taken off).
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Control(Control),
    Data {
        stream: u32,
        bytes: Vec<u8>,
    },
    /// A batch and its whole archive (see the module's table).
    Batch {
        control: Control,
        archive: Vec<u8>,
    },
    /// `header` is the raw JSON: a kind the receiver does not know is
    /// refused without ending the session (see [`StreamHeader::parse`]).
    Open {
        stream: u32,
        window: u32,
        header: Vec<u8>,
    },
    Fin {
        stream: u32,
    },
    Reset {
        stream: u32,
        reason: String,
    },
    Window {
        stream: u32,
        bytes: u32,
    },
    Ping,
    Close {
        code: u16,
        reason: String,
    },
}

/// Why a frame could not be decoded. The connection is closed with this text.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FrameError {
    #[error("empty frame")]
    Empty,
    #[error("unknown frame tag {0:#04x} (is the peer a devloop of another version?)")]
    UnknownTag(u8),
    #[error("{0} frame shorter than its header")]
    Short(&'static str),
    #[error("batch frame shorter than its header and the control message it announces")]
    ShortBatch,
    #[error("control message is not valid: {0}")]
    BadControl(String),
    #[error("data frame with no data")]
    EmptyData,
    #[error("compressed control message does not unpack within {MAX_MESSAGE} bytes: {0}")]
    BadPacked(String),
}

/// The 4-byte length prefix plus the tag, before a payload.
fn start(tag: u8, payload_len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + payload_len);
    out.extend_from_slice(&((1 + payload_len) as u32).to_be_bytes());
    out.push(tag);
    out
}

/// Writes the length prefix of a frame built after [`start`].
fn finish(mut out: Vec<u8>) -> Vec<u8> {
    let len = (out.len() - 4) as u32;
    out[..4].copy_from_slice(&len.to_be_bytes());
    out
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

impl Frame {
    /// Encodes the frame, length prefix included.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Frame::Control(c) => encode_control(c),
            Frame::Data { stream, bytes } => encode_data(*stream, bytes),
            Frame::Batch { control, archive } => encode_batch(control, archive),
            Frame::Open { stream, window, header } => {
                let mut out = start(TAG_OPEN, 8 + header.len());
                out.extend_from_slice(&stream.to_be_bytes());
                out.extend_from_slice(&window.to_be_bytes());
                out.extend_from_slice(header);
                out
            }
            Frame::Fin { stream } => {
                let mut out = start(TAG_FIN, 4);
                out.extend_from_slice(&stream.to_be_bytes());
                out
            }
            Frame::Reset { stream, reason } => {
                let mut out = start(TAG_RESET, 4 + reason.len());
                out.extend_from_slice(&stream.to_be_bytes());
                out.extend_from_slice(reason.as_bytes());
                out
            }
            Frame::Window { stream, bytes } => {
                let mut out = start(TAG_WINDOW, 8);
                out.extend_from_slice(&stream.to_be_bytes());
                out.extend_from_slice(&bytes.to_be_bytes());
                out
            }
            Frame::Ping => start(TAG_PING, 0),
            Frame::Close { code, reason } => {
                let mut out = start(TAG_CLOSE, 2 + reason.len());
                out.extend_from_slice(&code.to_be_bytes());
                out.extend_from_slice(reason.as_bytes());
                out
            }
        }
    }

    /// Decodes one frame's tag and payload (the length prefix taken off).
    pub fn decode(buf: &[u8]) -> Result<Frame, FrameError> {
        let (&tag, rest) = buf.split_first().ok_or(FrameError::Empty)?;
        let need = |n: usize, what| if rest.len() < n { Err(FrameError::Short(what)) } else { Ok(()) };
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        match tag {
            TAG_CONTROL => {
                serde_json::from_slice(rest).map(Frame::Control).map_err(|e| FrameError::BadControl(e.to_string()))
            }
            TAG_DATA => {
                need(4, "data")?;
                if rest.len() == 4 {
                    return Err(FrameError::EmptyData);
                }
                Ok(Frame::Data { stream: be32(rest), bytes: rest[4..].to_vec() })
            }
            TAG_BATCH => {
                let (len, rest) = rest.split_first_chunk::<4>().ok_or(FrameError::ShortBatch)?;
                let len = u32::from_be_bytes(*len) as usize;
                if rest.len() < len {
                    return Err(FrameError::ShortBatch);
                }
                let (json, archive) = rest.split_at(len);
                let control = serde_json::from_slice(json).map_err(|e| FrameError::BadControl(e.to_string()))?;
                Ok(Frame::Batch { control, archive: archive.to_vec() })
            }
            TAG_OPEN => {
                need(8, "open")?;
                Ok(Frame::Open { stream: be32(rest), window: be32(&rest[4..]), header: rest[8..].to_vec() })
            }
            TAG_FIN => {
                need(4, "fin")?;
                Ok(Frame::Fin { stream: be32(rest) })
            }
            TAG_RESET => {
                need(4, "reset")?;
                Ok(Frame::Reset { stream: be32(rest), reason: text(&rest[4..]) })
            }
            TAG_WINDOW => {
                need(8, "window")?;
                Ok(Frame::Window { stream: be32(rest), bytes: be32(&rest[4..]) })
            }
            #[cfg(feature = "transport")]
            TAG_PACKED => {
                let json =
                    zstd::bulk::decompress(rest, MAX_MESSAGE).map_err(|e| FrameError::BadPacked(e.to_string()))?;
                serde_json::from_slice(&json).map(Frame::Control).map_err(|e| FrameError::BadControl(e.to_string()))
            }
            TAG_PING => Ok(Frame::Ping),
            TAG_CLOSE => {
                need(2, "close")?;
                Ok(Frame::Close { code: u16::from_be_bytes([rest[0], rest[1]]), reason: text(&rest[2..]) })
            }
            t => Err(FrameError::UnknownTag(t)),
        }
    }
}

/// Encodes a control message without building a [`Frame`] first.
pub fn encode_control(c: &Control) -> Vec<u8> {
    let mut out = start(TAG_CONTROL, 128);
    // Serializing these plain types cannot fail: no maps with non-string
    // keys, no custom Serialize impls that fail.
    serde_json::to_writer(&mut out, c).expect("control serializes");
    finish(out)
}

/// Encodes a control message as a PACKED frame: large answers (an index
/// part is about 256 KiB of JSON) shrink 5-8x for a slow link.
#[cfg(feature = "transport")]
pub fn encode_control_packed(c: &Control) -> Vec<u8> {
    // Serializing cannot fail (see `encode_control`); compressing into a
    // Vec only fails on allocation.
    let json = serde_json::to_vec(c).expect("control serializes");
    let packed = zstd::bulk::compress(&json, 1).expect("zstd compresses into memory");
    let mut out = start(TAG_PACKED, packed.len());
    out.extend_from_slice(&packed);
    out
}

/// Encodes a data chunk without building a [`Frame`] first.
pub fn encode_data(stream: u32, bytes: &[u8]) -> Vec<u8> {
    let mut out = start(TAG_DATA, 4 + bytes.len());
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(bytes);
    out
}

/// A data frame's head for `stream`, with room for `room` bytes of data:
/// the data is read straight into it, then [`seal_data`] sets its length.
pub fn data_frame_with_room(stream: u32, room: usize) -> Vec<u8> {
    let mut out = start(TAG_DATA, 4 + room);
    out.extend_from_slice(&stream.to_be_bytes());
    out
}

/// Sets the length of a frame from [`data_frame_with_room`] to the data
/// it holds.
pub fn seal_data(frame: Vec<u8>) -> Vec<u8> {
    finish(frame)
}

/// Encodes a batch with its archive without building a [`Frame`] first.
pub fn encode_batch(control: &Control, archive: &[u8]) -> Vec<u8> {
    let mut out = start(TAG_BATCH, 4 + 256 + archive.len());
    out.extend_from_slice(&[0; 4]);
    // Serializing these plain types cannot fail (see `encode_control`).
    serde_json::to_writer(&mut out, control).expect("control serializes");
    let len = (out.len() - 9) as u32;
    out[5..9].copy_from_slice(&len.to_be_bytes());
    out.extend_from_slice(archive);
    finish(out)
}

/// What a stream is for: sent in its OPEN, so the receiver knows what to do
/// with it before any data comes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StreamHeader {
    /// A batch whose tar archive is the stream's data (CLI → agent):
    /// `deletes` first, then the archive, then `commands`, then the app's
    /// restart when `restart` is set.
    ///
    /// `encoding`: how the archive travels; none: as it is. The CLI asks
    /// for an encoding only when the agent's hello lists it.
    Batch {
        id: u64,
        deletes: Vec<WirePath>,
        commands: Vec<CommandSpec>,
        restart: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        encoding: Option<Encoding>,
    },
    /// Connect to `host:port` from the agent's side and carry that
    /// connection (CLI → agent).
    Dial { host: String, port: u16 },
    /// A connection the agent accepted on an intercepted `port`, from
    /// `peer` (agent → CLI).
    Inbound { port: u16, peer: String },
}

/// How a batch stream's archive is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    /// In zstd blocks (see `codec`).
    Zstd,
}

/// One intercepted port, as the agent serves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterceptPort {
    /// The port's number for people and events (the Service's port).
    pub port: u16,
    /// Where the agent listens (`ip:port`): the claim port the forwarder
    /// tries first, on loopback.
    pub listen: String,
    /// Where a connection that is not devloop's goes (`ip:port`): the
    /// app's own port. None: such a connection is closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
}

/// A personal intercept's header: only the HTTP/1.1 requests that carry it
/// (name matched without case, value exactly) go to the developer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeaderMatch {
    pub name: String,
    pub value: String,
}

impl StreamHeader {
    /// Parses a header from an OPEN; an unknown kind is an error that says
    /// which (the stream is refused, the session goes on).
    pub fn parse(raw: &[u8]) -> Result<StreamHeader, String> {
        serde_json::from_slice(raw).map_err(|e| {
            let kind = serde_json::from_slice::<serde_json::Value>(raw)
                .ok()
                .and_then(|v| v.get("kind").and_then(|k| k.as_str()).map(String::from));
            match kind {
                Some(k) => format!("stream kind `{k}` is not known here ({e}; is the peer a newer devloop?)"),
                None => format!("stream header is not valid: {e}"),
            }
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        // Plain data: serializing cannot fail.
        serde_json::to_vec(self).expect("header serializes")
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Every control message, in both directions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Control {
    // ---- agent -> CLI ----
    /// First message of every session.
    /// `features`: what this agent can do beyond the protocol version's
    /// baseline (`zstd`: batch streams in zstd blocks).
    Hello {
        agent_version: String,
        protocol: u32,
        root: String,
        pid: u32,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        features: Vec<String>,
    },
    /// Part of the answer to [`Control::IndexRequest`]; `done` on the last,
    /// which says how many files' hashes came from the agent's cache (not
    /// read).
    IndexPart {
        id: u64,
        entries: Vec<Entry>,
        done: bool,
        #[serde(default, skip_serializing_if = "is_zero")]
        reused: u64,
    },
    /// A batch has landed: every file in it is either fully written or
    /// listed in `errors`.
    Applied { id: u64, written: u64, deleted: u64, bytes: u64, errors: Vec<PathError>, apply_us: u64 },
    /// A post-sync command started.
    CommandStarted { batch: u64, command: String },
    /// A post-sync command ended. `code` is None when killed by a signal.
    CommandExited { batch: u64, command: String, code: Option<i32>, ms: u64 },
    /// One line of output from a post-sync command or the app.
    Output { source: OutputSource, stream: StdStream, line: String },
    /// The app process changed state.
    App { state: AppState },
    /// Something went wrong. `fatal` errors are followed by a close.
    Error {
        code: ErrorCode,
        message: String,
        fatal: bool,
        /// The request (index id) this error answers, if it answers one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request: Option<u64>,
    },

    // ---- CLI -> agent ----
    /// Index the trees under these root-relative directories ("" = root),
    /// not descending into `prune`.
    /// `packed`: answer in PACKED frames (the CLI asks when the agent's
    /// hello lists `zstd` and the link is a network).
    IndexRequest {
        id: u64,
        under: Vec<WirePath>,
        prune: Vec<WirePath>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        packed: bool,
    },
    /// Apply a batch: `deletes` first (in order), then the tar archive that
    /// comes with it in a BATCH frame (if it does), then run `commands`,
    /// then restart the app when `restart` is set. (A batch with a larger
    /// archive is a stream: [`StreamHeader::Batch`].)
    Batch { id: u64, deletes: Vec<WirePath>, commands: Vec<CommandSpec>, restart: bool },
    /// Configure (and start, or restart when changed) the app process.
    AppConfigure { app: Option<AppSpec> },
    /// Restart the app process now.
    AppRestart {},
    /// Take the intercept: listen on each port's `listen` address and carry
    /// every connection there to the CLI as an [`StreamHeader::Inbound`]
    /// stream, or, with `header`, only the HTTP/1.1 requests that carry it
    /// (the rest go to the port's `app`). Replaces any intercept the
    /// session holds. Held while the CLI is heard from within `lease_ms`:
    /// past that, the agent ends the session, and with it the intercept.
    Intercept { ports: Vec<InterceptPort>, header: Option<HeaderMatch>, lease_ms: u64 },
    /// Release the intercept.
    InterceptStop {},
    /// Ask for the agent's environment (the container's, as the app sees
    /// it; the session token is not in it).
    EnvRequest { id: u64 },

    // ---- agent -> CLI (answers) ----
    /// The intercept is held: listening on these addresses.
    InterceptHeld { listening: Vec<String> },
    /// The intercept could not be taken (a port in use, say).
    InterceptFailed { message: String },
    /// The answer to [`Control::EnvRequest`].
    Env { id: u64, vars: Vec<(String, String)> },
}

/// One path in an index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Root-relative, `/`-separated.
    pub path: WirePath,
    pub kind: EntryKind,
    /// File size in bytes; 0 for directories and symlinks.
    pub size: u64,
    /// Permission bits (`mode & 0o777`).
    pub mode: u32,
    /// xxh3-64 of the content; 0 for directories and symlinks.
    pub hash: u64,
    /// Symlink target, as stored in the link.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<WirePath>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
}

/// A path the agent could not apply, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathError {
    pub path: WirePath,
    pub message: String,
}

/// A post-sync command: `shell` runs through `sh -c`, `argv` runs directly
/// (for images with no shell).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CommandSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub argv: Vec<String>,
    /// Root-relative working directory ("" = root).
    #[serde(default)]
    pub workdir: String,
}

impl CommandSpec {
    /// How the command is shown to people.
    pub fn display(&self) -> String {
        match &self.shell {
            Some(s) => s.clone(),
            None => self.argv.join(" "),
        }
    }
}

/// The app process the agent runs and restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppSpec {
    pub command: CommandSpec,
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// How long the app gets between SIGTERM and SIGKILL.
    #[serde(default = "default_grace_ms")]
    pub grace_ms: u64,
}

fn default_grace_ms() -> u64 {
    2000
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum OutputSource {
    Command { batch: u64, command: String },
    App,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StdStream {
    Stdout,
    Stderr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum AppState {
    Started { pid: u32 },
    Exited { code: Option<i32> },
    FailedToStart { message: String },
    Stopped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The peer sent something that is not this protocol.
    Protocol,
    /// A request could not be carried out (e.g. the index walk failed).
    Request,
    /// The agent is shutting down.
    Shutdown,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes an encoded frame (taking its length prefix off, after
    /// checking it).
    fn round(f: &Frame) -> Frame {
        let b = f.encode();
        assert_eq!(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize, b.len() - 4, "{f:?}");
        Frame::decode(&b[4..]).unwrap()
    }

    #[test]
    fn control_round_trips() {
        let msgs = vec![
            Control::Hello {
                agent_version: "1.2.3".into(),
                protocol: 1,
                root: "/app".into(),
                pid: 7,
                features: vec!["zstd".into()],
            },
            Control::Batch {
                id: 3,
                deletes: vec!["a/b".into()],
                commands: vec![CommandSpec { shell: Some("npm i".into()), argv: vec![], workdir: String::new() }],
                restart: true,
            },
            Control::IndexPart {
                id: 1,
                entries: vec![Entry {
                    path: "l".into(),
                    kind: EntryKind::Symlink,
                    size: 0,
                    mode: 0o777,
                    hash: 0,
                    link: Some("x".into()),
                }],
                done: true,
                reused: 3,
            },
            Control::Output { source: OutputSource::App, stream: StdStream::Stderr, line: "é".into() },
            Control::App { state: AppState::Exited { code: Some(3) } },
            Control::Error { code: ErrorCode::Request, message: "x".into(), fatal: false, request: Some(4) },
        ];
        for m in msgs {
            let f = Frame::Control(m);
            assert_eq!(round(&f), f);
        }
    }

    #[test]
    fn stream_frames_round_trip() {
        let header = StreamHeader::Dial { host: "10.0.0.1".into(), port: 8080 }.encode();
        let frames = vec![
            Frame::Data { stream: 0xdead_beef, bytes: vec![1] },
            Frame::Data { stream: 7, bytes: (0..=255u8).collect() },
            Frame::Open { stream: 3, window: TCP_WINDOW, header },
            Frame::Fin { stream: 5 },
            Frame::Reset { stream: 6, reason: "connection refused".into() },
            Frame::Window { stream: 9, bytes: 65536 },
            Frame::Ping,
            Frame::Close { code: 1002, reason: "bad".into() },
        ];
        for f in frames {
            assert_eq!(round(&f), f);
        }
    }

    #[test]
    fn batch_with_archive_round_trips() {
        let control = Control::Batch { id: 4, deletes: vec!["gone".into()], commands: vec![], restart: false };
        for archive in [vec![], vec![7u8; 3], (0..=255u8).collect::<Vec<_>>()] {
            let f = Frame::Batch { control: control.clone(), archive };
            assert_eq!(round(&f), f);
        }
    }

    #[test]
    fn stream_headers_parse_and_unknown_kinds_say_which() {
        let h = StreamHeader::Dial { host: "h".into(), port: 1 };
        assert_eq!(StreamHeader::parse(&h.encode()).unwrap(), h);
        let e = StreamHeader::parse(br#"{"kind":"teleport","to":"mars"}"#).unwrap_err();
        assert!(e.contains("stream kind `teleport` is not known here"), "{e}");
        let e = StreamHeader::parse(b"nope").unwrap_err();
        assert!(e.contains("not valid"), "{e}");
    }

    #[test]
    fn garbage_is_rejected_with_a_reason() {
        assert_eq!(Frame::decode(&[]), Err(FrameError::Empty));
        assert_eq!(Frame::decode(&[0x42, 1, 2]), Err(FrameError::UnknownTag(0x42)));
        assert_eq!(Frame::decode(&[2, 0, 0]), Err(FrameError::Short("data")));
        assert_eq!(Frame::decode(&[2, 0, 0, 0, 1]), Err(FrameError::EmptyData));
        assert_eq!(Frame::decode(&[4, 0, 0, 0, 1, 0]), Err(FrameError::Short("open")));
        assert_eq!(Frame::decode(&[7, 0, 0, 0, 1]), Err(FrameError::Short("window")));
        assert!(matches!(Frame::decode(b"\x01{\"type\":\"nope\"}"), Err(FrameError::BadControl(_))));
        assert!(matches!(Frame::decode(b"\x01{\"type\":\"hello\""), Err(FrameError::BadControl(_))));
        // A batch frame: no room for its length, a length past the end, a
        // control message that is not JSON.
        assert_eq!(Frame::decode(&[3, 0, 0]), Err(FrameError::ShortBatch));
        assert_eq!(Frame::decode(&[3, 0, 0, 0, 9, b'{', b'}']), Err(FrameError::ShortBatch));
        assert!(matches!(Frame::decode(&[3, 0, 0, 0, 2, b'{', b'x', 1, 2]), Err(FrameError::BadControl(_))));
    }

    /// A packed index part is a fraction of its JSON and decodes to the
    /// same message; one that would unpack past the frame limit, or is not
    /// zstd, is refused with a reason.
    #[cfg(feature = "transport")]
    #[test]
    fn packed_control_round_trips_and_bombs_are_refused() {
        let entries: Vec<Entry> = (0..2000)
            .map(|i| Entry {
                path: format!("src/pkg{:03}/mod{:02}/f{i}.rs", i % 300, i % 20).into(),
                kind: EntryKind::File,
                size: 1000 + i,
                mode: 0o644,
                hash: 0x9e3779b97f4a7c15u64.wrapping_mul(i + 1),
                link: None,
            })
            .collect();
        let part = Control::IndexPart { id: 3, entries, done: true, reused: 0 };
        let (plain, packed) = (encode_control(&part), encode_control_packed(&part));
        assert!(packed.len() * 3 < plain.len(), "{} -> {}", plain.len(), packed.len());
        assert_eq!(Frame::decode(&packed[4..]), Ok(Frame::Control(part)));

        let huge = zstd::bulk::compress(&vec![b' '; MAX_MESSAGE + 1], 1).unwrap();
        let bad = |payload: &[u8]| Frame::decode(&[&[TAG_PACKED], payload].concat());
        assert!(matches!(bad(&huge), Err(FrameError::BadPacked(_))));
        assert!(matches!(bad(b"not zstd"), Err(FrameError::BadPacked(_))));
        let not_json = zstd::bulk::compress(b"{nope", 1).unwrap();
        assert!(matches!(bad(&not_json), Err(FrameError::BadControl(_))));
    }

    #[test]
    fn subprotocol_names_round_trip() {
        assert_eq!(parse_subprotocol(&subprotocol(7)), Some(7));
        assert_eq!(parse_subprotocol("chat"), None);
    }
}
