//! The current state of every service and session, as the events add it
//! up ([`State::apply`]). The hub keeps one; a subscriber that joins late
//! (the dashboard, `devloop status`) starts from a copy of it, then
//! follows the events. This is the state the dashboard draws.

use crate::events::{Event, Kind};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};

/// How many recent items each list keeps.
const KEEP_ERRORS: usize = 10;
const KEEP_LATENCIES: usize = 60;
const KEEP_OUTPUT: usize = 50;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct State {
    pub services: BTreeMap<String, ServiceState>,
    /// Errors about devloop itself (not of one service).
    pub errors: VecDeque<Problem>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ServiceState {
    /// One per session: "" for a local or exec target, the pod's name for
    /// a Kubernetes one.
    pub sessions: BTreeMap<String, SessionState>,
    /// What the service itself (not one session) reported: no ready pods,
    /// a workload changed, an error finding pods.
    pub note: Option<String>,
    /// When `note` last changed (Unix ms): how long the service has waited.
    pub note_ms: Option<u64>,
    pub errors: VecDeque<Problem>,
}

/// Where a session's agent is.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum AgentState {
    #[default]
    Connecting,
    Injecting,
    /// The first sync (by content) is running.
    Syncing,
    /// The first sync waits for another pod's to end (they take turns).
    Waiting,
    Live,
    Reconnecting {
        attempt: u32,
        in_ms: u64,
    },
    Error {
        message: String,
    },
    Stopped,
}

