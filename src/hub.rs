//! The hub: every event goes through it, and every front-end (plain
//! lines, NDJSON, the dashboard, the control socket) subscribes to it.
//!
//! One task owns the [`State`]. Sessions report through [`Reporter`]s into
//! an unbounded channel, so reporting never waits on anyone. The task adds
//! each event to the state and broadcasts it. A subscriber that falls more
//! than [`BUFFER`] events behind loses the oldest it missed; it is told how
//! many (`Lagged`), and can take a fresh snapshot to catch up. Subscribing
//! goes through the task too, so the snapshot and the stream that follows
//! it fit exactly: nothing missed, nothing twice.
//!
//! Actions (resync, restart the app, run a post-sync command) go the other
//! way: to the service that registered for them, which answers each one.

use crate::events::{Event, Kind, Reporter};
use crate::state::State;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::{broadcast, mpsc, oneshot};

/// Events a subscriber may fall behind by before it loses some.
pub const BUFFER: usize = 16384;

/// Something asked of a running devloop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum ActionKind {
    /// Compare the whole source with the target again, by content.
    Resync,
    /// Restart the app (the agent's, or the container's own process).
    Restart,
    /// Run one of the service's `on_sync` commands now (0-based).
    Run { index: usize },
    /// Take the intercept again, or let it go (the app answers) while
    /// devloop keeps running.
    Intercept { on: bool },
}

impl ActionKind {
    pub fn describe(&self) -> String {
        match self {
            ActionKind::Resync => "resync".into(),
            ActionKind::Restart => "restart".into(),
            ActionKind::Run { index } => format!("run on_sync[{index}]"),
            ActionKind::Intercept { on: true } => "intercept on".into(),
            ActionKind::Intercept { on: false } => "intercept off".into(),
        }
    }
}

/// The answer to an action: what happened, or why not.
pub type Answer = Result<String, String>;

/// An action on its way to a service (and, when `pod` is set, to one of
/// its pods only).
pub struct Action {
    pub pod: Option<String>,
    pub kind: ActionKind,
    pub reply: oneshot::Sender<Answer>,
}

enum Msg {
    Subscribe(oneshot::Sender<(State, broadcast::Receiver<Arc<Event>>)>),
    Register(String, mpsc::Sender<Action>),
    Act {
        service: String,
        action: Action,
    },
    /// Send what is queued, then close the stream.
    Close(oneshot::Sender<()>),
}

/// A handle on the hub. Clones share it.
#[derive(Clone)]
pub struct Hub {
    msgs: mpsc::UnboundedSender<Msg>,
    events: mpsc::UnboundedSender<Event>,
}

/// Starts the hub's task (on the current runtime).
pub fn start() -> Hub {
    let (msgs, msg_rx) = mpsc::unbounded_channel();
    let (events, ev_rx) = mpsc::unbounded_channel();
    tokio::spawn(run(msg_rx, ev_rx));
    Hub { msgs, events }
}

impl Hub {
    /// A reporter for one service.
    pub fn reporter(&self, service: &str) -> Reporter {
        Reporter::new(service, self.events.clone())
    }

    /// The state now, and every event from then on.
    pub async fn subscribe(&self) -> Option<(State, broadcast::Receiver<Arc<Event>>)> {
        let (tx, rx) = oneshot::channel();
        self.msgs.send(Msg::Subscribe(tx)).ok()?;
        rx.await.ok()
    }

    /// Registers a service for actions; they arrive on the returned
    /// channel (a small queue: an action that finds it full is refused).
    pub fn register(&self, service: &str) -> mpsc::Receiver<Action> {
        let (tx, rx) = mpsc::channel(16);
        let _ = self.msgs.send(Msg::Register(service.to_string(), tx));
        rx
    }

    /// Asks a service to act, and waits for its answer (reported as an
    /// `action_done` event too).
    pub async fn act(&self, service: &str, pod: Option<&str>, kind: ActionKind) -> Answer {
        let (reply, answer) = oneshot::channel();
        let action = Action { pod: pod.map(String::from), kind: kind.clone(), reply };
        if self.msgs.send(Msg::Act { service: service.to_string(), action }).is_err() {
            return Err("devloop is stopping".into());
        }
        let answer = answer.await.unwrap_or_else(|_| Err(format!("service `{service}` stopped before it answered")));
        let rep = Reporter::new(service, self.events.clone());
        let rep = match pod {
            Some(p) => rep.for_pod(p),
            None => rep,
        };
        let (ok, message) = match &answer {
            Ok(m) => (true, m.clone()),
            Err(m) => (false, m.clone()),
        };
        rep.send(Kind::ActionDone { action: kind.describe(), ok, message });
        answer
    }

