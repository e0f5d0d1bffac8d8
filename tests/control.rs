//! The control socket, with the real binaries: `devloop status` and
//! `devloop trigger` reach a running `devloop watch`; a second watch on
//! the same config is refused and told where the first is; a socket left
//! by a killed devloop is taken over; and no other user can connect.

mod util;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;
use util::*;

const T: Duration = Duration::from_secs(30);

fn run(p: &Project, args: &[&str]) -> (i32, String) {
    let Output { status, stdout, stderr } = output_within(p.cmd(args), T);
    (status.code().unwrap_or(-1), String::from_utf8_lossy(&stdout).into_owned() + &String::from_utf8_lossy(&stderr))
}

fn project() -> Project {
    let p = Project::with_yaml(
        "services:\n  svc:\n    target: {local: {root: out}}\n    sync:\n      - from: src\n    on_sync:\n      - when: \"*.txt\"\n        run: \"echo ran-by-trigger\"\n",
    );
    p.write("a.txt", b"a");
    p
}

/// The socket `devloop watch` serves for this project (the path the CLI
/// computes), checked to be the one it answers on.
fn socket(p: &Project) -> PathBuf {
    let path = devloop::control::socket_path(&p.dir.path().join("devloop.yaml"));
    assert!(path.exists(), "no socket at {}", path.display());
    let (code, out) = run(p, &["status"]);
    assert_eq!(code, 0, "{out}");
    path
}