impl AgentState {
    pub fn label(&self) -> &'static str {
        match self {
            AgentState::Connecting => "connecting",
            AgentState::Injecting => "injecting",
            AgentState::Syncing => "syncing",
            AgentState::Waiting => "waiting",
            AgentState::Live => "live",
            AgentState::Reconnecting { .. } => "reconnecting",
            AgentState::Error { .. } => "error",
            AgentState::Stopped => "stopped",
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SessionState {
    pub target: String,
    pub agent: AgentState,
    /// When `agent` last changed (Unix ms): how long it has been waiting.
    pub since_ms: u64,
    /// How the session reaches its agent.
    pub via: Option<String>,
    pub last_sync: Option<LastSync>,
    /// Latencies of recent live syncs, oldest first.
    pub latencies: VecDeque<f64>,
    /// Changes seen and not yet sent.
    pub pending: u64,
    pub progress: Option<Progress>,
    pub on_sync: Option<CommandState>,
    /// Times the app was restarted (started again after its first start).
    pub restarts: u32,
    pub app: Option<String>,
    pub errors: VecDeque<Problem>,
    pub intercept: InterceptState,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LastSync {
    pub files: u64,
    pub deleted: u64,
    pub bytes: u64,
    pub latency_ms: f64,
    pub at_ms: u64,
    pub initial: bool,
    /// Its first paths.
    pub paths: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Progress {
    pub files_done: u64,
    pub files_total: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub started_ms: u64,
}

/// The last post-sync command.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CommandState {
    pub command: String,
    /// None while it runs; its exit code after (None too if killed).
    pub code: Option<i32>,
    pub running: bool,
    pub at_ms: u64,
    pub output: VecDeque<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Problem {
    pub at_ms: u64,
    pub message: String,
    pub hint: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum InterceptState {
    #[default]
    Off,
    /// Held: calls to `ports` reach this machine (only the HTTP/1.1
    /// requests with `header`, for a personal intercept).
    On(Intercepting),
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Intercepting {
    pub ports: Vec<String>,
    pub header: Option<String>,
    /// Connections open now.
    pub open: u64,
    /// Connections since the intercept was taken.
    pub connections: u64,
    /// Callers turned away: nothing listened on the local port.
    pub refused: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// When the recent connections opened (Unix ms), for the rate.
    #[serde(skip)]
    recent_ms: VecDeque<u64>,
}

/// The window the connection rate is averaged over.
const RATE_WINDOW_MS: u64 = 10_000;

impl Intercepting {
    /// Connections opened per second, over the last ten seconds.
    pub fn per_sec(&self, now_ms: u64) -> f64 {
        let from = now_ms.saturating_sub(RATE_WINDOW_MS);
        self.recent_ms.iter().filter(|t| **t >= from).count() as f64 / (RATE_WINDOW_MS as f64 / 1000.0)
    }

    fn opened(&mut self, at_ms: u64) {
        self.open += 1;
        self.connections += 1;
        while self.recent_ms.front().is_some_and(|t| *t + RATE_WINDOW_MS < at_ms) || self.recent_ms.len() >= 1024 {
            self.recent_ms.pop_front();
        }
        self.recent_ms.push_back(at_ms);
    }
}

impl InterceptState {
    pub fn label(&self) -> &'static str {
        match self {
            InterceptState::Off => "off",
            InterceptState::On(i) if i.header.is_some() => "personal",
            InterceptState::On(_) => "on",
        }
    }
}

fn push<T>(q: &mut VecDeque<T>, item: T, keep: usize) {
    if q.len() == keep {
        q.pop_front();
    }
    q.push_back(item);
}

impl State {
    /// Adds one event to the state.
    pub fn apply(&mut self, ev: &Event) {
        if ev.service.is_empty() {
            if let Kind::Error { message, hint } = &ev.kind {
                let p = Problem { at_ms: ev.ts, message: message.clone(), hint: hint.clone() };
                push(&mut self.errors, p, KEEP_ERRORS);
            }
            return;
        }
        let svc = self.services.entry(ev.service.clone()).or_default();
        // Events of the service itself, for a Kubernetes target (whose
        // sessions are its pods').
        // (A warning before any session: a Kubernetes service waiting for
        // its first ready pod.)
        let has_pods = svc.sessions.keys().any(|k| !k.is_empty());
        let of_service = ev.pod.is_none()
            && match ev.kind {
                Kind::Warning { .. } | Kind::WorkloadChanged { .. } => has_pods || svc.sessions.is_empty(),
                Kind::Error { .. } => has_pods,
                _ => false,
            };
        if of_service {
            let mut note = |n: String| {
                if svc.note.as_ref() != Some(&n) {
                    svc.note = Some(n);
                    svc.note_ms = Some(ev.ts);
                }
            };
            match &ev.kind {
                Kind::Warning { message } => note(message.clone()),
                Kind::WorkloadChanged { workload, change } => note(format!("{workload}: {change}")),
                Kind::Error { message, hint } => {
                    let p = Problem { at_ms: ev.ts, message: message.clone(), hint: hint.clone() };
                    push(&mut svc.errors, p, KEEP_ERRORS);
                }
                _ => {}
            }
            return;
        }
        let key = ev.pod.clone().unwrap_or_default();
        let s = svc.sessions.entry(key).or_default();
        let set = |s: &mut SessionState, a: AgentState| {
            if s.agent != a {
                s.agent = a;
                s.since_ms = ev.ts;
            }
        };
        match &ev.kind {
            Kind::AgentStarting { target } => {
                s.target = target.clone();
                set(s, AgentState::Connecting);
            }
            Kind::AgentInjecting { .. } => set(s, AgentState::Injecting),
            Kind::AgentConnected { via, .. } => {
                s.via = Some(via.clone());
                set(s, AgentState::Syncing);
            }
            Kind::SyncTurn { waiting } => set(s, if *waiting { AgentState::Waiting } else { AgentState::Syncing }),
            Kind::AgentLost { reason } => set(s, AgentState::Error { message: reason.clone() }),
            Kind::Reconnecting { attempt, in_ms } => {
                set(s, AgentState::Reconnecting { attempt: *attempt, in_ms: *in_ms })
            }
            Kind::SyncStarted { initial: true, files, bytes, .. } if s.progress.is_none() => {
                s.progress = Some(Progress {
                    files_done: 0,
                    files_total: *files,
                    bytes_done: 0,
                    bytes_total: *bytes,
                    started_ms: ev.ts,
                });
            }
            Kind::SyncProgress { files_done, files_total, bytes_done, bytes_total } => {
                let started_ms = s.progress.as_ref().map_or(ev.ts, |p| p.started_ms);
                s.progress = Some(Progress {
                    files_done: *files_done,
                    files_total: *files_total,
                    bytes_done: *bytes_done,
                    bytes_total: *bytes_total,
                    started_ms,
                });
            }
            Kind::SyncApplied { initial, written, deleted, bytes, latency_ms, paths, .. } => {
                s.last_sync = Some(LastSync {
                    files: *written,
                    deleted: *deleted,
                    bytes: *bytes,
                    latency_ms: *latency_ms,
                    at_ms: ev.ts,
                    initial: *initial,
                    paths: paths.clone(),
                });
                if !initial {
                    push(&mut s.latencies, *latency_ms, KEEP_LATENCIES);
                }
                s.pending = 0;
            }
            Kind::InSync { .. } => {
                s.progress = None;
                set(s, AgentState::Live);
            }
            Kind::Watching { .. } => set(s, AgentState::Live),
            Kind::SyncError { path, message, .. } => {
                let p = Problem { at_ms: ev.ts, message: format!("{path}: {message}"), hint: None };
                push(&mut s.errors, p, KEEP_ERRORS);
            }
            Kind::Error { message, hint } => {
                let p = Problem { at_ms: ev.ts, message: message.clone(), hint: hint.clone() };
                push(&mut s.errors, p, KEEP_ERRORS);
                if s.agent != AgentState::Live {
                    set(s, AgentState::Error { message: message.clone() });
                }
            }
            Kind::CommandStarted { command } => {
                s.on_sync = Some(CommandState {
                    command: command.clone(),
                    code: None,
                    running: true,
                    at_ms: ev.ts,
                    output: VecDeque::new(),
                });
            }
            Kind::CommandOutput { line, .. } => {
                if let Some(c) = &mut s.on_sync {
                    push(&mut c.output, line.clone(), KEEP_OUTPUT);
                }
            }
            Kind::CommandExited { code, .. } => {
                if let Some(c) = &mut s.on_sync {
                    c.running = false;
                    c.code = *code;
                }
            }
            Kind::AppStarted { pid } => {
                if s.app.is_some() {
                    s.restarts += 1;
                }
                s.app = Some(format!("running (pid {pid})"));
            }
            Kind::AppExited { code } => {
                s.app = Some(match code {
                    Some(c) => format!("exited ({c})"),
                    None => "killed".into(),
                })
            }
            Kind::AppFailed { message } => s.app = Some(format!("failed: {message}")),
            Kind::InterceptOn { ports, header } => {
                s.intercept = InterceptState::On(Intercepting {
                    ports: ports.clone(),
                    header: header.clone(),
                    ..Default::default()
                })
            }
            Kind::InterceptOff { .. } => s.intercept = InterceptState::Off,
            Kind::InterceptOpened { .. } => {
                if let InterceptState::On(i) = &mut s.intercept {
                    i.opened(ev.ts);
                }
            }
            Kind::InterceptClosed { bytes_in, bytes_out, .. } => {
                if let InterceptState::On(i) = &mut s.intercept {
                    i.open = i.open.saturating_sub(1);
                    i.bytes_in += bytes_in;
                    i.bytes_out += bytes_out;
                }
            }
            Kind::InterceptRefused { .. } => {
                if let InterceptState::On(i) = &mut s.intercept {
                    i.refused += 1;
                }
            }
            _ => {}
        }
    }

    /// One session's state.
    pub fn session(&self, service: &str, pod: Option<&str>) -> Option<&SessionState> {
        self.services.get(service)?.sessions.get(pod.unwrap_or(""))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(service: &str, pod: Option<&str>, ts: u64, kind: Kind) -> Event {
        Event { ts, service: service.into(), pod: pod.map(String::from), container: None, kind }
    }

    /// A session's life adds up: connecting, syncing with progress, live
    /// with its last sync and latencies, a lost agent, and per-pod state
    /// kept apart.
    #[test]
    fn events_add_up_to_each_sessions_state() {
        let mut st = State::default();
        st.apply(&ev("web", Some("p1"), 1, Kind::AgentStarting { target: "pod dev/p1".into() }));
        st.apply(&ev("web", Some("p2"), 1, Kind::AgentStarting { target: "pod dev/p2".into() }));
        st.apply(&ev("web", Some("p1"), 2, Kind::AgentInjecting { bytes: 10 }));
        assert_eq!(st.session("web", Some("p1")).unwrap().agent, AgentState::Injecting);
        let connected = Kind::AgentConnected {
            agent_version: "1".into(),
            pid: 3,
            root: "/app".into(),
            via: "port-forward 127.0.0.1:1".into(),
        };
        st.apply(&ev("web", Some("p1"), 3, connected.clone()));
        // p3's first sync waits for p1's, then runs.
        st.apply(&ev("web", Some("p3"), 3, connected));
        st.apply(&ev("web", Some("p3"), 3, Kind::SyncTurn { waiting: true }));
        assert_eq!(st.session("web", Some("p3")).unwrap().agent, AgentState::Waiting);
        st.apply(&ev("web", Some("p3"), 4, Kind::SyncTurn { waiting: false }));
        assert_eq!(st.session("web", Some("p3")).unwrap().agent, AgentState::Syncing);
        let started = Kind::SyncStarted { batch: 1, initial: true, files: 10, deletes: 0, bytes: 100 };
        st.apply(&ev("web", Some("p1"), 4, started));
        let progress = Kind::SyncProgress { files_done: 5, files_total: 10, bytes_done: 50, bytes_total: 100 };
        st.apply(&ev("web", Some("p1"), 5, progress));
        let s = st.session("web", Some("p1")).unwrap();
        assert_eq!(s.agent, AgentState::Syncing);
        assert_eq!(s.progress.as_ref().map(|p| (p.files_done, p.started_ms)), Some((5, 4)));
        st.apply(&ev(
            "web",
            Some("p1"),
            6,
            Kind::InSync { files: 10, dirs: 1, checked_ms: 2.0, reused: 0, target_reused: 0 },
        ));
        let applied = Kind::SyncApplied {
            batch: 2,
            initial: false,
            written: 1,
            deleted: 0,
            bytes: 3,
            latency_ms: 1.5,
            paths: vec!["a.txt".into()],
        };
        st.apply(&ev("web", Some("p1"), 7, applied));
        let s = st.session("web", Some("p1")).unwrap();
        assert_eq!((s.agent.clone(), s.since_ms), (AgentState::Live, 6));
        assert!(s.progress.is_none());
        assert_eq!(s.latencies, VecDeque::from(vec![1.5]));
        assert_eq!(s.last_sync.as_ref().unwrap().paths, vec!["a.txt".to_string()]);
        assert_eq!(st.session("web", Some("p2")).unwrap().agent, AgentState::Connecting);
        st.apply(&ev("web", Some("p1"), 8, Kind::AppStarted { pid: 1 }));
        st.apply(&ev("web", Some("p1"), 9, Kind::AppStarted { pid: 2 }));
        assert_eq!(st.session("web", Some("p1")).unwrap().restarts, 1);
        st.apply(&ev("web", Some("p1"), 10, Kind::AgentLost { reason: "pod gone".into() }));
        st.apply(&ev("web", Some("p1"), 11, Kind::Reconnecting { attempt: 1, in_ms: 200 }));
        assert_eq!(st.session("web", Some("p1")).unwrap().agent, AgentState::Reconnecting { attempt: 1, in_ms: 200 });
        st.apply(&ev("web", None, 12, Kind::Warning { message: "no ready pods".into() }));
        assert_eq!(st.services["web"].note.as_deref(), Some("no ready pods"));
    }

    /// An intercept's connections add up: open now, in all, refused, and
    /// the rate over the last ten seconds; off clears it.
    #[test]
    fn intercept_connections_add_up() {
        let mut st = State::default();
        let on = Kind::InterceptOn { ports: vec!["8080 → localhost:3000".into()], header: Some("x-dev: a".into()) };
        st.apply(&ev("web", Some("p1"), 1_000, on));
        assert_eq!(st.session("web", Some("p1")).unwrap().intercept.label(), "personal");
        for t in [2_000, 6_000, 14_000] {
            st.apply(&ev(
                "web",
                Some("p1"),
                t,
                Kind::InterceptOpened { port: 8080, peer: "10.0.0.1:5".into(), local: 3000 },
            ));
        }
        let closed =
            Kind::InterceptClosed { port: 8080, peer: "10.0.0.1:5".into(), bytes_in: 10, bytes_out: 20, ms: 3 };
        st.apply(&ev("web", Some("p1"), 14_500, closed));
        st.apply(&ev(
            "web",
            Some("p1"),
            14_600,
            Kind::InterceptRefused { port: 8080, local: 3000, message: "x".into() },
        ));
        let InterceptState::On(i) = &st.session("web", Some("p1")).unwrap().intercept else { panic!("intercept off") };
        assert_eq!((i.open, i.connections, i.refused, i.bytes_in, i.bytes_out), (2, 3, 1, 10, 20));
        // 6 000 and 14 000 are within ten seconds of 15 000; 2 000 is not.
        assert_eq!(i.per_sec(15_000), 0.2);
        st.apply(&ev("web", Some("p1"), 15_000, Kind::InterceptOff { reason: "stopped".into() }));
        assert_eq!(st.session("web", Some("p1")).unwrap().intercept, InterceptState::Off);
    }
}
