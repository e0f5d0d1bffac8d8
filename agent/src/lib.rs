//! devloop-agent's library: the wire protocol the CLI and the agent share,
//! and nothing the CLI does not need.
//!
//! - [`protocol`]: the frames, control messages and stream headers (the
//!   wire format itself).
//! - [`paths`]: which paths may cross the wire; both sides enforce them.
//! - [`index`]: the content index (path, kind, size, mode, hash) both sides
//!   build for the first sync of a session.
//! - [`hash_cache`]: the hashes an unchanged file need not be read for
//!   again, kept between scans.
//! - [`handshake`] (feature `transport`): opening a session, with the token
//!   and the protocol version checked before any frame.
//! - [`mux`] (feature `transport`): one connection carrying control
//!   messages and many streams both ways, with per-stream windows,
//!   half-close and reset, and urgent traffic ahead of bulk data.
//! - [`codec`] (feature `transport`): the zstd blocks a batch stream's
//!   archive travels in when both sides can.
//! - [`fault`]: fault injection for tests (debug builds only).
//!
//! The agent's runtime (`server`, `apply`, `run`) lives in the binary, behind
//! the default `agent` feature, which the CLI turns off.

#[cfg(feature = "transport")]
pub mod codec;
pub mod fault;
#[cfg(feature = "transport")]
pub mod handshake;
pub mod hash_cache;
pub mod index;
#[cfg(feature = "transport")]
pub mod mux;
pub mod paths;
pub mod protocol;

/// This crate's version, which is the agent's version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
