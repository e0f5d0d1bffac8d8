//! The dashboard, drawn on ratatui's test backend from states made by real
//! events, compared with plain-text snapshots in `tests/snapshots/ui/`.
//! A changed screen fails the test and prints the difference; review it,
//! then `UPDATE_SNAPSHOTS=1 cargo test --test ui` stores the new one.
//! Also: the keys, as the model turns them into actions.

use devloop::events::{Event, Kind};
use devloop::hub::ActionKind;
use devloop::state::State;
use devloop::ui::{draw, Command, Model};
use ratatui::backend::TestBackend;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::Terminal;
use std::path::PathBuf;

/// 2023-11-14 22:13:20 UTC: a fixed "now", so clocks and "ago" are stable.
const T0: u64 = 1_700_000_000_000;

fn ev(service: &str, pod: Option<&str>, at_s: f64, kind: Kind) -> Event {
    Event {
        ts: T0 + (at_s * 1000.0) as u64,
        service: service.into(),
        pod: pod.map(String::from),
        container: None,
        kind,
    }
}

fn model(events: &[Event], now_s: f64) -> Model {
    let mut m = Model::new(State::default(), "devloop watch · devloop.yaml", false, T0 + (now_s * 1000.0) as u64, 0);
    for e in events {
        m.apply(e);
    }
    m
}

