//! The connection to one endpoint's agent, kept up: start the agent (or
//! reach again one whose port-forward dropped), open a session, and when
//! it is lost, try again with backoff. The current session is published
//! as a [`Conn`] on a watch channel, a cloneable [`AgentClient`] when up,
//! for every consumer of the endpoint (the sync engine, the intercept).
//!
//! Cancelling the supervisor closes the session and lets the agent exit
//! by itself (it stops its app first), killing it only if it does not.

use crate::client::{AgentClient, ClientError};
use crate::endpoint::kubernetes::KubeError;
use crate::endpoint::{self, Endpoint, TargetError};
use crate::events::{Kind, Reporter};
use crate::session::Mode;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How long a stopping agent gets to exit by itself before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long an agent that failed to open a session gets to exit.
const FAILED_GRACE: Duration = Duration::from_millis(500);

/// The state of an endpoint's connection.
#[derive(Clone)]
pub enum Conn {
    /// Starting, or between attempts.
    Connecting,
    Up(AgentClient),
    /// Given up: the reason was reported (an agent that cannot run there,
    /// or a one-shot sync that could not connect), or stopped.
    Failed,
}

/// A random session token (128 bits from the kernel).
pub fn new_token() -> String {
    use std::io::Read;
    let mut b = [0u8; 16];
    let ok = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)).is_ok();
    if !ok {
        // No /dev/urandom: fall back to time and pid, still unguessable
        // enough for a loopback-only, short-lived session.
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        b.copy_from_slice(&(t ^ (std::process::id() as u128) << 64).to_le_bytes());
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Errors after which trying again cannot help.
fn is_fatal(e: &TargetError) -> bool {
    match e {
        TargetError::AgentNotFound { .. } => true,
        TargetError::Kubernetes(k) => {
            matches!(**k, KubeError::NoStaticAgent { .. } | KubeError::Arch { .. } | KubeError::NoContainer { .. })
        }
        _ => false,
    }
}

/// Keeps the endpoint's agent connected until cancelled (or, in a one-shot
/// sync, until the first attempt fails).
pub async fn supervise(
    endpoint: Endpoint,
    mode: Mode,
    rep: Reporter,
    cancel: CancellationToken,
    conn: watch::Sender<Conn>,
) {
    let mut attempt: u32 = 0;
    // An agent that outlived its lost session (its port-forward dropped),
    // and its token: the next attempt reconnects to it before starting anew.
    let mut kept: Option<(endpoint::Process, String)> = None;
    let mut via = String::new();
    let give_up = |conn: &watch::Sender<Conn>| {
        let _ = conn.send(Conn::Failed);
    };
    loop {
        if cancel.is_cancelled() {
            if let Some((p, _)) = kept.take() {
                p.stop(FAILED_GRACE).await;
            }
            return give_up(&conn);
        }
        let _ = conn.send(Conn::Connecting);
        let reopened = match kept.take() {
            Some((mut process, token)) => match process.reopen(&rep).await {
                Some(io) => Some((endpoint::Started { io, process, via: String::new() }, token)),
                None => {
                    process.stop(FAILED_GRACE).await;
                    None
                }
            },
            None => None,
        };
        let (started, token) = match reopened {
            Some(r) => r,
            None => {
                let token = new_token();
                let start = tokio::select! {
                    s = endpoint::start(&endpoint, &token, &rep) => s,
                    _ = cancel.cancelled() => continue,
                };
                match start {
                    Ok(s) => (s, token),
                    Err(e) => {
                        rep.send(Kind::Error { message: crate::error::chain(&e), hint: e.hint() });
                        if is_fatal(&e) || mode == Mode::Once {
                            return give_up(&conn);
                        }
                        backoff(&rep, &mut attempt, &cancel).await;
                        continue;
                    }
                }
            }
        };
        let process = started.process;
        if !started.via.is_empty() {
            via = started.via;
        }
        let client = match AgentClient::open(started.io, &token, rep.clone(), endpoint.crosses_network()).await {
            Ok(c) => c,
            Err(e) => {
                rep.send(Kind::Error { message: crate::error::chain(&e), hint: e.hint() });
                process.stop(FAILED_GRACE).await;
                if mode == Mode::Once || matches!(e, ClientError::Connect(_)) {
                    return give_up(&conn);
                }
                backoff(&rep, &mut attempt, &cancel).await;
                continue;
            }
        };
        attempt = 0;
        rep.send(Kind::AgentConnected {
            agent_version: client.agent_version().to_string(),
            pid: client.pid(),
            root: client.root().to_string(),
            via: via.clone(),
        });
        let _ = conn.send(Conn::Up(client.clone()));
        tokio::select! {
            reason = client.ended() => {
                rep.send(Kind::AgentLost { reason: format!("connection to the agent lost: {reason}") });
                let _ = conn.send(Conn::Connecting);
                drop(client);
                if mode == Mode::Once {
                    process.stop(FAILED_GRACE).await;
                    return give_up(&conn);
                }
                // The agent may still be there (only the way to it broke):
                // the next attempt reaches it again, and the consumers
                // resync by content, so nothing that changed is lost.
                kept = Some((process, token));
                backoff(&rep, &mut attempt, &cancel).await;
            }
            _ = cancel.cancelled() => {
                let _ = conn.send(Conn::Failed);
                client.close();
                drop(client);
                process.stop(STOP_GRACE).await;
                return;
            }
        }
    }
}

/// Waits before the next attempt (200 ms doubling to 5 s), or until
/// cancelled.
async fn backoff(rep: &Reporter, attempt: &mut u32, cancel: &CancellationToken) {
    *attempt += 1;
    let ms = (200u64 << (*attempt - 1).min(5)).min(5000);
    rep.send(Kind::Reconnecting { attempt: *attempt, in_ms: ms });
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_millis(ms)) => {}
        _ = cancel.cancelled() => {}
    }
}
