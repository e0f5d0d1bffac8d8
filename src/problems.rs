//! Problems at the developer's own file and line. Post-sync commands run
//! in the target and print the target's paths (`/app/src/x.ts(3,5): error
//! …`); an editor can open none of them. This reads each command's output
//! as it streams, recognises the common shapes of compiler, linter and
//! traceback output, maps each path back through the sync rules to the
//! source file it came from, and reports a `problem` event there.
//!
//! The shapes: `file:line[:col]: [severity:] message` (gcc, clang, go,
//! mypy, flake8, many more), `file(line,col): severity …` (tsc, msbuild),
//! rustc's `error[…]: message` then ` --> file:line:col`, eslint's
//! stylish blocks (a file line, then `line:col  severity  message  rule`),
//! and Python tracebacks (the innermost frame in the synced tree, with the
//! exception's line as the message).
//!
//! It is a subscriber of the hub, off the sync's path.

use crate::config::{Service, Target};
use crate::events::{Event, Kind, Reporter};
use crate::hub::Hub;
use serde::Serialize;
use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use tokio::sync::broadcast::{self, error::RecvError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Error,
    Warning,
    Info,
}

impl Severity {
    fn parse(s: &str) -> Option<Severity> {
        match s.to_ascii_lowercase().as_str() {
            "error" | "fatal error" | "fatal" => Some(Severity::Error),
            "warning" | "warn" => Some(Severity::Warning),
            "note" | "info" | "help" | "hint" => Some(Severity::Info),
            _ => None,
        }
    }
}

/// A problem as printed: where (in the target's terms), how bad, what.
/// `at` lists candidate locations, best first (a traceback's frames,
/// innermost first): the first one inside the synced tree is used.
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    pub at: Vec<(String, u32, Option<u32>)>,
    pub severity: Severity,
    pub message: String,
}

/// Reads one command's output, line by line; some shapes span lines.
#[derive(Debug, Default)]
pub struct Parser {
    /// rustc: the `error[…]: message` line waiting for its ` --> ` line.
    rust_pending: Option<(Severity, String)>,
    /// eslint stylish: the file of the lines that follow.
    eslint_file: Option<String>,
    /// A Python traceback's frames so far, outermost first.
    frames: Vec<(String, u32)>,
    in_traceback: bool,
}

fn digits(s: &str) -> Option<u32> {
    (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse().ok()).flatten()
}

/// Whether `s` looks like a file path (not a URL, a time, or prose).
fn pathlike(s: &str) -> bool {
    !s.is_empty()
        && !s.contains(char::is_whitespace)
        && !s.contains("://")
        && (s.contains('/')
            || s.rsplit_once('.').is_some_and(|(a, ext)| {
                !a.is_empty() && ext.chars().all(|c| c.is_ascii_alphanumeric()) && !ext.is_empty()
            }))
}

/// `severity: message`, `severity[CODE]: message` or `severity CODE:
/// message` at the start of `rest` (the code stays in the message: it is
/// what people search for); else no severity, and `rest` whole.
fn split_severity(rest: &str) -> (Option<Severity>, String) {
    let r = rest.trim();
    let whole = (None, r.to_string());
    let Some((head, msg)) = r.split_once(':') else { return whole };
    let (head, msg) = (head.trim(), msg.trim());
    if let Some(sev) = Severity::parse(head) {
        return (Some(sev), msg.to_string());
    }
    let coded = head
        .split_once('[')
        .map(|(w, c)| (w, c.trim_end_matches(']')))
        .or_else(|| head.split_once(' ').filter(|(_, c)| !c.contains(' ')));
    match coded.and_then(|(w, code)| Some((Severity::parse(w)?, code))) {
        Some((sev, code)) => (Some(sev), format!("{code}: {msg}")),
        None => whole,
    }
}

impl Parser {
    pub fn new() -> Parser {
        Parser::default()
    }

    /// The problem this line completes, if any.
    pub fn feed(&mut self, line: &str) -> Option<Found> {
        let line = line.trim_end_matches(['\r', '\n']);
        if let Some(f) = self.python(line) {
            return Some(f);
        }
        if self.in_traceback {
            return None;
        }
        if let Some(f) = self.rust(line) {
            return Some(f);
        }
        if let Some(f) = self.eslint(line) {
            return Some(f);
        }
        tsc(line).or_else(|| gnu(line))
    }

    fn python(&mut self, line: &str) -> Option<Found> {
        if line.starts_with("Traceback (most recent call last)") {
            self.in_traceback = true;
            self.frames.clear();
            return None;
        }
        // `  File "x.py", line 3, in f` (also SyntaxError's, without `in`).
        if let Some(rest) = line.trim_start().strip_prefix("File \"") {
            if let Some((path, after)) = rest.split_once("\", line ") {
                let n = after.split(',').next().and_then(digits);
                if let Some(n) = n {
                    self.in_traceback = true;
                    self.frames.push((path.to_string(), n));
                    return None;
                }
            }
        }
        if self.in_traceback && !line.starts_with(char::is_whitespace) && !line.is_empty() {
            // The exception: `NameError: name 'x' is not defined`.
            self.in_traceback = false;
            let frames = std::mem::take(&mut self.frames);
            let head = line.split(':').next().unwrap_or("");
            let is_exception =
                !head.is_empty() && head.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
            if is_exception && !frames.is_empty() {
                let at = frames.into_iter().rev().map(|(p, n)| (p, n, None)).collect();
                return Some(Found { at, severity: Severity::Error, message: line.to_string() });
            }
        }
        None
    }

