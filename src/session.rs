//! One endpoint's session: its connection ([`supervisor`]) and what uses
//! it (the sync engine; the intercept next), as named tasks under one
//! owner. The sync keeps the target equal to the source: a sync by content
//! whenever a connection comes up (the first, or after a reconnect), then
//! every change, until cancelled.
//!
//! [`supervisor`]: crate::supervisor

use crate::client::{AgentClient, ClientError};
use crate::config::Service;
use crate::endpoint::Endpoint;
use crate::events::Reporter;
use crate::hub::{Action, Answer};
use crate::supervisor::{self, Conn};
use crate::sync::{Engine, LiveEnd, Restart, Shelf, SyncError};
use crate::tasks::Tasks;
use crate::watch::{Change, Watch};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// One-shot sync or follow changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Once,
    Watch,
}

/// How a service's run ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The target matched the source when devloop stopped (or, for
    /// `--once`, after the sync).
    InSync,
    /// Some paths failed to sync.
    PathErrors(usize),
    /// The agent could not be started or reached.
    Unreachable,
    /// Stopped by the user.
    Stopped,
    /// A task of devloop's panicked (a bug; reported as an error event).
    Panicked,
}

impl Outcome {
    /// What went wrong, for people (None when nothing did).
    pub fn describe(&self) -> Option<String> {
        match self {
            Outcome::InSync | Outcome::Stopped => None,
            Outcome::PathErrors(n) => Some(format!("{n} path(s) are not in sync (the errors above say which)")),
            Outcome::Unreachable => Some("the target could not be reached (the errors above say why)".into()),
            Outcome::Panicked => Some("devloop failed with an internal error (reported above)".into()),
        }
    }

    /// The worse of two outcomes.
    pub fn worse(self, other: Outcome) -> Outcome {
        let rank = |o: &Outcome| match o {
            Outcome::InSync | Outcome::Stopped => 0,
            Outcome::PathErrors(_) => 1,
            Outcome::Unreachable => 2,
            Outcome::Panicked => 3,
        };
        if rank(&other) > rank(&self) {
            other
        } else {
            self
        }
    }
}

pub use supervisor::new_token;

/// What a session needs beyond its endpoint.
pub struct SessionSpec {
    pub svc: Service,
    pub mode: Mode,
    /// How the endpoint restarts the app.
    pub restart: Option<Restart>,
    /// The watcher (shared by a service's sessions) and this session's
    /// changes; None for a one-shot sync.
    pub watch: Option<(Watch, mpsc::Receiver<Change>)>,
    /// Whether this session syncs (`devloop intercept` does not).
    pub sync: bool,
    /// What this session's agent intercepts, if anything.
    pub intercept: Option<crate::intercept::Plan>,
    /// Where the service's sessions share the model of a tree they all hold.
    pub shelf: Shelf,
}