fn screen(m: &Model, w: u16, h: u16) -> String {
    let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
    t.draw(|f| draw(f, m)).unwrap();
    let buf = t.backend().buffer().clone();
    let mut out = String::new();
    for y in 0..h {
        let mut line = String::new();
        for x in 0..w {
            line.push_str(buf[(x, y)].symbol());
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn check(name: &str, m: &Model, w: u16, h: u16) {
    let got = screen(m, w, h);
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/snapshots/ui").join(format!("{name}.txt"));
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("no snapshot {} ({e}); UPDATE_SNAPSHOTS=1 stores it:\n{got}", path.display()));
    if got != want {
        let mut diff = String::new();
        for (i, (g, w)) in got.lines().zip(want.lines()).enumerate() {
            if g != w {
                diff.push_str(&format!("line {}:\n  want: {w}\n  got:  {g}\n", i + 1));
            }
        }
        panic!("the {name} screen changed ({}):\n{diff}\nwhole screen now:\n{got}", path.display());
    }
}

fn started(svc: &str, pod: Option<&str>, at: f64, target: &str) -> Vec<Event> {
    vec![ev(svc, pod, at, Kind::AgentStarting { target: target.into() })]
}

fn connected(svc: &str, pod: Option<&str>, at: f64) -> Event {
    ev(
        svc,
        pod,
        at,
        Kind::AgentConnected { agent_version: "0.1.0".into(), pid: 42, root: "/app".into(), via: "stdio".into() },
    )
}

fn live(svc: &str, pod: Option<&str>, at: f64, target: &str) -> Vec<Event> {
    let mut v = started(svc, pod, at, target);
    v.push(connected(svc, pod, at + 0.1));
    v.push(ev(
        svc,
        pod,
        at + 0.2,
        Kind::InSync { files: 120, dirs: 8, checked_ms: 4.0, reused: 100, target_reused: 100 },
    ));
    v.push(ev(svc, pod, at + 0.2, Kind::Watching { dirs: 8, watcher: "inotify".into() }));
    v
}

fn applied(svc: &str, pod: Option<&str>, at: f64, ms: f64, paths: &[&str]) -> Event {
    ev(
        svc,
        pod,
        at,
        Kind::SyncApplied {
            batch: 2,
            initial: false,
            written: paths.len() as u64,
            deleted: 0,
            bytes: 1234,
            latency_ms: ms,
            paths: paths.iter().map(|p| p.to_string()).collect(),
        },
    )
}

#[test]
fn starting() {
    let m = model(&started("web", None, 0.0, "local:.devloop/targets/web"), 3.0);
    check("starting", &m, 80, 24);
    let empty = model(&[], 0.0);
    check("nothing_yet", &empty, 80, 24);
}

#[test]
fn a_service_waiting_for_pods_says_why_and_since_when() {
    let e = vec![ev("api", None, 0.0, Kind::Warning { message: "no ready pods for deployment/api (waiting)".into() })];
    let m = model(&e, 42.0);
    let s = screen(&m, 80, 24);
    assert!(s.contains("waiting 42s"), "{s}");
    assert!(s.contains("waiting 42s: no ready pods for"), "{s}");
    check("waiting_for_pods", &m, 80, 24);
}

/// A replica whose first sync waits for another's says so, and since
/// when, in its row and in the detail; once its turn comes, it syncs.
#[test]
fn a_pod_waiting_for_its_turn_to_sync_says_so() {
    let mut e = live("web", Some("web-a"), 0.0, "pod dev/web-a");
    e.extend(started("web", Some("web-b"), 0.0, "pod dev/web-b"));
    e.push(connected("web", Some("web-b"), 1.0));
    e.push(ev("web", Some("web-b"), 1.0, Kind::SyncTurn { waiting: true }));
    let mut m = model(&e, 8.0);
    m.selected = m.rows().iter().position(|r| r.pod.as_deref() == Some("web-b")).expect("a row for web-b");
    let s = screen(&m, 100, 24);
    let row = s.lines().find(|l| l.contains("web-b")).unwrap_or_else(|| panic!("no row for web-b:\n{s}"));
    assert!(row.contains("waiting 7s"), "{s}");
    assert!(s.contains("another pod's first sync runs"), "{s}");
    e.push(ev("web", Some("web-b"), 9.0, Kind::SyncTurn { waiting: false }));
    let s = screen(&model(&e, 10.0), 100, 24);
    let row = s.lines().find(|l| l.contains("web-b")).unwrap();
    assert!(row.contains("syncing 1s"), "{s}");
}

#[test]
fn initial_sync_shows_progress_rate_and_eta() {
    let mut e = started("web", None, 0.0, "local:.devloop/targets/web");
    e.push(connected("web", None, 0.5));
    e.push(ev(
        "web",
        None,
        1.0,
        Kind::SyncStarted { batch: 1, initial: true, files: 20_000, deletes: 0, bytes: 300 << 20 },
    ));
    e.push(ev(
        "web",
        None,
        5.0,
        Kind::SyncProgress { files_done: 8_000, files_total: 20_000, bytes_done: 100 << 20, bytes_total: 300 << 20 },
    ));
    let m = model(&e, 5.0);
    let s = screen(&m, 80, 24);
    // 100 MiB in 4 s: 25 MiB/s, and 200 MiB to go: 8 s.
    assert!(s.contains("8000/20000 files"), "{s}");
    assert!(s.contains("100.0 MiB of 300.0 MiB"), "{s}");
    assert!(s.contains("25.0 MiB/s, ETA 8s"), "{s}");
    assert!(s.contains("syncing 33%"), "{s}");
    check("initial_sync", &m, 80, 24);
}

#[test]
fn live_with_latencies_command_output_and_logs() {
    let mut e = live("web", None, 0.0, "local:.devloop/targets/web");
    e.push(ev("web", None, 0.3, Kind::AppStarted { pid: 100 }));
    e.push(ev("web", None, 0.4, Kind::AppOutput { stream: "stdout".into(), line: "listening on :3000".into() }));
    for (i, ms) in [1.6, 1.4, 2.1, 1.7, 5.2, 1.5].iter().enumerate() {
        e.push(applied("web", None, 10.0 + i as f64, *ms, &["src/app.js"]));
    }
    e.push(ev("web", None, 15.1, Kind::CommandStarted { command: "npm test".into() }));
    e.push(ev(
        "web",
        None,
        15.2,
        Kind::CommandOutput { command: "npm test".into(), stream: "stdout".into(), line: "12 passing".into() },
    ));
    e.push(ev("web", None, 15.3, Kind::CommandExited { command: "npm test".into(), code: Some(0), ms: 200 }));
    e.push(ev("web", None, 15.4, Kind::AppStarted { pid: 101 }));
    e.push(ev("web", None, 15.5, Kind::AppOutput { stream: "stdout".into(), line: "listening on :3000".into() }));
    let m = model(&e, 20.0);
    let s = screen(&m, 80, 24);
    assert!(s.contains("live"), "{s}");
    assert!(s.contains("1 file 1.2KiB 1.5ms 5s"), "{s}");
    // devloop's own lines are marked; the app's are not.
    assert!(s.contains("» app started (pid 101)"), "{s}");
    assert!(s.contains("   listening on :3000"), "{s}");
    assert!(s.contains("$ 12 passing"), "{s}");
    check("live", &m, 80, 24);
}

#[test]
fn reconnecting_says_why_and_since_when() {
    let mut e = live("web", None, 0.0, "local:.devloop/targets/web");
    e.push(ev("web", None, 5.0, Kind::AgentLost { reason: "the agent exited (code 137)".into() }));
    e.push(ev(
        "web",
        None,
        5.0,
        Kind::Error { message: "the agent exited (code 137)".into(), hint: Some("devloop reconnects".into()) },
    ));
    e.push(ev("web", None, 5.1, Kind::Reconnecting { attempt: 3, in_ms: 800 }));
    let m = model(&e, 17.0);
    let s = screen(&m, 80, 24);
    assert!(s.contains("retry #3 11s"), "{s}");
    assert!(s.contains("waiting 11s: reconnecting (attempt 3,"), "{s}");
    assert!(s.contains("error: the agent exited (code 137)"), "{s}");
    check("reconnecting", &m, 80, 24);
}

#[test]
fn an_error_shows_its_hint() {
    let mut e = started("api", Some("api-7d9f-x2"), 0.0, "pod dev/api-7d9f-x2");
    e.push(ev(
        "api",
        Some("api-7d9f-x2"),
        1.0,
        Kind::Error {
            message: "cannot copy the agent into the pod: exec is forbidden".into(),
            hint: Some("run `devloop doctor api`: it prints the Role devloop needs".into()),
        },
    ));
    let m = model(&e, 4.0);
    let s = screen(&m, 80, 24);
    assert!(s.contains("hint: run `devloop doctor api`"), "{s}");
    check("error", &m, 80, 24);
}

#[test]
fn intercept_on_counts_connections() {
    let mut e = live("web", None, 0.0, "local:.devloop/targets/web");
    e.push(ev("web", None, 1.0, Kind::InterceptOn { ports: vec!["18080 → localhost:3000".into()], header: None }));
    for i in 0..30 {
        e.push(ev(
            "web",
            None,
            2.0 + i as f64 * 0.25,
            Kind::InterceptOpened { port: 18080, peer: format!("127.0.0.1:{}", 40000 + i), local: 3000 },
        ));
    }
    for i in 0..28 {
        e.push(ev(
            "web",
            None,
            2.1 + i as f64 * 0.25,
            Kind::InterceptClosed {
                port: 18080,
                peer: format!("127.0.0.1:{}", 40000 + i),
                bytes_in: 100,
                bytes_out: 900,
                ms: 3,
            },
        ));
    }
    let m = model(&e, 10.0);
    let s = screen(&m, 80, 24);
    // 2 open; 30 opened from 2.0 s to 9.25 s, all within the last 10 s.
    assert!(s.contains("on 2c 3/s"), "{s}");
    check("intercept_on", &m, 80, 24);
}

#[test]
fn many_pods_each_get_a_row_under_their_service() {
    let mut e = Vec::new();
    for (i, p) in ["web-5c8d-a1", "web-5c8d-b2", "web-5c8d-c3", "web-5c8d-d4"].iter().enumerate() {
        e.extend(live("web", Some(p), i as f64, &format!("pod dev/{p}")));
        e.push(applied("web", Some(p), 10.0, 2.0 + i as f64, &["index.html"]));
    }
    e.push(ev("web", Some("web-5c8d-d4"), 11.0, Kind::Reconnecting { attempt: 1, in_ms: 200 }));
    e.extend(live("worker", None, 0.0, "exec:docker exec w1"));
    let mut m = model(&e, 12.0);
    let s = screen(&m, 80, 24);
    assert!(s.contains("3/4 live"), "{s}");
    check("many_pods", &m, 80, 24);
    // Selecting a pod's row shows that pod's detail, and acts on it alone.
    m.key(key(KeyCode::Down));
    m.key(key(KeyCode::Down));
    let s = screen(&m, 80, 24);
    assert!(s.contains(" web/web-5c8d-b2 "), "{s}");
    assert_eq!(
        m.key(key(KeyCode::Char('s'))),
        Some(Command::Act { service: "web".into(), pod: Some("web-5c8d-b2".into()), kind: ActionKind::Resync })
    );
    check("many_pods_120x30", &m, 120, 30);
}

#[test]
fn small_and_large_terminals_draw_without_panicking() {
    let mut e = live("a-service-with-a-long-name", None, 0.0, "local:.devloop/targets/a");
    e.push(applied("a-service-with-a-long-name", None, 1.0, 1.0, &["x"]));
    let m = model(&e, 2.0);
    for (w, h) in [(80, 24), (20, 5), (1, 1), (300, 100), (80, 8)] {
        screen(&m, w, h);
    }
    check("long_name_80x24", &m, 80, 24);
}

fn key(code: KeyCode) -> KeyEvent {
    KeyEvent::new(code, KeyModifiers::NONE)
}

#[test]
fn keys_ask_for_actions_and_move_the_view() {
    let mut e = live("web", None, 0.0, "local:x");
    e.push(ev("web", None, 1.0, Kind::InterceptOn { ports: vec!["1 → localhost:2".into()], header: None }));
    for i in 0..30 {
        e.push(ev("web", None, 2.0, Kind::AppOutput { stream: "stdout".into(), line: format!("line {i}") }));
    }
    let mut m = model(&e, 3.0);
    let act = |kind| Some(Command::Act { service: "web".into(), pod: None, kind });
    assert_eq!(m.key(key(KeyCode::Char('s'))), act(ActionKind::Resync));
    assert_eq!(m.key(key(KeyCode::Char('r'))), act(ActionKind::Restart));
    assert_eq!(m.key(key(KeyCode::Char('c'))), act(ActionKind::Run { index: 0 }));
    assert_eq!(m.key(key(KeyCode::Char('3'))), act(ActionKind::Run { index: 2 }));
    // The intercept is on: `i` lets it go.
    assert_eq!(m.key(key(KeyCode::Char('i'))), act(ActionKind::Intercept { on: false }));
    assert_eq!(m.key(key(KeyCode::Char('q'))), Some(Command::Quit));
    assert_eq!(m.key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL)), Some(Command::Quit));
    // The filter: typed keys go to it, not to actions.
    m.key(key(KeyCode::Char('/')));
    for c in "line 7".chars() {
        assert_eq!(m.key(key(KeyCode::Char(c))), None);
    }
    m.key(key(KeyCode::Enter));
    let s = screen(&m, 80, 24);
    assert!(s.contains("Logs matching \"line 7\""), "{s}");
    assert!(s.contains("line 7") && !s.contains("line 8") && !s.contains("line 29"), "{s}");
    m.key(key(KeyCode::Esc));
    // Full-screen logs, scrolled up, then following again.
    m.key(key(KeyCode::Char('l')));
    m.key(key(KeyCode::PageUp));
    let s = screen(&m, 80, 24);
    assert!(s.contains("scrolled up 10") && !s.contains("line 29") && s.contains("line 19"), "{s}");
    m.key(key(KeyCode::End));
    assert!(screen(&m, 80, 24).contains("line 29"));
    // Help: opens on ?, any key closes it.
    m.key(key(KeyCode::Char('?')));
    assert!(screen(&m, 80, 24).contains("any key closes this help"));
    assert_eq!(m.key(key(KeyCode::Char('x'))), None);
    assert!(!screen(&m, 80, 24).contains("any key closes this help"));
    // An answer shows in the footer.
    m.apply(&ev("web", None, 3.0, Kind::ActionDone { action: "resync".into(), ok: true, message: "done".into() }));
    assert!(screen(&m, 80, 24).contains(" resync: done"));
}