    fn rust(&mut self, line: &str) -> Option<Found> {
        if let Some(rest) = line.trim_start().strip_prefix("--> ") {
            let (sev, msg) = self.rust_pending.take()?;
            let (path, l, c) = path_line_col(rest.trim())?;
            return Some(Found { at: vec![(path, l, c)], severity: sev, message: msg });
        }
        for (prefix, sev) in [("error", Severity::Error), ("warning", Severity::Warning)] {
            if let Some(rest) = line.strip_prefix(prefix) {
                let rest =
                    rest.strip_prefix(|c| c == '[').map(|r| r.split_once("]").map_or(r, |(_, m)| m)).unwrap_or(rest);
                if let Some(msg) = rest.strip_prefix(": ") {
                    let code = line[prefix.len()..].strip_prefix('[').and_then(|r| r.split_once(']')).map(|(c, _)| c);
                    let msg = match code {
                        Some(c) => format!("{c}: {msg}"),
                        None => msg.to_string(),
                    };
                    self.rust_pending = Some((sev, msg));
                    return None;
                }
            }
        }
        None
    }

    fn eslint(&mut self, line: &str) -> Option<Found> {
        if line.is_empty() {
            self.eslint_file = None;
            return None;
        }
        if !line.starts_with(char::is_whitespace) {
            self.eslint_file = (pathlike(line) && !line.contains(':')).then(|| line.to_string());
            return None;
        }
        let file = self.eslint_file.clone()?;
        // `  3:5  error  'x' is defined but never used  no-unused-vars`
        let mut parts = line.split_whitespace();
        let (l, c) = parts.next()?.split_once(':')?;
        let (l, c) = (digits(l)?, digits(c)?);
        let severity = Severity::parse(parts.next()?)?;
        let rest: Vec<&str> = line.trim().splitn(3, char::is_whitespace).collect();
        let body = rest.get(2)?.trim_start();
        let body = body.split_once(char::is_whitespace).map_or(body, |(_, b)| b).trim();
        // The rule is the last column, two spaces away.
        let (message, rule) = match body.rsplit_once("  ") {
            Some((m, r)) if !r.contains(' ') => (m.trim(), Some(r.trim())),
            _ => (body, None),
        };
        let message = match rule {
            Some(r) => format!("{message} ({r})"),
            None => message.to_string(),
        };
        Some(Found { at: vec![(file, l, Some(c))], severity, message })
    }
}

/// `path:line[:col]` exactly.
fn path_line_col(s: &str) -> Option<(String, u32, Option<u32>)> {
    let mut it = s.rsplitn(3, ':');
    let a = it.next()?;
    let b = it.next()?;
    match it.next() {
        Some(p) if digits(b).is_some() && digits(a).is_some() => Some((p.to_string(), digits(b)?, digits(a))),
        _ => {
            let p = b;
            let l = digits(a)?;
            Some((p.to_string(), l, None))
        }
    }
}

/// `file(line,col): error TS2322: message`.
fn tsc(line: &str) -> Option<Found> {
    let (head, rest) = line.split_once("): ")?;
    let (path, pos) = head.rsplit_once('(')?;
    let (l, c) = pos.split_once(',').map_or((pos, None), |(l, c)| (l, Some(c)));
    let (l, c) = (digits(l)?, c.map(digits).unwrap_or(None));
    if !pathlike(path) {
        return None;
    }
    let (sev, msg) = split_severity(rest);
    Some(Found { at: vec![(path.to_string(), l, c)], severity: sev?, message: msg })
}

/// `file:line[:col]: [severity:] message`.
fn gnu(line: &str) -> Option<Found> {
    let line = line.trim_start();
    // A tool's name first (`vet: ./main.go:7:2: …`).
    let line = match line.split_once(": ") {
        Some((tool, rest))
            if !tool.is_empty() && tool.bytes().all(|b| b.is_ascii_lowercase()) && rest.contains(':') =>
        {
            if pathlike(rest.split(':').next().unwrap_or("")) {
                rest
            } else {
                line
            }
        }
        _ => line,
    };
    let mut fields = line.splitn(4, ':');
    let path = fields.next()?;
    if !pathlike(path) {
        return None;
    }
    let l = digits(fields.next()?)?;
    let third = fields.next()?;
    let (c, rest) = match digits(third) {
        Some(c) => (Some(c), fields.next()?),
        None => (None, &line[path.len() + 1 + l.to_string().len() + 1..]),
    };
    if rest.trim().is_empty() {
        return None;
    }
    let (sev, msg) = split_severity(rest);
    Some(Found { at: vec![(path.to_string(), l, c)], severity: sev.unwrap_or(Severity::Error), message: msg })
}

