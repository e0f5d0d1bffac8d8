//! The intercept, on the developer's side: whenever the connection to an
//! endpoint's agent is up, take the intercept there (the agent then
//! listens, and the forwarder in front of it hands it the calls), and carry
//! each connection it sends over to the developer's local port.
//!
//! A connection for a port where nothing listens locally is refused at
//! once, with the reason (the agent closes the caller's connection, or
//! answers `502` naming devloop for HTTP), and reported. Every connection
//! is an event: opened, then closed with the bytes each way and how long
//! it lasted.

use crate::client::AgentClient;
use crate::events::{Kind, Reporter};
use crate::session::Outcome;
use crate::supervisor::Conn;
use devloop_agent::mux::{self, Accepted};
use devloop_agent::protocol::{HeaderMatch, InterceptPort, StreamHeader};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// How long connecting to the local port may take.
const LOCAL_TIMEOUT: Duration = Duration::from_secs(5);
/// The pause before taking the intercept again after the agent refused it.
const RETRY: Duration = Duration::from_secs(2);

/// What an endpoint's agent is asked to hold, and where its calls go here.
#[derive(Debug, Clone)]
pub struct Plan {
    pub ports: Vec<InterceptPort>,
    /// Service port → local port.
    pub local: HashMap<u16, u16>,
    pub header: Option<HeaderMatch>,
    pub lease_ms: u64,
}

impl Plan {
    /// `SERVICE_PORT → localhost:LOCAL` for each port, for people.
    pub fn shown(&self) -> Vec<String> {
        let mut v: Vec<String> = self.local.iter().map(|(s, l)| format!("{s} → localhost:{l}")).collect();
        v.sort();
        v
    }
}

/// Waits for an up connection; None when it failed for good or this is
/// cancelled.
async fn up(conn: &mut watch::Receiver<Conn>, cancel: &CancellationToken) -> Option<AgentClient> {
    loop {
        match &*conn.borrow_and_update() {
            Conn::Up(c) if !c.is_ended() => return Some(c.clone()),
            Conn::Failed => return None,
            _ => {}
        }
        tokio::select! {
            r = conn.changed() => if r.is_err() { return None },
            _ = cancel.cancelled() => return None,
        }
    }
}

/// Holds the intercept through every connection of the endpoint, until
/// cancelled.
pub async fn run(
    plan: Plan,
    mut conn: watch::Receiver<Conn>,
    mut paused: watch::Receiver<bool>,
    rep: Reporter,
    cancel: CancellationToken,
) -> Outcome {
    // Connections carried now: they end with the intercept.
    let mut carried = JoinSet::new();
    loop {
        // Let go (devloop trigger, the dashboard): wait to be asked back.
        while *paused.borrow_and_update() {
            tokio::select! {
                r = paused.changed() => if r.is_err() { return Outcome::Stopped },
                _ = cancel.cancelled() => return Outcome::Stopped,
            }
        }
        let Some(client) = up(&mut conn, &cancel).await else {
            return if cancel.is_cancelled() { Outcome::Stopped } else { Outcome::Unreachable };
        };
        let taken = tokio::select! {
            t = client.intercept(plan.ports.clone(), plan.header.clone(), plan.lease_ms) => t,
            _ = cancel.cancelled() => return Outcome::Stopped,
        };
        let mut inbound = match taken {
            Ok((_, inbound)) => inbound,
            Err(e) => {
                rep.send(Kind::Error {
                    message: format!("cannot take the intercept: {}", crate::error::chain(&e)),
                    hint: Some("devloop tries again; another process may hold the port".into()),
                });
                tokio::select! {
                    _ = tokio::time::sleep(RETRY) => continue,
                    _ = cancel.cancelled() => return Outcome::Stopped,
                }
            }
        };
        rep.send(Kind::InterceptOn {
            ports: plan.shown(),
            header: plan.header.as_ref().map(|h| format!("{}: {}", h.name, h.value)),
        });
        loop {
            tokio::select! {
                Some(a) = inbound.recv() => {
                    let local = match &a.header {
                        StreamHeader::Inbound { port, .. } => plan.local.get(port).copied(),
                        _ => None,
                    };
                    match local {
                        Some(local) => { carried.spawn(carry(a, local, rep.clone())); }
                        None => a.stream.reset("no local port for this intercepted port"),
                    }
                }
                Some(_) = carried.join_next(), if !carried.is_empty() => {}
                reason = client.ended() => {
                    rep.send(Kind::InterceptOff {
                        reason: format!(
                            "the connection to the agent was lost ({reason}); the app answers until it is back"
                        ),
                    });
                    break;
                }
                Ok(()) = paused.changed() => {
                    if *paused.borrow() {
                        client.intercept_stop();
                        rep.send(Kind::InterceptOff { reason: "let go (asked of devloop); the app answers".into() });
                        break;
                    }
                }
                _ = cancel.cancelled() => {
                    client.intercept_stop();
                    rep.send(Kind::InterceptOff { reason: "devloop stopped; the app answers".into() });
                    return Outcome::Stopped;
                }
            }
        }
    }
}

/// Carries one intercepted connection to the local port.
async fn carry(a: Accepted, local: u16, rep: Reporter) {
    let StreamHeader::Inbound { port, peer } = a.header else { return };
    let tcp = match connect_local(local).await {
        Ok(t) => t,
        Err(e) => {
            let message = format!("nothing listens on localhost:{local} on the developer's machine ({e})");
            a.stream.reset(&message);
            rep.send(Kind::InterceptRefused { port, local, message });
            return;
        }
    };
    rep.send(Kind::InterceptOpened { port, peer: peer.clone(), local });
    let t0 = Instant::now();
    let (bytes_in, bytes_out) = mux::splice(a.stream, tcp).await;
    rep.send(Kind::InterceptClosed { port, peer, bytes_in, bytes_out, ms: t0.elapsed().as_millis() as u64 });
}

/// Connects to the local port: IPv4 loopback, then IPv6 (a dev server
/// bound to `localhost` may have only one of them).
async fn connect_local(port: u16) -> std::io::Result<TcpStream> {
    let v4 = tokio::time::timeout(LOCAL_TIMEOUT, TcpStream::connect(("127.0.0.1", port))).await;
    match v4 {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => match tokio::time::timeout(LOCAL_TIMEOUT, TcpStream::connect(("::1", port))).await {
            Ok(Ok(t)) => Ok(t),
            _ => Err(e),
        },
        Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer within 5 s")),
    }
}
