//! devloop-agent's library: the wire protocol the CLI and the agent share,
//! and nothing the CLI does not need.
//!
//! - [`protocol`]: the frames and control messages (the wire format itself).
//! - [`paths`]: which paths may cross the wire; both sides enforce them.
//! - [`fault`]: fault injection for tests (debug builds only).
//! - [`index`]: the content index (path, kind, size, mode, hash) both sides
//!   build for the first sync of a session.
//! - [`transport`] (feature `transport`): one authenticated WebSocket over any
//!   byte stream, with heartbeats, control-before-data ordering and
//!   per-stream credit.
//!
//! The agent's runtime (`server`, `apply`, `run`) lives in the binary, behind
//! the default `agent` feature, which the CLI turns off.

pub mod fault;
pub mod index;
pub mod paths;
pub mod protocol;
#[cfg(feature = "transport")]
pub mod transport;

/// This crate's version, which is the agent's version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
