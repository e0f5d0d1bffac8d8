//! What happens, as typed events: every part reports an [`Event`] through a
//! [`Reporter`]; the hub (`hub.rs`) keeps the state they add up to and
//! hands them to the front-ends (plain lines, NDJSON, the dashboard, the
//! control socket), which only subscribe.
//!
//! The NDJSON form (`--json`) is a stable interface for editors and scripts,
//! documented in `docs/events.md` (a test keeps the two in step): one object
//! per line with `ts` (Unix milliseconds), `service` and `type`; fields are
//! only ever added.

use serde::Serialize;
use std::io::Write;
use std::sync::Arc;
use tokio::sync::mpsc;

/// One thing that happened, to one service (or to devloop itself when
/// `service` is empty), and within it to one pod's session and container
/// when there are several.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub ts: u64,
    pub service: String,
    pub pod: Option<String>,
    pub container: Option<String>,
    pub kind: Kind,
}

/// The NDJSON form. `service` keeps the form it had before pods were their
/// own field (`NAME/POD` for a pod's events), so nothing that read it
/// breaks; `pod` and `container` say the same separately.
#[derive(Serialize)]
struct Wire<'a> {
    ts: u64,
    service: std::borrow::Cow<'a, str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pod: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    container: Option<&'a str>,
    #[serde(flatten)]
    kind: &'a Kind,
}

impl Serialize for Event {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let service = match &self.pod {
            Some(p) => format!("{}/{p}", self.service).into(),
            None => self.service.as_str().into(),
        };
        Wire { ts: self.ts, service, pod: self.pod.as_deref(), container: self.container.as_deref(), kind: &self.kind }
            .serialize(s)
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Kind {
    /// Starting (or restarting) the agent on a target.
    AgentStarting {
        target: String,
    },
    /// A session with the agent is open.
    AgentConnected {
        agent_version: String,
        pid: u32,
        root: String,
        /// How the session reaches the agent: `stdio`, `exec` (a pod's
        /// exec stream) or `port-forward 127.0.0.1:PORT`.
        via: String,
    },
    /// The session ended; `reason` says how.
    AgentLost {
        reason: String,
    },
    /// Will try again after `in_ms`.
    Reconnecting {
        attempt: u32,
        in_ms: u64,
    },
    /// A line the agent printed on its stderr.
    AgentLog {
        line: String,
    },
    /// Watching this many directories, with this backend (`inotify` or
    /// `notify`).
    Watching {
        dirs: usize,
        watcher: String,
    },
    /// The pods of a service run their first syncs one at a time (each
    /// holds a scan and a plan of the whole tree while it runs): `waiting`
    /// when this pod's must wait for another pod's to end, then not
    /// `waiting` when its turn has come.
    SyncTurn {
        waiting: bool,
    },
    /// A batch is on its way.
    SyncStarted {
        batch: u64,
        initial: bool,
        files: u64,
        deletes: u64,
        bytes: u64,
    },
    /// A batch has landed. `latency_ms` runs from the first change seen (live)
    /// or the start of the sync (initial) to the agent's acknowledgement.
    SyncApplied {
        batch: u64,
        initial: bool,
        written: u64,
        deleted: u64,
        bytes: u64,
        latency_ms: f64,
        /// The batch's first paths (written, then deleted), at most 20.
        #[serde(skip_serializing_if = "Vec::is_empty")]
        paths: Vec<String>,
    },
    /// The first sync's progress, after each of its batches.
    SyncProgress {
        files_done: u64,
        files_total: u64,
        bytes_done: u64,
        bytes_total: u64,
    },
    /// One path could not be synced. A name that is not UTF-8 is shown
    /// with replacement characters, and `path_not_utf8` says so.
    SyncError {
        path: String,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        path_not_utf8: bool,
        message: String,
    },
    /// The target matches the source (after the initial sync).
    InSync {
        files: u64,
        dirs: u64,
        checked_ms: f64,
        /// Files whose hash came from the cache, not read: here, and in
        /// the target.
        #[serde(default)]
        reused: u64,
        #[serde(default)]
        target_reused: u64,
    },
    CommandStarted {
        command: String,
    },
    CommandOutput {
        command: String,
        stream: String,
        line: String,
    },
    CommandExited {
        command: String,
        code: Option<i32>,
        ms: u64,
    },
    AppStarted {
        pid: u32,
    },
    AppOutput {
        stream: String,
        line: String,
    },
    AppExited {
        code: Option<i32>,
    },
    AppStopped,
    AppFailed {
        message: String,
    },
    /// A line of the container's own log (Kubernetes targets).
    PodLog {
        line: String,
    },
    /// devloop changed (or restored) a workload in the cluster; `change`
    /// says what, and how it is undone.
    WorkloadChanged {
        workload: String,
        change: String,
    },
    Warning {
        message: String,
    },
    /// Something failed; `hint` says what to do.
    Error {
        message: String,
        hint: Option<String>,
    },
    /// The agent is being copied into a pod's container.
    AgentInjecting {
        bytes: u64,
    },
    /// An action asked of a running devloop (resync, restart, run a
    /// command) was carried out, or not: `message` says what happened.
    ActionDone {
        action: String,
        ok: bool,
        message: String,
    },
    /// A subscriber fell behind and lost this many events.
    EventsLost {
        count: u64,
    },
    /// The intercept is held: calls to these ports (`SERVICE_PORT →
    /// localhost:LOCAL`) reach this machine; with `header`, only the
    /// HTTP/1.1 requests that carry it.
    InterceptOn {
        ports: Vec<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        header: Option<String>,
    },
    /// The intercept is not held any more; `reason` says why, and who
    /// answers now.
    InterceptOff {
        reason: String,
    },
    /// An intercepted connection reached this machine.
    InterceptOpened {
        port: u16,
        peer: String,
        local: u16,
    },
    /// It ended: bytes each way (`bytes_in` to the local process), and how
    /// long it lasted.
    InterceptClosed {
        port: u16,
        peer: String,
        bytes_in: u64,
        bytes_out: u64,
        ms: u64,
    },
    /// A post-sync command printed a problem at a path that maps back,
    /// through the sync rules, to this source file (absolute).
    Problem {
        file: String,
        line: u32,
        #[serde(skip_serializing_if = "Option::is_none")]
        column: Option<u32>,
        severity: crate::problems::Severity,
        message: String,
        command: String,
    },
    /// Every service has finished its initial sync: the target matches
    /// the source everywhere (once per run).
    Ready {
        services: usize,
    },
    /// Nothing listens on the local port: the caller's connection was
    /// closed at once (or answered `502` by devloop, for HTTP).
    InterceptRefused {
        port: u16,
        local: u16,
        message: String,
    },
}

/// Sends events for one service (and one of its pods).
#[derive(Clone)]
pub struct Reporter {
    service: Arc<str>,
    pod: Option<Arc<str>>,
    tx: mpsc::UnboundedSender<Event>,
}

impl Reporter {
    pub fn new(service: &str, tx: mpsc::UnboundedSender<Event>) -> Reporter {
        Reporter { service: service.into(), pod: None, tx }
    }

