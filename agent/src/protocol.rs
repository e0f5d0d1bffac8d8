//! The wire format between the devloop CLI and devloop-agent.
//!
//! These types *are* the protocol. One WebSocket connection carries
//! everything; each binary WebSocket message is one [`Frame`]:
//!
//! ```text
//! 0x01 | JSON(Control)                 a control message
//! 0x02 | stream id (u32 BE) | bytes    a chunk of a data stream; empty = end
//! 0x03 | length (u32 BE) | JSON(Control) | archive
//!                                      a batch with its whole (small) archive
//! ```
//!
//! The third form carries a small batch in one message: an edit then costs
//! the agent one message to decode and hand over, not three (the batch, its
//! data, the end marker). Only a [`Control::Batch`] without a stream may
//! come this way, and the archive is at most [`CHUNK_SIZE`].
//!
//! Control messages are JSON so that adding an optional field is a safe
//! change; removing or renaming one, or changing a meaning, needs a new
//! [`PROTOCOL_VERSION`]. The version is negotiated in the WebSocket upgrade
//! (`Sec-WebSocket-Protocol: devloop.v<N>`), so mismatched peers fail before
//! any frame is exchanged, with a message that names both versions.

use crate::paths::WirePath;
use serde::{Deserialize, Serialize};

/// Bump on any incompatible change to [`Control`] or the frame layout.
/// v3: paths are bytes ([`WirePath`]: a string, or `{"hex": ...}`).
pub const PROTOCOL_VERSION: u32 = 3;
/// Environment variable that carries the session token to the agent.
pub const TOKEN_ENV: &str = "DEVLOOP_AGENT_TOKEN";
/// HTTP header on the upgrade request that carries the agent's version back.
pub const AGENT_VERSION_HEADER: &str = "x-devloop-agent-version";
/// Largest WebSocket message either side accepts. Data is sent in
/// [`CHUNK_SIZE`] pieces, so only a hostile or broken peer comes near it.
pub const MAX_MESSAGE: usize = 8 << 20;
/// Size of the data chunks streams are cut into. Small enough that a control
/// message queued behind one waits well under a millisecond on loopback.
pub const CHUNK_SIZE: usize = 64 << 10;
/// Bytes a receiver lets a sender have in flight on one stream before it
/// must wait for [`Control::Credit`].
pub const STREAM_WINDOW: u32 = 4 << 20;
/// Prefix of the temporary names the agent writes beside their targets.
pub const TEMP_PREFIX: &str = ".devloop-tmp-";

/// The WebSocket subprotocol name for a protocol version.
pub fn subprotocol(version: u32) -> String {
    format!("devloop.v{version}")
}

/// Parses `devloop.vN` back into N.
pub fn parse_subprotocol(s: &str) -> Option<u32> {
    s.trim().strip_prefix("devloop.v")?.parse().ok()
}

const TAG_CONTROL: u8 = 1;
const TAG_DATA: u8 = 2;
const TAG_BATCH: u8 = 3;

/// One decoded WebSocket message.
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
}

/// Why a frame could not be decoded. The connection is closed with this text.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FrameError {
    #[error("empty frame")]
    Empty,
    #[error("unknown frame tag {0:#04x} (is the peer a devloop of another version?)")]
    UnknownTag(u8),
    #[error("data frame shorter than its 5-byte header")]
    ShortData,
    #[error("batch frame shorter than its header and the control message it announces")]
    ShortBatch,
    #[error("control message is not valid: {0}")]
    BadControl(String),
}

impl Frame {
    /// Encodes the frame as one WebSocket binary message.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Frame::Control(c) => {
                let mut out = vec![TAG_CONTROL];
                // Serializing these plain types cannot fail: no maps with
                // non-string keys, no custom Serialize impls.
                serde_json::to_writer(&mut out, c).expect("control serializes");
                out
            }
            Frame::Data { stream, bytes } => encode_data(*stream, bytes),
            Frame::Batch { control, archive } => encode_batch(control, archive),
        }
    }

    /// Decodes one WebSocket binary message.
    pub fn decode(buf: &[u8]) -> Result<Frame, FrameError> {
        let (&tag, rest) = buf.split_first().ok_or(FrameError::Empty)?;
        match tag {
            TAG_CONTROL => {
                serde_json::from_slice(rest).map(Frame::Control).map_err(|e| FrameError::BadControl(e.to_string()))
            }
            TAG_DATA => {
                if rest.len() < 4 {
                    return Err(FrameError::ShortData);
                }
                let stream = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
                Ok(Frame::Data { stream, bytes: rest[4..].to_vec() })
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
            t => Err(FrameError::UnknownTag(t)),
        }
    }
}