/// Runs one endpoint's session until it is cancelled (or, for a one-shot
/// sync, until the first sync is done). Actions for it arrive on `actions`.
pub async fn run_session(
    spec: SessionSpec,
    endpoint: Endpoint,
    rep: Reporter,
    cancel: CancellationToken,
    actions: mpsc::Receiver<Action>,
) -> Outcome {
    let what = endpoint.describe();
    let (conn_tx, conn_rx) = watch::channel(Conn::Connecting);
    let mut tasks: Tasks<Option<Outcome>> = Tasks::new(cancel.child_token(), rep.clone());
    let mode = spec.mode;
    {
        let (rep, cancel) = (rep.clone(), tasks.token().clone());
        tasks.spawn(format!("the connection to {what}"), async move {
            supervisor::supervise(endpoint, mode, rep, cancel, conn_tx).await;
            None
        });
    }
    // Actions: the intercept's own go to it, the rest to the sync.
    let (paused_tx, paused_rx) = watch::channel(false);
    let (sync_tx, sync_rx) = mpsc::channel(16);
    {
        let (has_intercept, syncs, cancel) = (spec.intercept.is_some(), spec.sync, tasks.token().clone());
        tasks.spawn(format!("the actions of {what}"), async move {
            tokio::select! {
                _ = route_actions(actions, has_intercept, paused_tx, syncs.then_some(sync_tx)) => {}
                _ = cancel.cancelled() => {}
            }
            None
        });
    }
    if let Some(plan) = spec.intercept.clone() {
        let (rep, cancel, conn_rx) = (rep.clone(), tasks.token().clone(), conn_rx.clone());
        tasks.spawn(format!("the intercept through {what}"), async move {
            Some(crate::intercept::run(plan, conn_rx, paused_rx, rep, cancel).await)
        });
    }
    if spec.sync {
        let (rep, cancel) = (rep.clone(), tasks.token().clone());
        tasks.spawn(format!("the sync into {what}"), async move {
            Some(sync_session(spec, conn_rx, rep, cancel, sync_rx).await)
        });
    }
    // The first user of the connection to end decides (the sync is done,
    // stopped, or something panicked): then the connection is closed and
    // the agent stopped.
    let mut outcome = None;
    while let Some((_, r)) = tasks.next().await {
        match r {
            Some(Some(o)) => {
                outcome = Some(o);
                break;
            }
            Some(None) => {}
            None => {
                outcome = Some(Outcome::Panicked);
                break;
            }
        }
    }
    for (_, r) in tasks.shutdown().await {
        if r.is_none() {
            outcome = Some(Outcome::Panicked);
        }
    }
    outcome.unwrap_or(Outcome::Stopped)
}

/// Hands each action to the part of the session that does it: intercept
/// on and off pause the intercept, the rest go to the sync.
async fn route_actions(
    mut actions: mpsc::Receiver<Action>,
    has_intercept: bool,
    paused: watch::Sender<bool>,
    sync: Option<mpsc::Sender<Action>>,
) {
    use crate::hub::ActionKind;
    while let Some(a) = actions.recv().await {
        match (&a.kind, &sync) {
            (ActionKind::Intercept { on }, _) => {
                let answer = if has_intercept {
                    paused.send_replace(!on);
                    Ok(if *on { "the intercept is taken again" } else { "the intercept is let go: the app answers" }
                        .into())
                } else {
                    Err("this service has no intercept: add `intercept:` to its entry in devloop.yaml".into())
                };
                let _ = a.reply.send(answer);
            }
            (_, Some(tx)) => {
                if let Err(mpsc::error::TrySendError::Full(a) | mpsc::error::TrySendError::Closed(a)) = tx.try_send(a) {
                    let _ = a.reply.send(Err("the sync is busy with earlier actions; try again".into()));
                }
            }
            (_, None) => {
                let _ = a.reply.send(Err("`devloop intercept` does not sync: use `devloop watch` for this".into()));
            }
        }
    }
}

/// Waits for the connection to be up (a session not yet ended) and
/// returns its client; None when it failed or the sync is cancelled.
/// Actions asked meanwhile are answered that the agent is not connected.
async fn connected(
    conn: &mut watch::Receiver<Conn>,
    cancel: &CancellationToken,
    actions: &mut mpsc::Receiver<Action>,
) -> Option<AgentClient> {
    loop {
        match &*conn.borrow_and_update() {
            Conn::Up(c) if !c.is_ended() => return Some(c.clone()),
            Conn::Failed => return None,
            _ => {}
        }
        tokio::select! {
            r = conn.changed() => if r.is_err() { return None },
            _ = cancel.cancelled() => return None,
            Some(a) = actions.recv() => {
                let _ = a.reply.send(Err("the agent is not connected yet (devloop is connecting to it); try again".into()));
            }
        }
    }
}

