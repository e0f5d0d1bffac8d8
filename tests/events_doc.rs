//! `docs/events.md` and the event types cannot drift apart: every event
//! type and every field it serializes is documented, and the document
//! names no type or field the code does not have.

use devloop::events::{Event, Kind};
use std::collections::{BTreeMap, BTreeSet};

/// One event of every kind, with every optional field present.
fn every_kind() -> Vec<Kind> {
    let s = || "x".to_string();
    let all = vec![
        Kind::AgentStarting { target: s() },
        Kind::AgentConnected { agent_version: s(), pid: 1, root: s(), via: s() },
        Kind::AgentLost { reason: s() },
        Kind::Reconnecting { attempt: 1, in_ms: 200 },
        Kind::AgentLog { line: s() },
        Kind::Watching { dirs: 1, watcher: s() },
        Kind::SyncStarted { batch: 1, initial: true, files: 1, deletes: 0, bytes: 1 },
        Kind::SyncApplied {
            batch: 1,
            initial: false,
            written: 1,
            deleted: 0,
            bytes: 1,
            latency_ms: 1.0,
            paths: vec![s()],
        },
        Kind::SyncProgress { files_done: 1, files_total: 2, bytes_done: 1, bytes_total: 2 },
        Kind::SyncTurn { waiting: true },
        Kind::SyncError { path: s(), path_not_utf8: true, message: s() },
        Kind::InSync { files: 1, dirs: 1, checked_ms: 1.0, reused: 1, target_reused: 1 },
        Kind::CommandStarted { command: s() },
        Kind::CommandOutput { command: s(), stream: s(), line: s() },
        Kind::CommandExited { command: s(), code: Some(0), ms: 1 },
        Kind::AppStarted { pid: 1 },
        Kind::AppOutput { stream: s(), line: s() },
        Kind::AppExited { code: Some(0) },
        Kind::AppStopped,
        Kind::AppFailed { message: s() },
        Kind::PodLog { line: s() },
        Kind::WorkloadChanged { workload: s(), change: s() },
        Kind::Warning { message: s() },
        Kind::Error { message: s(), hint: Some(s()) },
        Kind::AgentInjecting { bytes: 1 },
        Kind::ActionDone { action: s(), ok: true, message: s() },
        Kind::EventsLost { count: 1 },
        Kind::InterceptOn { ports: vec![s()], header: Some(s()) },
        Kind::InterceptOff { reason: s() },
        Kind::InterceptOpened { port: 1, peer: s(), local: 2 },
        Kind::InterceptClosed { port: 1, peer: s(), bytes_in: 1, bytes_out: 1, ms: 1 },
        Kind::InterceptRefused { port: 1, local: 2, message: s() },
        Kind::Problem {
            file: s(),
            line: 1,
            column: Some(2),
            severity: devloop::problems::Severity::Error,
            message: s(),
            command: s(),
        },
        Kind::Ready { services: 1 },
    ];
    // A new kind fails to compile here until it is in the list above.
    for k in &all {
        match k {
            Kind::AgentStarting { .. }
            | Kind::AgentConnected { .. }
            | Kind::Problem { .. }
            | Kind::Ready { .. }
            | Kind::AgentLost { .. }
            | Kind::Reconnecting { .. }
            | Kind::AgentLog { .. }
            | Kind::Watching { .. }
            | Kind::SyncStarted { .. }
            | Kind::SyncApplied { .. }
            | Kind::SyncProgress { .. }
            | Kind::SyncTurn { .. }
            | Kind::SyncError { .. }
            | Kind::InSync { .. }
            | Kind::CommandStarted { .. }
            | Kind::CommandOutput { .. }
            | Kind::CommandExited { .. }
            | Kind::AppStarted { .. }
            | Kind::AppOutput { .. }
            | Kind::AppExited { .. }
            | Kind::AppStopped
            | Kind::AppFailed { .. }
            | Kind::PodLog { .. }
            | Kind::WorkloadChanged { .. }
            | Kind::Warning { .. }
            | Kind::Error { .. }
            | Kind::AgentInjecting { .. }
            | Kind::ActionDone { .. }
            | Kind::EventsLost { .. }
            | Kind::InterceptOn { .. }
            | Kind::InterceptOff { .. }
            | Kind::InterceptOpened { .. }
            | Kind::InterceptClosed { .. }
            | Kind::InterceptRefused { .. } => {}
        }
    }
    all
}