/// Lexically normal: `.` and `x/..` gone. None when `..` leaves the top.
fn normalize(p: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::Prefix(_) => out.push(c.as_os_str()),
        }
    }
    Some(out)
}

/// Maps the target's paths back to the source's, for one service.
#[derive(Debug, Clone)]
pub struct Mapper {
    /// (`to` under the target root, local `from`), longest `to` first.
    rules: Vec<(PathBuf, PathBuf)>,
}

impl Mapper {
    pub fn new(svc: &Service) -> Mapper {
        Mapper::from_rules(svc.rules.iter().map(|r| (r.to.clone(), r.from.clone())))
    }

    /// From (`to` under the target root, local `from`) pairs.
    pub fn from_rules(rules: impl IntoIterator<Item = (String, PathBuf)>) -> Mapper {
        let mut rules: Vec<(PathBuf, PathBuf)> =
            rules.into_iter().map(|(to, from)| (PathBuf::from(to), from)).collect();
        rules.sort_by_key(|(to, _)| std::cmp::Reverse(to.components().count()));
        Mapper { rules }
    }

    /// The source file a path printed by a command maps to. `root` is the
    /// target's root; `workdir` the command's directory under it. A path
    /// outside every sync rule (a dependency, a system file) maps to
    /// nothing.
    pub fn local(&self, printed: &str, root: &str, workdir: &str) -> Option<PathBuf> {
        let printed = Path::new(printed);
        let rel = if printed.is_absolute() {
            // A local target prints local absolute paths: a path already in
            // the source is itself.
            if self.rules.iter().any(|(_, from)| printed.starts_with(from)) && printed.exists() {
                return Some(printed.to_path_buf());
            }
            normalize(printed.strip_prefix(root).ok()?)?
        } else {
            normalize(&Path::new(workdir).join(printed))?
        };
        let mut fallback = None;
        for (to, from) in &self.rules {
            if let Ok(rest) = rel.strip_prefix(to) {
                let local = from.join(rest);
                if local.exists() {
                    return Some(local);
                }
                fallback.get_or_insert(local);
            }
        }
        fallback
    }
}

/// Follows every service's post-sync commands and reports the problems
/// in their output. Ends when the hub closes.
pub async fn follow(hub: Hub, mut rx: broadcast::Receiver<Arc<Event>>, services: Vec<Service>) {
    struct Svc {
        mapper: Mapper,
        /// Command (as shown) → its workdir under the root.
        workdirs: HashMap<String, String>,
        rep: Reporter,
        /// Local and exec targets print paths under this root.
        local_root: Option<String>,
    }
    let mut svcs: HashMap<String, Svc> = services
        .iter()
        .map(|s| {
            let workdirs = s.on_sync.iter().map(|t| (t.command.display(), t.command.workdir.clone())).collect();
            let local_root = match &s.target {
                Target::Local { root } => Some(root.display().to_string()),
                _ => None,
            };
            (s.name.clone(), Svc { mapper: Mapper::new(s), workdirs, rep: hub.reporter(&s.name), local_root })
        })
        .collect();
    // Per session: its root, and a parser per running command.
    let mut roots: HashMap<(String, Option<String>), String> = HashMap::new();
    let mut parsers: HashMap<(String, Option<String>, String), Parser> = HashMap::new();
    loop {
        let ev: Arc<Event> = match rx.recv().await {
            Ok(ev) => ev,
            Err(RecvError::Lagged(_)) => continue,
            Err(RecvError::Closed) => return,
        };
        let Some(svc) = svcs.get_mut(&ev.service) else { continue };
        let session = (ev.service.clone(), ev.pod.clone());
        match &ev.kind {
            Kind::AgentConnected { root, .. } => {
                roots.insert(session, root.clone());
            }
            Kind::CommandStarted { command } => {
                parsers.insert((ev.service.clone(), ev.pod.clone(), command.clone()), Parser::new());
            }
            Kind::CommandExited { command, .. } => {
                parsers.remove(&(ev.service.clone(), ev.pod.clone(), command.clone()));
            }
            Kind::CommandOutput { command, line, .. } => {
                let key = (ev.service.clone(), ev.pod.clone(), command.clone());
                let Some(found) = parsers.entry(key).or_default().feed(line) else { continue };
                let root = roots.get(&session).cloned().or_else(|| svc.local_root.clone()).unwrap_or_default();
                let workdir = svc.workdirs.get(command).cloned().unwrap_or_default();
                let local =
                    found.at.iter().find_map(|(p, l, c)| svc.mapper.local(p, &root, &workdir).map(|f| (f, *l, *c)));
                if let Some((file, line, column)) = local {
                    let rep = match &ev.pod {
                        Some(p) => svc.rep.for_pod(p),
                        None => svc.rep.clone(),
                    };
                    rep.send(Kind::Problem {
                        file: file.display().to_string(),
                        line,
                        column,
                        severity: found.severity,
                        message: found.message,
                        command: command.clone(),
                    });
                }
            }
            _ => {}
        }
    }
}
