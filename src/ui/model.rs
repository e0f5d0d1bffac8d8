//! What the dashboard shows, and what its keys ask for. The model owns
//! its copy of the [`State`] and a log; it changes only by the events and
//! keys it is given, so a frame never waits on a session, and the tests
//! drive it with no terminal.

use crate::events::{self, Event, Kind};
use crate::hub::ActionKind;
use crate::state::{InterceptState, SessionState, State};
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use std::collections::VecDeque;

/// Log lines kept for the log pane.
const KEEP_LOGS: usize = 5000;

/// Where a log line came from: the app (its output, the pod's log, the
/// `on_sync` commands, the agent's own log) or devloop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    App,
    Command,
    Devloop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Info,
    Warn,
    Error,
}

#[derive(Debug, Clone)]
pub struct LogLine {
    pub at_ms: u64,
    pub who: String,
    pub source: Source,
    pub level: Level,
    pub text: String,
}

/// A row of the service table: a service, or one pod of a Kubernetes one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowRef {
    pub service: String,
    /// The pod, for a pod's row. A service with one session (local or
    /// exec) has no pod rows: its own row is its session.
    pub pod: Option<String>,
}

/// What a key asks of the dashboard's owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Quit,
    Act { service: String, pod: Option<String>, kind: ActionKind },
}

pub struct Model {
    pub state: State,
    pub logs: VecDeque<LogLine>,
    /// Index into [`Model::rows`].
    pub selected: usize,
    pub help: bool,
    pub logs_full: bool,
    /// Log lines shown contain this (case-insensitive).
    pub filter: String,
    /// Keys go to the filter while it is typed.
    pub typing_filter: bool,
    /// Lines scrolled up from the newest; 0 follows new lines.
    pub scroll: usize,
    /// The answer to the last action, or what a key could not do.
    pub status: Option<String>,
    pub color: bool,
    pub now_ms: u64,
    /// Local time's offset from UTC, for the log's clock.
    pub utc_offset_s: i64,
    pub title: String,
}

impl Model {
    pub fn new(state: State, title: &str, color: bool, now_ms: u64, utc_offset_s: i64) -> Model {
        Model {
            state,
            logs: VecDeque::new(),
            selected: 0,
            help: false,
            logs_full: false,
            filter: String::new(),
            typing_filter: false,
            scroll: 0,
            status: None,
            color,
            now_ms,
            utc_offset_s,
            title: title.to_string(),
        }
    }

    /// Adds an event: to the state, and to the log if it is one.
    pub fn apply(&mut self, ev: &Event) {
        self.state.apply(ev);
        if let Kind::ActionDone { action, ok, message } = &ev.kind {
            self.status = Some(format!("{action}: {}{message}", if *ok { "" } else { "failed: " }));
        }
        if let Some(line) = log_line(ev) {
            if self.logs.len() == KEEP_LOGS {
                self.logs.pop_front();
            }
            self.logs.push_back(line);
            // A reader scrolled up keeps their place.
            if self.scroll > 0 {
                self.scroll += 1;
            }
        }
        // Rows only come and go with sessions.
        if matches!(ev.kind, Kind::AgentStarting { .. }) || self.selected > 0 {
            let n = self.rows().len();
            if self.selected >= n {
                self.selected = n.saturating_sub(1);
            }
        }
    }

    /// The table's rows: each service, then its pods (Kubernetes).
    pub fn rows(&self) -> Vec<RowRef> {
        let mut rows = Vec::new();
        for (name, svc) in &self.state.services {
            rows.push(RowRef { service: name.clone(), pod: None });
            for pod in svc.sessions.keys().filter(|k| !k.is_empty()) {
                rows.push(RowRef { service: name.clone(), pod: Some(pod.clone()) });
            }
        }
        rows
    }

    pub fn selected_row(&self) -> Option<RowRef> {
        self.rows().into_iter().nth(self.selected)
    }

    /// The session a row shows: its pod's, or the service's only one (for
    /// a service row of a Kubernetes service: its first pod's).
    pub fn session(&self, row: &RowRef) -> Option<&SessionState> {
        let svc = self.state.services.get(&row.service)?;
        match &row.pod {
            Some(p) => svc.sessions.get(p),
            None => svc.sessions.get("").or_else(|| svc.sessions.values().next()),
        }
    }

    /// Log lines that pass the filter, oldest first.
    pub fn visible_logs(&self) -> impl Iterator<Item = &LogLine> {
        let f = self.filter.to_lowercase();
        self.logs
            .iter()
            .filter(move |l| f.is_empty() || l.text.to_lowercase().contains(&f) || l.who.to_lowercase().contains(&f))
    }