/// Fields every event has (the first table of the document).
const COMMON: &[&str] = &["ts", "service", "pod", "container", "type"];

/// Fields the document names that come from elsewhere than the event
/// types: a configuration error is printed before any service runs.
const DOCUMENTED_ELSEWHERE: &[(&str, &str)] =
    &[("error", "file"), ("error", "line"), ("error", "column"), ("error", "key")];

/// The backquoted names in a table cell, leaving out what is said in
/// parentheses (values, remarks) and after a colon (`name: value`).
fn names(cell: &str) -> BTreeSet<String> {
    let mut plain = String::new();
    let mut depth = 0;
    for c in cell.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            c if depth == 0 => plain.push(c),
            _ => {}
        }
    }
    plain.split('`').skip(1).step_by(2).map(|n| n.split(':').next().unwrap_or("").trim().to_string()).collect()
}

/// The document's tables: the common fields, and each type with its fields.
fn documented() -> (BTreeSet<String>, BTreeMap<String, BTreeSet<String>>) {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/events.md")).unwrap();
    let mut common = BTreeSet::new();
    let mut types = BTreeMap::new();
    let mut table = 0;
    for line in doc.lines() {
        if line.starts_with("| field |") {
            table = 1;
        } else if line.starts_with("| `type` | fields |") {
            table = 2;
        } else if !line.starts_with('|') {
            continue;
        }
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let Some(first) = cells.get(1).and_then(|c| c.strip_prefix('`')).and_then(|c| c.strip_suffix('`')) else {
            continue;
        };
        match table {
            1 => {
                common.insert(first.to_string());
            }
            2 if first != "type" => {
                types.insert(first.to_string(), names(cells.get(2).copied().unwrap_or("")));
            }
            _ => {}
        }
    }
    (common, types)
}

#[test]
fn every_event_type_and_field_is_documented_and_nothing_else() {
    let (common, documented) = documented();
    let want_common: BTreeSet<String> = COMMON.iter().map(|s| s.to_string()).collect();
    assert_eq!(common, want_common, "the common fields in docs/events.md");
    let mut in_code = BTreeMap::new();
    for kind in every_kind() {
        let ev = Event { ts: 1, service: "web".into(), pod: Some("p".into()), container: Some("c".into()), kind };
        let v = serde_json::to_value(&ev).unwrap();
        let obj = v.as_object().unwrap();
        for c in COMMON {
            assert!(obj.contains_key(*c), "{c} missing from {v}");
        }
        let ty = obj["type"].as_str().unwrap().to_string();
        let fields: BTreeSet<String> = obj.keys().filter(|k| !COMMON.contains(&k.as_str())).cloned().collect();
        in_code.insert(ty, fields);
    }
    let mut problems = Vec::new();
    for (ty, fields) in &in_code {
        match documented.get(ty) {
            None => problems.push(format!("type `{ty}` is not in docs/events.md")),
            Some(doc) => {
                for f in fields.difference(doc) {
                    problems.push(format!("`{ty}`: field `{f}` is not documented"));
                }
                for f in doc.difference(fields) {
                    if !DOCUMENTED_ELSEWHERE.contains(&(ty.as_str(), f.as_str())) {
                        problems.push(format!("`{ty}`: docs/events.md names `{f}`, which the event does not have"));
                    }
                }
            }
        }
    }
    for ty in documented.keys() {
        if !in_code.contains_key(ty) {
            problems.push(format!("docs/events.md documents `{ty}`, which no event has"));
        }
    }
    assert!(problems.is_empty(), "docs/events.md and the event types differ:\n{}", problems.join("\n"));
}

/// Adding fields is the only change allowed: the NDJSON form of an event
/// as it was before pods had their own field still reads the same.
#[test]
fn the_ndjson_form_only_adds_fields() {
    let ev = Event {
        ts: 5,
        service: "web".into(),
        pod: Some("web-1".into()),
        container: None,
        kind: Kind::PodLog { line: "hi".into() },
    };
    let v = serde_json::to_value(&ev).unwrap();
    assert_eq!(v["service"], "web/web-1", "service keeps its NAME/POD form");
    assert_eq!(v["pod"], "web-1");
    assert!(v.get("container").is_none(), "absent fields are left out, not null");
    let local = Event { ts: 5, service: "web".into(), pod: None, container: None, kind: Kind::AppStopped };
    assert_eq!(serde_json::to_string(&local).unwrap(), r#"{"ts":5,"service":"web","type":"app_stopped"}"#);
}