/// The sync engine's side of a session.
async fn sync_session(
    spec: SessionSpec,
    mut conn: watch::Receiver<Conn>,
    rep: Reporter,
    cancel: CancellationToken,
    mut actions: mpsc::Receiver<Action>,
) -> Outcome {
    let SessionSpec { svc, mode, restart, watch, shelf, .. } = spec;
    let app = svc.app.as_ref().and_then(|a| a.spec.clone());
    let (watcher, mut changes) = match watch {
        Some((w, rx)) => (Some(w), Some(rx)),
        None => (None, None),
    };
    let mut engine = Engine::new(svc, rep.clone(), watcher, restart, shelf);
    // A resync asked for, to answer once it is done.
    let mut resync: Option<tokio::sync::oneshot::Sender<Answer>> = None;
    loop {
        let Some(client) = connected(&mut conn, &cancel, &mut actions).await else {
            if let Some(r) = resync.take() {
                let _ = r.send(Err("the agent is not connected".into()));
            }
            return if cancel.is_cancelled() { Outcome::Stopped } else { Outcome::Unreachable };
        };
        let result = async {
            let t0 = std::time::Instant::now();
            let errors = engine.initial_sync(&client).await?;
            if let Some(r) = resync.take() {
                let _ = r.send(Ok(format!(
                    "compared everything by content in {} ms; {errors} path(s) not in sync",
                    t0.elapsed().as_millis()
                )));
            }
            client.configure_app(app.clone());
            if mode == Mode::Once {
                return Ok(Next::Done(if errors == 0 { Outcome::InSync } else { Outcome::PathErrors(errors) }));
            }
            release_freed_memory();
            // Watch mode always has a change receiver.
            let changes = changes.as_mut().expect("watch mode");
            Ok(match engine.live(&client, changes, &cancel, &mut actions).await? {
                LiveEnd::Shutdown => Next::Done(Outcome::Stopped),
                LiveEnd::Lost(_) => Next::Reconnected,
                LiveEnd::Resync(reply) => Next::Resync(reply),
            })
        }
        .await;
        match result {
            Ok(Next::Done(outcome)) => return outcome,
            Ok(Next::Resync(reply)) => resync = Some(reply),
            // The supervisor reports the lost connection and brings up the
            // next one, which this loop waits for (and resyncs by content).
            Ok(Next::Reconnected) => {}
            // The connection dropped mid-sync: the same, reported by the
            // supervisor.
            Err(SyncError::Client(ClientError::Lost(_))) if mode == Mode::Watch => {}
            Err(SyncError::Client(e)) => {
                // The agent refused a request (its index failed, say).
                if !matches!(e, ClientError::Lost(_)) {
                    rep.send(crate::events::Kind::Error { message: crate::error::chain(&e), hint: e.hint() });
                }
                if mode == Mode::Once {
                    return Outcome::Unreachable;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = cancel.cancelled() => return Outcome::Stopped,
                }
            }
            Err(SyncError::Scan(e)) => {
                // Nothing was sent or deleted. Try again (a passing cause,
                // such as a thread that could not start, clears up); in a
                // one-shot sync the target is not in sync.
                rep.send(crate::events::Kind::Error {
                    message: format!("cannot sync: {e}; nothing was sent or deleted"),
                    hint: Some("devloop tries again; if this repeats, it is a bug in devloop: please report it".into()),
                });
                if mode == Mode::Once {
                    return Outcome::PathErrors(1);
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = cancel.cancelled() => return Outcome::Stopped,
                }
            }
        }
    }
}

/// What the sync does after one connection's run.
enum Next {
    Done(Outcome),
    /// The connection was lost: wait for the next.
    Reconnected,
    /// Start over by content, and answer the one who asked.
    Resync(tokio::sync::oneshot::Sender<Answer>),
}

/// Hands memory freed after a first sync back to the system. The scan,
/// hashing and archive buffers of a large tree are gone by then, but glibc
/// keeps freed heap (in each thread's arena) for reuse, and a watcher that
/// then idles for hours would hold it all that time.
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free heap pages to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}