    /// Sends every event already reported, then ends the stream: each
    /// subscriber sees the end after the last event.
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.msgs.send(Msg::Close(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

async fn run(mut msgs: mpsc::UnboundedReceiver<Msg>, mut events: mpsc::UnboundedReceiver<Event>) {
    let mut state = State::default();
    let (tx, _) = broadcast::channel::<Arc<Event>>(BUFFER);
    let mut services: HashMap<String, mpsc::Sender<Action>> = HashMap::new();
    let apply = |state: &mut State, ev: Event| {
        state.apply(&ev);
        let _ = tx.send(Arc::new(ev));
    };
    loop {
        tokio::select! {
            // Events first: a subscriber's snapshot then includes every
            // event reported before it asked.
            biased;
            Some(ev) = events.recv() => apply(&mut state, ev),
            m = msgs.recv() => match m {
                Some(Msg::Subscribe(reply)) => {
                    while let Ok(ev) = events.try_recv() {
                        apply(&mut state, ev);
                    }
                    let _ = reply.send((state.clone(), tx.subscribe()));
                }
                Some(Msg::Register(name, sender)) => {
                    services.insert(name, sender);
                }
                Some(Msg::Act { service, action }) => match services.get(&service) {
                    Some(s) => {
                        if let Err(e) = s.try_send(action) {
                            let action = match e {
                                mpsc::error::TrySendError::Full(a) | mpsc::error::TrySendError::Closed(a) => a,
                            };
                            let _ = action.reply.send(Err(format!("service `{service}` is busy or stopped; try again")));
                        }
                    }
                    None => {
                        let known: Vec<&str> = services.keys().map(String::as_str).collect();
                        let _ = action.reply.send(Err(format!(
                            "no service `{service}` is running (running: {})",
                            known.join(", ")
                        )));
                    }
                },
                Some(Msg::Close(done)) => {
                    while let Ok(ev) = events.try_recv() {
                        apply(&mut state, ev);
                    }
                    drop(tx);
                    let _ = done.send(());
                    return;
                }
                None => return,
            },
        }
    }
}

/// Reports `ready` once every service has finished its first sync: each
/// of its sessions so far reported `in_sync` (or, for a run that only
/// intercepts, `intercept_on`). Ends then, or when the hub closes.
pub async fn announce_ready(
    hub: Hub,
    mut rx: broadcast::Receiver<Arc<Event>>,
    services: Vec<String>,
    intercept_only: bool,
) {
    use tokio::sync::broadcast::error::RecvError;
    // Service → session → done.
    let mut done: HashMap<String, HashMap<Option<String>, bool>> = HashMap::new();
    loop {
        let ev = match rx.recv().await {
            Ok(ev) => ev,
            Err(RecvError::Lagged(_)) => continue,
            Err(RecvError::Closed) => return,
        };
        if !services.contains(&ev.service) {
            continue;
        }
        let sessions = done.entry(ev.service.clone()).or_default();
        match (&ev.kind, intercept_only) {
            (Kind::AgentStarting { .. }, _) => {
                sessions.entry(ev.pod.clone()).or_insert(false);
            }
            (Kind::InSync { .. }, false) | (Kind::InterceptOn { .. }, true) => {
                sessions.insert(ev.pod.clone(), true);
            }
            _ => continue,
        }
        let all = services.iter().all(|s| done.get(s).is_some_and(|ss| !ss.is_empty() && ss.values().all(|d| *d)));
        if all {
            hub.reporter("").send(Kind::Ready { services: services.len() });
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn kind(i: u64) -> Kind {
        Kind::AgentLog { line: format!("line {i}") }
    }

    /// A subscriber that joins late gets the state so far, then exactly the
    /// events after it: none missed, none twice.
    #[tokio::test]
    async fn a_late_subscriber_gets_a_snapshot_then_the_stream() {
        let hub = start();
        let rep = hub.reporter("web");
        rep.send(Kind::AgentStarting { target: "local:/x".into() });
        let (state, mut rx) = hub.subscribe().await.unwrap();
        assert_eq!(state.session("web", None).unwrap().target, "local:/x");
        rep.send(kind(1));
        let ev = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.unwrap().unwrap();
        assert_eq!(ev.kind, kind(1), "the first event after the snapshot, not one before it");
    }

    /// A subscriber that does not read never holds anyone back: the
    /// sessions go on reporting, and when it reads again it learns how many
    /// events it lost, then gets the newest.
    #[tokio::test]
    async fn a_slow_subscriber_loses_what_it_missed_and_is_told() {
        let hub = start();
        let rep = hub.reporter("web");
        let (_, mut slow) = hub.subscribe().await.unwrap();
        let n = BUFFER as u64 + 100;
        for i in 0..n {
            rep.send(kind(i));
        }
        // A fresh subscriber proves every event reached the hub's state.
        let (state, _) = hub.subscribe().await.unwrap();
        assert!(state.services.contains_key("web"));
        match slow.recv().await {
            Err(broadcast::error::RecvError::Lagged(lost)) => assert_eq!(lost, 100),
            other => panic!("expected to be told of lost events, got {other:?}"),
        }
        assert_eq!(slow.recv().await.unwrap().kind, kind(100), "then the oldest it still has");
    }

    /// An action reaches the service registered for it, and its answer
    /// comes back (and is reported); one for no service is refused with
    /// the names of those that run.
    #[tokio::test]
    async fn actions_reach_their_service_and_are_answered() {
        let hub = start();
        let mut actions = hub.register("web");
        tokio::spawn(async move {
            while let Some(a) = actions.recv().await {
                let _ = a.reply.send(Ok(format!("did {:?} on {:?}", a.kind, a.pod)));
            }
        });
        let (_, mut rx) = hub.subscribe().await.unwrap();
        let answer = hub.act("web", Some("p1"), ActionKind::Resync).await;
        assert_eq!(answer, Ok("did Resync on Some(\"p1\")".to_string()));
        let ev = rx.recv().await.unwrap();
        assert!(matches!(&ev.kind, Kind::ActionDone { ok: true, .. }), "{ev:?}");
        let answer = hub.act("api", None, ActionKind::Restart).await;
        assert_eq!(answer, Err("no service `api` is running (running: web)".to_string()));
    }

    /// Closing sends what is queued first: a subscriber sees every event,
    /// then the end.
    #[tokio::test]
    async fn close_delivers_everything_then_ends() {
        let hub = start();
        let (_, mut rx) = hub.subscribe().await.unwrap();
        let rep = hub.reporter("web");
        for i in 0..10 {
            rep.send(kind(i));
        }
        hub.close().await;
        for i in 0..10 {
            assert_eq!(rx.recv().await.unwrap().kind, kind(i));
        }
        assert!(matches!(rx.recv().await, Err(broadcast::error::RecvError::Closed)));
    }
}
