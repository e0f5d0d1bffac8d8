//! devloop: the inner loop for Kubernetes developers.
//!
//! How a change travels, and where each step lives:
//!
//! ```text
//! devloop.yaml ─► config ─► session (one per service: start agent, sync, reconnect)
//!                              │
//! source tree ─► watch ─► filter ─► sync (engine: model of the target, dirty
//!                                    │    paths compared by content, batches)
//!                                    ▼
//!                        link (the CLI end of one agent session)
//!                                    │  WebSocket over the target's stream
//!                        target (local child | exec command | kubernetes)
//!                                    ▼
//!                        devloop-agent (agent/): apply, run, tunnel
//! ```
//!
//! Everything reports through [`events`]; front-ends (plain lines, NDJSON)
//! only print what they receive. The wire protocol lives in the agent's
//! library (`devloop_agent::protocol`) so the two sides cannot disagree.

pub mod client;
pub mod config;
pub mod doctor;
pub mod error;
pub mod events;
pub mod filter;
pub mod session;
pub mod sync;
pub mod target;
pub mod watch;