    /// A reporter for one pod of this service.
    pub fn for_pod(&self, pod: &str) -> Reporter {
        Reporter { service: self.service.clone(), pod: Some(pod.into()), tx: self.tx.clone() }
    }

    pub fn service(&self) -> &str {
        &self.service
    }

    pub fn pod(&self) -> Option<&str> {
        self.pod.as_deref()
    }

    pub fn send(&self, kind: Kind) {
        let _ = self.tx.send(Event {
            ts: now_ms(),
            service: self.service.to_string(),
            pod: self.pod.as_deref().map(String::from),
            container: None,
            kind,
        });
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// How events are shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Plain,
    Json,
}

/// Prints every event, as it comes, until the hub closes. A printer that
/// falls behind the hub's buffer (stdout blocked for long) loses the events
/// it missed: it says how many (an `events_lost` line), and goes on with
/// the next.
pub async fn print(rx: tokio::sync::broadcast::Receiver<Arc<Event>>, format: Format) {
    print_to(rx, format, std::io::stdout()).await
}

/// [`print`], into `out` (the dashboard's log file).
pub async fn print_to<W: Write>(mut rx: tokio::sync::broadcast::Receiver<Arc<Event>>, format: Format, mut out: W) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let ev = match rx.recv().await {
            Ok(ev) => ev,
            Err(RecvError::Closed) => break,
            Err(RecvError::Lagged(n)) => Arc::new(Event {
                ts: now_ms(),
                service: String::new(),
                pod: None,
                container: None,
                kind: Kind::EventsLost { count: n },
            }),
        };
        let _ = match format {
            Format::Json => {
                // Plain data: serializing it cannot fail.
                serde_json::to_writer(&mut out, &*ev).expect("event serializes");
                writeln!(out)
            }
            Format::Plain => writeln!(out, "{}", plain(&ev)),
        };
        let _ = out.flush();
    }
}