    /// Handles a key; returns what it asks of the owner, if anything.
    pub fn key(&mut self, k: KeyEvent) -> Option<Command> {
        if k.modifiers.contains(KeyModifiers::CONTROL) && matches!(k.code, KeyCode::Char('c') | KeyCode::Char('d')) {
            return Some(Command::Quit);
        }
        if self.typing_filter {
            match k.code {
                KeyCode::Enter => self.typing_filter = false,
                KeyCode::Esc => {
                    self.typing_filter = false;
                    self.filter.clear();
                }
                KeyCode::Backspace => {
                    self.filter.pop();
                }
                KeyCode::Char(c) => self.filter.push(c),
                _ => {}
            }
            self.scroll = 0;
            return None;
        }
        if self.help {
            // Any key closes the help (q still quits).
            self.help = false;
            return (k.code == KeyCode::Char('q')).then_some(Command::Quit);
        }
        let rows = self.rows().len();
        match k.code {
            KeyCode::Char('q') => return Some(Command::Quit),
            KeyCode::Char('?') => self.help = true,
            KeyCode::Down | KeyCode::Char('j') if rows > 0 => self.selected = (self.selected + 1).min(rows - 1),
            KeyCode::Up | KeyCode::Char('k') => self.selected = self.selected.saturating_sub(1),
            KeyCode::Home => self.scroll = self.visible_logs().count(),
            KeyCode::End => self.scroll = 0,
            KeyCode::PageUp => self.scroll = (self.scroll + 10).min(self.visible_logs().count()),
            KeyCode::PageDown => self.scroll = self.scroll.saturating_sub(10),
            KeyCode::Char('l') => self.logs_full = !self.logs_full,
            KeyCode::Char('/') => self.typing_filter = true,
            KeyCode::Esc => {
                self.filter.clear();
                self.logs_full = false;
                self.status = None;
            }
            KeyCode::Char('s') => return self.act(ActionKind::Resync),
            KeyCode::Char('r') => return self.act(ActionKind::Restart),
            KeyCode::Char('c') => return self.act(ActionKind::Run { index: 0 }),
            KeyCode::Char(d @ '1'..='9') => return self.act(ActionKind::Run { index: d as usize - '1' as usize }),
            KeyCode::Char('i') => {
                let on = self.selected_row().is_some_and(|r| self.intercepting(&r));
                return self.act(ActionKind::Intercept { on: !on });
            }
            _ => {}
        }
        None
    }

    /// Whether the row's intercept is held (any pod's, for a service row).
    fn intercepting(&self, row: &RowRef) -> bool {
        let Some(svc) = self.state.services.get(&row.service) else { return false };
        svc.sessions
            .iter()
            .filter(|(p, _)| row.pod.as_ref().is_none_or(|want| want == *p))
            .any(|(_, s)| matches!(s.intercept, InterceptState::On(_)))
    }

    fn act(&mut self, kind: ActionKind) -> Option<Command> {
        let Some(row) = self.selected_row() else {
            self.status = Some("no service yet".into());
            return None;
        };
        let whom = match &row.pod {
            Some(p) => format!("{}/{p}", row.service),
            None => row.service.clone(),
        };
        self.status = Some(format!("{}: asked of {whom}…", kind.describe()));
        Some(Command::Act { service: row.service, pod: row.pod, kind })
    }
}

/// The log line an event makes, if it makes one: the app's and the
/// commands' output as they printed it, devloop's own news as its plain
/// line. Progress and per-connection events would drown the rest.
fn log_line(ev: &Event) -> Option<LogLine> {
    let who = match &ev.pod {
        Some(p) => format!("{}/{p}", ev.service),
        None if ev.service.is_empty() => "devloop".into(),
        None => ev.service.clone(),
    };
    let (source, level, text) = match &ev.kind {
        Kind::AppOutput { line, .. } | Kind::PodLog { line } => (Source::App, Level::Info, line.clone()),
        Kind::AgentLog { line } => (Source::App, Level::Info, format!("agent: {line}")),
        Kind::CommandOutput { line, .. } => (Source::Command, Level::Info, line.clone()),
        Kind::SyncProgress { .. }
        | Kind::InterceptOpened { .. }
        | Kind::InterceptClosed { .. }
        | Kind::SyncStarted { .. }
        | Kind::ActionDone { .. } => return None,
        Kind::Error { .. } | Kind::SyncError { .. } | Kind::AgentLost { .. } | Kind::AppFailed { .. } => {
            (Source::Devloop, Level::Error, body(ev))
        }
        Kind::Warning { .. } | Kind::InterceptRefused { .. } | Kind::EventsLost { .. } => {
            (Source::Devloop, Level::Warn, body(ev))
        }
        Kind::CommandExited { code, .. } if *code != Some(0) => (Source::Devloop, Level::Warn, body(ev)),
        _ => (Source::Devloop, Level::Info, body(ev)),
    };
    Some(LogLine { at_ms: ev.ts, who, source, level, text })
}

/// An event's plain line without its `[who]` prefix.
fn body(ev: &Event) -> String {
    let line = events::plain(ev);
    match line.split_once("] ") {
        Some((_, rest)) => rest.to_string(),
        None => line,
    }
}
