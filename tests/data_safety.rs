//! The sync never loses what it could not read, carries every name and link
//! a Linux tree can hold, and never deletes on the target what the source
//! may still have (invariant 7). Real binaries, real files.
//!
//! "Unreadable" needs permissions that bind: as root, devloop runs without
//! the capabilities that override them (`setpriv`), as a developer's
//! process would.

mod util;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use util::*;

const T: Duration = Duration::from_secs(20);

/// A command that cannot read what its permissions deny, even as root.
fn bound_by_permissions(mut c: Command) -> Command {
    if unsafe { libc::geteuid() } != 0 {
        return c;
    }
    let mut w = Command::new("setpriv");
    w.args(["--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search"]);
    w.arg(c.get_program()).args(c.get_args());
    if let Some(d) = c.get_current_dir() {
        w.current_dir(d);
    }
    for (k, v) in c.get_envs() {
        match v {
            Some(v) => w.env(k, v),
            None => w.env_remove(k),
        };
    }
    // `c` is only a description here.
    let _ = c.stdin(std::process::Stdio::null());
    w
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn events(stdout: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(stdout).lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// A file and a directory the CLI cannot read are left as they are on the
/// target (never deleted), reported as errors, and the one-shot sync says
/// the target is not in sync.
#[test]
fn what_cannot_be_read_is_kept_on_the_target_and_reported() {
    let p = Project::new();
    p.write("ok.txt", b"synced");
    p.write("secret.txt", b"new content nobody can read");
    p.write("locked/inner.txt", b"in a directory nobody can list");
    let out = p.out();
    std::fs::create_dir_all(out.join("locked")).unwrap();
    std::fs::write(out.join("secret.txt"), "the target's copy").unwrap();
    std::fs::write(out.join("locked/inner.txt"), "the target's copy below").unwrap();
    std::fs::write(out.join("locked/only-on-target.txt"), "unknown in the source: kept").unwrap();
    std::fs::write(out.join("extra.txt"), "really absent from the source: removed").unwrap();
    chmod(&p.src().join("secret.txt"), 0o000);
    chmod(&p.src().join("locked"), 0o000);

    let o = bound_by_permissions(p.cmd(&["--json", "sync", "--once"])).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    chmod(&p.src().join("locked"), 0o755);
    chmod(&p.src().join("secret.txt"), 0o644);
    assert_eq!(std::fs::read_to_string(out.join("ok.txt")).unwrap(), "synced", "{text}");
    assert!(!out.join("extra.txt").exists(), "a path really absent from the source is still removed\n{text}");
    assert_eq!(std::fs::read_to_string(out.join("secret.txt")).unwrap(), "the target's copy", "{text}");
    assert_eq!(std::fs::read_to_string(out.join("locked/inner.txt")).unwrap(), "the target's copy below", "{text}");
    assert!(out.join("locked/only-on-target.txt").exists(), "below an unlistable directory: {text}");
    let evs = events(&o.stdout);
    for name in ["secret.txt", "locked"] {
        assert!(
            evs.iter().any(|e| e["type"] == "sync_error" && e["path"] == name),
            "no sync_error for {name}:\n{text}"
        );
    }
    assert_eq!(o.status.code(), Some(1), "the target is not known to be in sync\n{text}");
}

/// While watching: a directory that becomes unreadable keeps its files on
/// the target, through its own event and through a full rescan (an ignore
/// file changed); once readable again, it syncs without any further event.
#[test]
fn a_directory_that_becomes_unreadable_while_watching_is_kept_and_retried() {
    let p = Project::new();
    p.write("locked/a.txt", b"v1");
    p.write("locked/deep/b.txt", b"v1");
    p.write("other.txt", b"x");
    let mut w = Watching::spawn(bound_by_permissions(p.cmd(&["--json", "watch"])), 1);
    wait_converged(&p, Some(&mut w), T);
    // Changed while unreadable (the test, as root, can still write there):
    // only visible when it can be read again.
    chmod(&p.src().join("locked"), 0o000);
    std::fs::write(p.src().join("locked/a.txt"), b"v2").unwrap();
    w.wait_for("a sync_error for locked", T, |e| e["type"] == "sync_error" && e["path"] == "locked");
    // A full rescan (an ignore file changed) must not delete it either.
    p.write(".devloopignore", b"*.never\n");
    std::thread::sleep(Duration::from_millis(500));
    let out = p.out();
    let kept = std::fs::read_to_string(out.join("locked/a.txt"));
    let kept_deep = std::fs::read_to_string(out.join("locked/deep/b.txt"));
    chmod(&p.src().join("locked"), 0o700);
    assert_eq!(kept.ok().as_deref(), Some("v1"), "deleted while unreadable\n{}", w.dump());
    assert_eq!(kept_deep.ok().as_deref(), Some("v1"), "deleted while unreadable\n{}", w.dump());
    // chmod back sends an event too; the retry is what must not depend on
    // it, so wait for the content.
    let t0 = Instant::now();
    while std::fs::read(out.join("locked/a.txt")).ok().as_deref() != Some(b"v2".as_slice()) {
        assert!(t0.elapsed() < T, "never synced once readable\n{}", w.dump());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(w.interrupt(), 0);
}

/// A file that becomes unreadable while watching keeps its old content on
/// the target, is reported once (not at every retry), and syncs once it
/// can be read.
#[test]
fn an_unreadable_file_is_kept_reported_once_and_synced_once_readable() {
    let p = Project::new();
    p.write("f.txt", b"v1");
    let mut w = Watching::spawn(bound_by_permissions(p.cmd(&["--json", "watch"])), 1);
    wait_converged(&p, Some(&mut w), T);
    let f = p.src().join("f.txt");
    chmod(&f, 0o000);
    std::fs::write(&f, b"v2").unwrap();
    w.wait_for("a sync_error for f.txt", T, |e| e["type"] == "sync_error" && e["path"] == "f.txt");
    // Three retries' time: still the old content, and no more reports.
    std::thread::sleep(Duration::from_millis(3200));
    assert_eq!(std::fs::read_to_string(p.out().join("f.txt")).unwrap(), "v1", "{}", w.dump());
    assert_eq!(w.count("sync_error"), 1, "reported again at each retry\n{}", w.dump());
    chmod(&f, 0o644);
    let t0 = Instant::now();
    while std::fs::read(p.out().join("f.txt")).ok().as_deref() != Some(b"v2".as_slice()) {
        assert!(t0.elapsed() < T, "never synced once readable\n{}", w.dump());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A scan that fails (a hashing thread panics) is a failed sync, never an
/// empty source: nothing on the target is deleted.
#[test]
fn a_scan_that_fails_deletes_nothing() {
    let p = Project::new();
    for i in 0..20 {
        // Over 8 MiB in all: the hashing runs on helper threads.
        p.write(&format!("f{i}.bin"), &vec![i as u8; 512 << 10]);
    }
    p.write("small.txt", b"x");
    let (code, output) = p.sync_once();
    assert_eq!(code, 0, "{output}");
    let before = snapshot(&p.out(), &|_| false);
    let o = p.cmd(&["--json", "sync", "--once"]).env("DEVLOOP_FAULTS", "cli:hash-panic").output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(snapshot(&p.out(), &|_| false), before, "the target changed after a failed scan\n{text}");
    assert!(text.contains("panicked: fault injected: hash-panic"), "the failure is reported\n{text}");
    assert_eq!(o.status.code(), Some(1), "{text}");
    // The same in a tree small enough to be hashed on one thread.
    let q = Project::new();
    q.write("a.txt", b"a");
    assert_eq!(q.sync_once().0, 0);
    let o = q.cmd(&["--json", "sync", "--once"]).env("DEVLOOP_FAULTS", "cli:hash-panic").output().unwrap();
    assert!(q.out().join("a.txt").exists(), "{}", String::from_utf8_lossy(&o.stdout));
    assert_eq!(o.status.code(), Some(1));
    // The agent's index failing is not an empty target either: the sync
    // stops with the agent's reason, and sends nothing.
    std::fs::write(q.src().join("b.txt"), "new").unwrap();
    let o = q.cmd(&["--json", "sync", "--once"]).env("DEVLOOP_FAULTS", "agent:hash-panic").output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(text.contains("index failed"), "{text}");
    assert!(!q.out().join("b.txt").exists(), "{text}");
    assert_eq!(o.status.code(), Some(3), "{text}");
}

/// Helper threads that cannot be started cost speed, not correctness: in
/// the CLI (walk, hashing) and in the agent (its index of a target that
/// holds the tree, on the second run).
#[test]
fn threads_that_cannot_start_cost_only_speed() {
    let p = Project::new();
    for i in 0..20 {
        p.write(&format!("d{}/f{i}.bin", i % 4), &vec![i as u8; 512 << 10]);
    }
    for round in 0..2 {
        p.replace("d1/f1.bin", format!("round {round}").as_bytes());
        let o = p.cmd(&["--json", "sync", "--once"]).env("DEVLOOP_FAULTS", "spawn-fail").output().unwrap();
        assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stdout));
        wait_converged(&p, None, T);
    }
}

/// A panic in a service's session is an error event that names it and
/// carries the panic's message, not a silent "unreachable".
#[test]
fn a_panicked_session_is_reported_with_its_message() {
    let p = Project::new();
    p.write("a.txt", b"a");
    let o = p.cmd(&["--json", "sync", "--once"]).env("DEVLOOP_FAULTS", "cli:session-panic").output().unwrap();
    let evs = events(&o.stdout);
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let e = evs.iter().find(|e| e["type"] == "error").unwrap_or_else(|| panic!("no error event:\n{text}"));
    let m = e["message"].as_str().unwrap();
    assert!(m.contains("the session of service svc panicked") && m.contains("fault injected: session-panic"), "{m}");
    assert!(e["hint"].as_str().is_some_and(|h| h.contains("bug")), "{e}");
    assert_eq!(o.status.code(), Some(4), "{text}");
}

/// Names are bytes: a name that is not UTF-8 syncs, live and initially,
/// and events that show it say it is shown lossily.
#[test]
fn names_that_are_not_utf8_sync_like_any_other() {
    let p = Project::new();
    let odd = OsStr::from_bytes(b"caf\xe9.txt");
    let odd_dir = OsStr::from_bytes(b"d\xff\xfe");
    std::fs::write(p.src().join(odd), b"latin-1 name").unwrap();
    std::fs::create_dir_all(p.src().join(odd_dir)).unwrap();
    std::fs::write(p.src().join(odd_dir).join("x"), b"below a binary name").unwrap();
    let (code, output) = p.sync_once();
    assert_eq!(code, 0, "{output}");
    assert_eq!(std::fs::read(p.out().join(odd)).unwrap(), b"latin-1 name", "{output}");
    assert_eq!(std::fs::read(p.out().join(odd_dir).join("x")).unwrap(), b"below a binary name");
    let mut w = p.watch();
    std::fs::write(p.src().join(odd), b"edited").unwrap();
    std::fs::write(p.src().join(odd_dir).join(OsStr::from_bytes(b"\x80new")), b"new").unwrap();
    std::fs::remove_file(p.src().join(odd_dir).join("x")).unwrap();
    let t0 = Instant::now();
    loop {
        let a = std::fs::read(p.out().join(odd)).ok();
        let b = std::fs::read(p.out().join(odd_dir).join(OsStr::from_bytes(b"\x80new"))).ok();
        if a.as_deref() == Some(b"edited".as_slice()) && b.is_some() && !p.out().join(odd_dir).join("x").exists() {
            break;
        }
        assert!(t0.elapsed() < T, "live changes to odd names never landed\n{}", w.dump());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(w.count("sync_error"), 0, "{}", w.dump());
}

/// An absolute symlink into the synced tree arrives rewritten, resolving
/// to the same file under the target root; one leaving the tree is still
/// skipped with a warning.
#[test]
fn absolute_symlinks_into_the_tree_resolve_to_the_same_file_in_the_target() {
    let p = Project::new();
    p.write("conf/app.yaml", b"port: 1");
    let src = std::fs::canonicalize(p.src()).unwrap();
    std::fs::create_dir_all(src.join("bin")).unwrap();
    std::os::unix::fs::symlink(src.join("conf/app.yaml"), src.join("bin/config")).unwrap();
    std::os::unix::fs::symlink(src.join("conf"), src.join("conf-dir")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", src.join("outside")).unwrap();
    let (code, output) = p.sync_once();
    assert_eq!(code, 0, "{output}");
    let out = p.out();
    assert_eq!(std::fs::read_link(out.join("bin/config")).unwrap(), Path::new("../conf/app.yaml"), "{output}");
    assert_eq!(std::fs::read_to_string(out.join("bin/config")).unwrap(), "port: 1");
    assert_eq!(std::fs::read_to_string(out.join("conf-dir/app.yaml")).unwrap(), "port: 1");
    assert!(std::fs::symlink_metadata(out.join("outside")).is_err(), "a link leaving the tree was synced");
    assert!(output.contains("points outside the synced tree"), "{output}");
    // Live: a new absolute link lands rewritten too.
    let w = p.watch();
    std::os::unix::fs::symlink(src.join("conf"), src.join("bin/conf")).unwrap();
    let t0 = Instant::now();
    while std::fs::read_to_string(out.join("bin/conf/app.yaml")).ok().as_deref() != Some("port: 1") {
        assert!(t0.elapsed() < T, "live absolute link never landed\n{}", w.dump());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(std::fs::read_link(out.join("bin/conf")).unwrap(), Path::new("../conf"));
}

/// A write in place through one name of a file with several (hard links)
/// changes them all in the source; the target must end up with the new
/// content under every name, though the watcher reports only one.
#[test]
fn a_write_through_one_hard_link_reaches_every_name() {
    use std::io::Write;
    let p = Project::new();
    p.write("a.txt", b"v1");
    std::fs::create_dir_all(p.src().join("sub")).unwrap();
    std::fs::hard_link(p.src().join("a.txt"), p.src().join("sub/b.txt")).unwrap();
    std::fs::hard_link(p.src().join("a.txt"), p.src().join("c.txt")).unwrap();
    let mut w = p.watch();
    wait_converged(&p, Some(&mut w), T);
    let mut f = std::fs::OpenOptions::new().write(true).truncate(true).open(p.src().join("a.txt")).unwrap();
    f.write_all(b"v2 through a").unwrap();
    drop(f);
    wait_converged(&p, Some(&mut w), T);
    for n in ["a.txt", "sub/b.txt", "c.txt"] {
        assert_eq!(std::fs::read_to_string(p.out().join(n)).unwrap(), "v2 through a", "{n}");
    }
    // And through another name, after a rescan rebuilt what it knows.
    let mut f = std::fs::OpenOptions::new().write(true).truncate(true).open(p.src().join("sub/b.txt")).unwrap();
    f.write_all(b"v3 through b").unwrap();
    drop(f);
    wait_converged(&p, Some(&mut w), T);
    assert_eq!(std::fs::read_to_string(p.out().join("c.txt")).unwrap(), "v3 through b");
}

/// A directory moved out of the tree is removed from the target with
/// everything below it, also when a sibling's name sorts between the
/// directory and its children (`pkg.json` sorts between `pkg` and
/// `pkg/x`).
#[test]
fn a_directory_moved_away_is_removed_whole_beside_names_that_sort_between() {
    let p = Project::new();
    p.write("pkg/x.rs", b"x");
    p.write("pkg/deep/y.rs", b"y");
    p.write("pkg.json", b"{}");
    p.write("pkg-lock", b"l");
    let mut w = p.watch();
    wait_converged(&p, Some(&mut w), T);
    std::fs::rename(p.src().join("pkg"), p.dir.path().join("moved-out")).unwrap();
    wait_converged(&p, Some(&mut w), T);
    assert!(!p.out().join("pkg").exists());
}

/// Waits until `pid` no longer exists (or is a zombie nobody reaped yet).
fn gone(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.is_empty() || stat.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z'))
}

fn read_pid(p: &Path) -> i32 {
    let t0 = Instant::now();
    loop {
        if let Some(pid) = std::fs::read_to_string(p).ok().and_then(|s| s.trim().parse().ok()) {
            return pid;
        }
        assert!(t0.elapsed() < T, "{} never written", p.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The agent signals only the processes it started: a restart stops the
/// app's whole group, also what the app left running after its own exit,
/// and nothing else, not even a process in the agent's own group (the
/// `sibling`, started by the same shell that became the agent).
#[test]
fn the_agent_signals_its_app_group_and_nothing_beyond() {
    let agent = std::path::PathBuf::from(env!("CARGO_BIN_EXE_devloop")).with_file_name("devloop-agent");
    let yaml = format!(
        r#"services:
  svc:
    target:
      exec:
        command: [sh, -c, 'sleep 300 & echo $! > sibling.pid; exec "$0" serve --stdio --root out', {}]
    sync:
      - from: src
    app:
      run: "sleep 300 & echo $! > ../straggler-$(cat n.txt).pid; exit 0"
      grace_ms: 300
"#,
        agent.display()
    );
    let p = Project::with_yaml(&yaml);
    p.write("n.txt", b"1");
    let mut w = p.watch();
    let sibling = read_pid(&p.dir.path().join("sibling.pid"));
    let first = read_pid(&p.dir.path().join("straggler-1.pid"));
    w.wait_first("app_exited", T);
    // A sync restarts the app: what the exited app left in its group is
    // stopped; the agent's own group is not touched.
    p.replace("n.txt", b"2");
    let second = read_pid(&p.dir.path().join("straggler-2.pid"));
    let t0 = Instant::now();
    while !gone(first) {
        assert!(t0.elapsed() < T, "the exited app's group was never stopped\n{}", w.dump());
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!gone(sibling), "a process in the agent's own group was signalled");
    assert_eq!(w.interrupt(), 0);
    let t0 = Instant::now();
    while !gone(second) {
        assert!(t0.elapsed() < T, "the app's group outlived the agent");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!gone(sibling), "a process in the agent's own group was signalled on shutdown");
    unsafe { libc::kill(sibling, libc::SIGKILL) };
}

/// A watcher that cannot be what was asked for is a clear error.
#[test]
fn an_unknown_watcher_is_refused_with_the_choices() {
    let p = Project::new();
    let o = p.cmd(&["--json", "watch"]).env("DEVLOOP_WATCHER", "kqueue").output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(text.contains("DEVLOOP_WATCHER=kqueue: use `notify`"), "{text}");
    assert_eq!(o.status.code(), Some(3), "{text}");
}