/// Encodes a data chunk without building a [`Frame`] first.
pub fn encode_data(stream: u32, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + bytes.len());
    out.push(TAG_DATA);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(bytes);
    out
}

/// Encodes a batch with its archive without building a [`Frame`] first.
pub fn encode_batch(control: &Control, archive: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + archive.len());
    out.push(TAG_BATCH);
    out.extend_from_slice(&[0; 4]);
    // Serializing these plain types cannot fail (see `encode`).
    serde_json::to_writer(&mut out, control).expect("control serializes");
    let len = (out.len() - 5) as u32;
    out[1..5].copy_from_slice(&len.to_be_bytes());
    out.extend_from_slice(archive);
    out
}

/// Every control message, in both directions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Control {
    // ---- agent -> CLI ----
    /// First message of every session.
    Hello { agent_version: String, protocol: u32, root: String, pid: u32 },
    /// Part of the answer to [`Control::IndexRequest`]; `done` on the last.
    IndexPart { id: u64, entries: Vec<Entry>, done: bool },
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
    IndexRequest { id: u64, under: Vec<WirePath>, prune: Vec<WirePath> },
    /// Apply a batch: `deletes` first (in order), then the tar archive sent
    /// on `stream` (if any), then run `commands`, then restart the app when
    /// `restart` is set.
    Batch { id: u64, deletes: Vec<WirePath>, stream: Option<u32>, commands: Vec<CommandSpec>, restart: bool },
    /// Configure (and start, or restart when changed) the app process.
    AppConfigure { app: Option<AppSpec> },

    // ---- both ----
    /// The receiver of `stream` consumed `bytes` more; the sender may send
    /// that much more.
    Credit { stream: u32, bytes: u32 },
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

    #[test]
    fn control_round_trips() {
        let msgs = vec![
            Control::Hello { agent_version: "1.2.3".into(), protocol: 1, root: "/app".into(), pid: 7 },
            Control::Batch {
                id: 3,
                deletes: vec!["a/b".into()],
                stream: Some(9),
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
            },
            Control::Credit { stream: 1, bytes: 65536 },
            Control::Output { source: OutputSource::App, stream: StdStream::Stderr, line: "é".into() },
            Control::App { state: AppState::Exited { code: Some(3) } },
            Control::Error { code: ErrorCode::Request, message: "x".into(), fatal: false, request: Some(4) },
        ];
        for m in msgs {
            let f = Frame::Control(m);
            assert_eq!(Frame::decode(&f.encode()).unwrap(), f);
        }
    }

    #[test]
    fn data_round_trips_including_empty_end_marker() {
        for bytes in [vec![], vec![0u8; 5], (0..=255u8).collect::<Vec<_>>()] {
            let f = Frame::Data { stream: 0xdead_beef, bytes };
            assert_eq!(Frame::decode(&f.encode()).unwrap(), f);
        }
    }

    #[test]
    fn batch_with_archive_round_trips() {
        let control =
            Control::Batch { id: 4, deletes: vec!["gone".into()], stream: None, commands: vec![], restart: false };
        for archive in [vec![], vec![7u8; 3], (0..=255u8).collect::<Vec<_>>()] {
            let f = Frame::Batch { control: control.clone(), archive };
            assert_eq!(Frame::decode(&f.encode()).unwrap(), f);
        }
    }

    #[test]
    fn garbage_is_rejected_with_a_reason() {
        assert_eq!(Frame::decode(&[]), Err(FrameError::Empty));
        assert_eq!(Frame::decode(&[9, 1, 2]), Err(FrameError::UnknownTag(9)));
        assert_eq!(Frame::decode(&[2, 0, 0]), Err(FrameError::ShortData));
        assert!(matches!(Frame::decode(b"\x01{\"type\":\"nope\"}"), Err(FrameError::BadControl(_))));
        assert!(matches!(Frame::decode(b"\x01{\"type\":\"credit\""), Err(FrameError::BadControl(_))));
        // A batch frame: no room for its length, a length past the end, a
        // control message that is not JSON.
        assert_eq!(Frame::decode(&[3, 0, 0]), Err(FrameError::ShortBatch));
        assert_eq!(Frame::decode(&[3, 0, 0, 0, 9, b'{', b'}']), Err(FrameError::ShortBatch));
        assert!(matches!(Frame::decode(&[3, 0, 0, 0, 2, b'{', b'x', 1, 2]), Err(FrameError::BadControl(_))));
    }

    #[test]
    fn subprotocol_names_round_trip() {
        assert_eq!(parse_subprotocol(&subprotocol(7)), Some(7));
        assert_eq!(parse_subprotocol("chat"), None);
    }
}