#[test]
fn status_and_trigger_reach_the_running_watch() {
    let p = project();
    let mut w = p.watch();
    w.wait_first("command_exited", T);
    let (code, out) = run(&p, &["status"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("(pid {})", w.child.id())) && out.contains("svc") && out.contains(": live,"),
        "{out}"
    );
    let (code, out) = run(&p, &["--json", "status"]);
    assert_eq!(code, 0, "{out}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["state"]["services"]["svc"]["sessions"][""]["agent"]["state"], "live", "{v}");

    // A resync, answered when done, and seen in the events.
    let (code, out) = run(&p, &["trigger", "svc", "resync"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("compared everything by content"), "{out}");
    w.wait_for("the resync's action_done", T, |v| v["type"] == "action_done" && v["action"] == "resync");
    // The on_sync command by part of its text: it runs now.
    let before = w.count("command_exited");
    let (code, out) = run(&p, &["trigger", "svc", "run", "ran-by"]);
    assert_eq!(code, 0, "{out}");
    w.wait_for("the command's output", T, |v| v["type"] == "command_output" && v["line"] == "ran-by-trigger");
    assert!(w.count("command_exited") >= before);
    // Bad requests: said so, with what to do, and the watch lives on.
    let (code, out) = run(&p, &["trigger", "svc", "run", "9"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("has 1 on_sync command") && out.contains("hint:"), "{out}");
    let (code, out) = run(&p, &["trigger", "nope", "resync"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("no service `nope` is running"), "{out}");
    let (code, out) = run(&p, &["trigger", "svc", "intercept", "on"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("no intercept"), "{out}");
    let (code, out) = run(&p, &["trigger", "svc", "fly"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("no action `fly`"), "{out}");
    assert_eq!(w.interrupt(), 0);
    // Gone with it: nothing answers.
    let (code, out) = run(&p, &["status"]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("no devloop is running") && out.contains("devloop watch"), "{out}");
}

#[test]
fn a_second_watch_is_refused_and_told_where_the_first_is() {
    let p = project();
    let w = p.watch();
    let (code, out) = run(&p, &["watch", "--no-tui"]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains(&format!("another devloop (pid {}) is already running", w.child.id()))
            && out.contains("devloop status"),
        "{out}"
    );
    // The first is untouched.
    let (code, out) = run(&p, &["status"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(w.interrupt(), 0);
}

/// A watch that is stopped (SIGSTOP: a debugger, a suspended job) holds
/// its socket and answers nothing: a second watch says so within seconds,
/// instead of waiting on it or taking its socket.
#[test]
fn a_stopped_watch_is_named_not_waited_on() {
    let p = project();
    let w = p.watch();
    let pid = w.child.id();
    unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
    // The precondition: it is stopped.
    let deadline = std::time::Instant::now() + T;
    while !std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap()
        .rsplit(')')
        .next()
        .unwrap()
        .trim_start()
        .starts_with('T')
    {
        assert!(std::time::Instant::now() < deadline, "devloop did not stop");
        std::thread::sleep(Duration::from_millis(10));
    }
    let t0 = std::time::Instant::now();
    let (code, out) = run(&p, &["watch", "--no-tui"]);
    let took = t0.elapsed();
    unsafe { libc::kill(pid as i32, libc::SIGCONT) };
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("does not answer (stopped?)"), "{out}");
    assert!(took < Duration::from_secs(10), "refused after {took:?}");
    // Woken, it serves again.
    let (code, out) = run(&p, &["status"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(w.interrupt(), 0);
}

#[test]
fn a_socket_left_by_a_killed_watch_is_taken_over() {
    let p = project();
    let mut w = p.watch();
    let sock = socket(&p);
    w.child.kill().unwrap();
    w.child.wait().unwrap();
    // The precondition: the killed devloop left its socket behind.
    assert!(sock.exists(), "SIGKILL should leave {} behind", sock.display());
    let (code, out) = run(&p, &["status"]);
    assert_eq!(code, 3, "a stale socket answers nothing: {out}");
    let w2 = p.watch();
    let (code, out) = run(&p, &["status"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("(pid {})", w2.child.id())), "{out}");
    assert_eq!(w2.interrupt(), 0);
    assert!(!sock.exists(), "a clean exit removes the socket");
}

#[test]
fn only_this_user_can_reach_the_socket() {
    let p = project();
    // A runtime directory that another user may enter: devloop's own
    // directory inside it is what keeps them out.
    let runtime = tempfile::tempdir().unwrap();
    std::fs::set_permissions(runtime.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut cmd = p.cmd(&["--json", "watch"]);
    cmd.env("XDG_RUNTIME_DIR", runtime.path());
    let w = Watching::spawn(cmd, 1);
    let dir = runtime.path().join("devloop");
    let socks: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(socks.len(), 1, "one socket in {}: {socks:?}", dir.display());
    let md = std::fs::metadata(&socks[0]).unwrap();
    let dmd = std::fs::metadata(&dir).unwrap();
    let uid = unsafe { libc::getuid() };
    assert_eq!((md.uid(), md.permissions().mode() & 0o777), (uid, 0o600), "the socket: owner and mode");
    assert_eq!((dmd.uid(), dmd.permissions().mode() & 0o777), (uid, 0o700), "its directory: owner and mode");
    // A copy of the binary the other user may run (the build directory
    // may be inside a home that is closed to others, as in CI).
    let bin = runtime.path().join("devloop-copy");
    std::fs::copy(env!("CARGO_BIN_EXE_devloop"), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let as_user = |uid: u32| {
        let mut c = std::process::Command::new(&bin);
        c.current_dir(p.dir.path()).arg("status");
        c.env("XDG_RUNTIME_DIR", runtime.path());
        unsafe {
            use std::os::unix::process::CommandExt;
            c.pre_exec(move || {
                if libc::setgid(uid) != 0 || libc::setuid(uid) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = output_within(c, T);
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
    };
    if uid != 0 {
        println!("SKIP: connecting as another user needs root to switch users (owner and mode checked above)");
    } else {
        // The same path, as this user: answered (the precondition); as
        // nobody: refused by the kernel.
        std::fs::set_permissions(p.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let (code, text) = as_user(0);
        assert_eq!(code, Some(0), "{text}");
        let (code, text) = as_user(65534);
        assert_eq!(code, Some(3), "{text}");
        assert!(
            text.contains("ermission denied") && text.contains(&*socks[0].to_string_lossy()),
            "another user must be refused by the kernel: {text}"
        );
    }
    assert_eq!(w.interrupt(), 0);
}

#[test]
fn completions_are_current() {
    // Generated from the command line's definition: every subcommand is in
    // each shell's script, and the committed bash script is the same.
    for shell in ["bash", "zsh", "fish"] {
        let mut c = devloop();
        c.args(["completions", shell]);
        let out = output_within(c, T);
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        for sub in ["watch", "sync", "status", "trigger", "intercept", "env", "run", "down", "doctor", "completions"] {
            assert!(text.contains(sub), "{shell} completions lack `{sub}`");
        }
        let stored = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("completions").join(format!("devloop.{shell}"));
        let want = std::fs::read_to_string(&stored).unwrap_or_default();
        assert!(
            want == text,
            "{} is not current: run `devloop completions {shell} > {}`",
            stored.display(),
            stored.display()
        );
    }
}