/// One human-readable line.
pub fn plain(ev: &Event) -> String {
    let who = match (&ev.pod, ev.service.is_empty()) {
        (_, true) => "devloop".to_string(),
        (Some(p), false) => format!("{}/{p}", ev.service),
        (None, false) => ev.service.clone(),
    };
    let body = match &ev.kind {
        Kind::AgentStarting { target } => format!("starting agent on {target}"),
        Kind::AgentConnected { agent_version, pid, root, via } => {
            format!("agent {agent_version} connected over {via} (pid {pid}, root {root})")
        }
        Kind::AgentLost { reason } => format!("agent connection lost: {reason}"),
        Kind::Reconnecting { attempt, in_ms } => {
            format!("reconnecting in {in_ms} ms (attempt {attempt})")
        }
        Kind::AgentLog { line } => format!("agent: {line}"),
        Kind::Watching { dirs, watcher } => format!("watching {dirs} directories ({watcher})"),
        Kind::SyncStarted { initial, files, deletes, bytes, .. } => format!(
            "{} {files} files ({}), {deletes} deletions",
            if *initial { "initial sync: sending" } else { "sending" },
            human_bytes(*bytes)
        ),
        Kind::SyncApplied { initial, written, deleted, bytes, latency_ms, .. } => format!(
            "{}synced {written} written, {deleted} deleted ({}) in {latency_ms:.1} ms",
            if *initial { "initial sync: " } else { "" },
            human_bytes(*bytes)
        ),
        Kind::SyncError { path, message, .. } => format!("error: {path}: {message}"),
        Kind::SyncTurn { waiting: true } => "the first sync waits for another pod's to end".into(),
        Kind::SyncTurn { waiting: false } => "the first sync's turn has come".into(),
        Kind::InSync { files, dirs, checked_ms, .. } => {
            format!("in sync: {files} files, {dirs} directories (checked in {checked_ms:.0} ms)")
        }
        Kind::CommandStarted { command } => format!("running `{command}`"),
        Kind::CommandOutput { line, .. } => format!("  | {line}"),
        Kind::CommandExited { command, code, ms } => match code {
            Some(0) => format!("`{command}` done in {ms} ms"),
            Some(c) => format!("`{command}` failed with exit code {c} after {ms} ms"),
            None => format!("`{command}` was killed after {ms} ms"),
        },
        Kind::AppStarted { pid } => format!("app started (pid {pid})"),
        Kind::AppOutput { line, .. } => format!("app | {line}"),
        Kind::AppExited { code } => match code {
            Some(c) => format!("app exited with code {c}"),
            None => "app was killed by a signal".into(),
        },
        Kind::AppStopped => "app stopped".into(),
        Kind::AppFailed { message } => format!("app failed to start: {message}"),
        Kind::PodLog { line } => format!("log | {line}"),
        Kind::WorkloadChanged { workload, change } => format!("{workload}: {change}"),
        Kind::Warning { message } => format!("warning: {message}"),
        Kind::SyncProgress { files_done, files_total, bytes_done, bytes_total } => format!(
            "initial sync: {files_done}/{files_total} files, {} of {}",
            human_bytes(*bytes_done),
            human_bytes(*bytes_total)
        ),
        Kind::AgentInjecting { bytes } => format!("copying the agent into the pod ({})", human_bytes(*bytes)),
        Kind::ActionDone { action, ok, message } => {
            format!("{action}: {}{message}", if *ok { "" } else { "failed: " })
        }
        Kind::EventsLost { count } => format!("(fell behind: {count} events not shown)"),
        Kind::InterceptOn { ports, header } => format!(
            "intercepting {}{}",
            ports.join(", "),
            header.as_ref().map(|h| format!(" (requests with {h} only)")).unwrap_or_default()
        ),
        Kind::InterceptOff { reason } => format!("intercept released: {reason}"),
        Kind::InterceptOpened { port, peer, local } => format!("intercept {port}: {peer} → localhost:{local}"),
        Kind::InterceptClosed { port, peer, bytes_in, bytes_out, ms } => format!(
            "intercept {port}: {peer} done in {ms} ms ({} in, {} out)",
            human_bytes(*bytes_in),
            human_bytes(*bytes_out)
        ),
        Kind::InterceptRefused { port, local, message } => {
            format!("intercept {port}: refused, nothing listens on localhost:{local} ({message})")
        }
        Kind::Problem { file, line, column, severity, message, .. } => format!(
            "{file}:{line}:{}: {}: {message}",
            column.unwrap_or(1),
            match severity {
                crate::problems::Severity::Error => "error",
                crate::problems::Severity::Warning => "warning",
                crate::problems::Severity::Info => "info",
            }
        ),
        Kind::Ready { services } => format!("ready: {services} service(s) in sync"),
        Kind::Error { message, hint } => match hint {
            Some(h) => format!("error: {message}\n  hint: {h}"),
            None => format!("error: {message}"),
        },
    };
    format!("[{who}] {body}")
}

pub fn human_bytes(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}
