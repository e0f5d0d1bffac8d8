//! devloop: the inner loop for Kubernetes developers.
//!
//! How a change travels, and where each step lives:
//!
//! ```text
//! devloop.yaml ─► config ─► service (one per service: one session, or one per ready pod)
//!                              │
//!                           session (per endpoint, named tasks under one owner):
//!                              ├─ supervisor: start the agent, keep it connected,
//!                              │  publish the current client
//!                              └─ sync: model of the target, dirty paths compared
//!                                 by content, batches   ◄── source tree ─► watch ─► filter
//!                                    │
//!                        client (the cloneable handle on one agent session)
//!                                    │  one connection, many streams (agent's mux)
//!                        endpoint (local child | exec command | kubernetes pod)
//!                                    ▼
//!                        devloop-agent (agent/): apply, run, dial
//! ```
//!
//! Everything reports through [`events`] to the [`hub`], which keeps the
//! [`state`] and hands events to the front-ends (plain lines, NDJSON), and
//! carries actions (resync, restart, run a command) back to the services.
//! The wire protocol lives in the agent's library
//! (`devloop_agent::protocol`) so the two sides cannot disagree.

pub mod client;
pub mod config;
pub mod control;
pub mod doctor;
pub mod endpoint;
pub mod error;
pub mod events;
pub mod filter;
pub mod hub;
pub mod intercept;
pub mod pod_env;
pub mod problems;
pub mod service;
pub mod session;
pub mod state;
pub mod supervisor;
pub mod sync;
pub mod tasks;
pub mod ui;
pub mod watch;

/// Where devloop keeps what it can always rebuild (hashes of the source
/// between runs): `DEVLOOP_CACHE_DIR`, else `$XDG_CACHE_HOME/devloop`,
/// else `~/.cache/devloop`. None when none of them is set.
pub fn cache_dir() -> Option<std::path::PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(std::path::PathBuf::from);
    var("DEVLOOP_CACHE_DIR")
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("devloop")))
        .or_else(|| var("HOME").map(|d| d.join(".cache/devloop")))
}
