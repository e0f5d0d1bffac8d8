//! The dashboard in a real terminal: the real binary in tmux (a real
//! pseudo-terminal), on a copy of the demo. It starts, shows the edit's
//! sync, answers the resync key, redraws at a new size, and gives the
//! terminal back (cooked mode, main screen) on quit and on SIGTERM.

mod util;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);

struct Tmux {
    socket: String,
    dir: tempfile::TempDir,
}

impl Tmux {
    /// A private tmux server running `devloop watch` (the dashboard: on
    /// a terminal it is the default) on a copy of the demo, 80×24.
    fn start() -> Tmux {
        Tmux::start_env("")
    }

    /// With extra environment (`NAME=VALUE ...`) for devloop.
    fn start_env(env: &str) -> Tmux {
        if Command::new("tmux").arg("-V").output().is_err() {
            panic!("tmux is missing: scripts/test installs it (apt-get install tmux)");
        }
        let dir = tempfile::tempdir().unwrap();
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        std::fs::create_dir_all(dir.path().join("examples/hello")).unwrap();
        for f in ["app.sh", "message.txt"] {
            std::fs::copy(repo.join("examples/hello").join(f), dir.path().join("examples/hello").join(f)).unwrap();
        }
        std::fs::copy(repo.join("devloop.yaml"), dir.path().join("devloop.yaml")).unwrap();
        let bin = PathBuf::from(env!("CARGO_BIN_EXE_devloop"));
        let agent = bin.with_file_name("devloop-agent");
        let script = format!(
            "cd {d} && env DEVLOOP_AGENT_BIN={a} TERM=xterm-256color {env} {b} watch; echo $? > {d}/exited; stty -a > {d}/stty; sleep 600",
            d = dir.path().display(),
            a = agent.display(),
            b = bin.display()
        );
        let t = Tmux { socket: format!("devloop-test-{}-{}", std::process::id(), rand_suffix()), dir };
        t.tmux(&["new-session", "-d", "-s", "t", "-x", "80", "-y", "24", &script]);
        t
    }

    fn tmux(&self, args: &[&str]) -> String {
        let out = Command::new("tmux").args(["-L", &self.socket]).args(args).output().unwrap();
        assert!(out.status.success(), "tmux {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn screen(&self) -> String {
        self.tmux(&["capture-pane", "-p", "-t", "t"])
    }

    fn wait_screen(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + T;
        loop {
            let s = self.screen();
            if pred(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "no {what} on screen within {T:?}:\n{s}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn keys(&self, k: &str) {
        self.tmux(&["send-keys", "-t", "t", k]);
    }

    /// After devloop exits: its exit code, and the terminal is given back
    /// (and the log's path printed).
    fn wait_restored(&self) -> i32 {
        self.wait_restored_saying("devloop: the log of this run is in")
    }

    fn wait_restored_saying(&self, said: &str) -> i32 {
        let exited = self.dir.path().join("exited");
        let deadline = Instant::now() + T;
        while !self.dir.path().join("stty").exists() {
            assert!(Instant::now() < deadline, "devloop did not exit within {T:?}:\n{}", self.screen());
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(100));
        let stty = std::fs::read_to_string(self.dir.path().join("stty")).unwrap();
        // Cooked again: line editing and echo on (raw mode has -icanon -echo).
        let words: Vec<&str> = stty.split_whitespace().collect();
        assert!(words.contains(&"icanon") && words.contains(&"echo") && words.contains(&"isig"), "{stty}");
        assert_eq!(
            self.tmux(&["display", "-p", "-t", "t", "#{alternate_on}"]).trim(),
            "0",
            "left the alternate screen"
        );
        assert_eq!(self.tmux(&["display", "-p", "-t", "t", "#{cursor_flag}"]).trim(), "1", "the cursor is shown again");
        let s = self.screen();
        assert!(s.contains(said), "{s}");
        std::fs::read_to_string(exited).unwrap().trim().parse().unwrap()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux").args(["-L", &self.socket, "kill-server"]).output();
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() as u64
}

fn width(screen: &str) -> usize {
    screen.lines().map(|l| l.chars().count()).max().unwrap_or(0)
}

#[test]
fn the_dashboard_shows_edits_answers_keys_resizes_and_restores_the_terminal() {
    let t = Tmux::start();
    let s = t.wait_screen("the live service", |s| s.contains("1/1 live") && s.contains("hello"));
    assert!(s.contains("2 files"), "the initial sync's two files: {s}");
    assert_eq!(width(&s), 80);
    // An edit: the row shows a one-file sync, the log shows the app's new line.
    std::fs::write(t.dir.path().join("examples/hello/message.txt"), "edited in the terminal test\n").unwrap();
    t.wait_screen("the edit's sync", |s| s.contains("1 file ") && s.contains("edited in the terminal test"));
    // The resync key: asked, answered in the footer.
    t.keys("s");
    t.wait_screen("the resync's answer", |s| s.contains("resync: compared everything by content"));
    // Resized: redrawn to the new size.
    t.tmux(&["resize-window", "-t", "t", "-x", "120", "-y", "40"]);
    let s = t.wait_screen("the wider screen", |s| width(s) == 120 && s.lines().count() >= 39 && s.contains("1/1 live"));
    assert!(s.lines().any(|l| l.starts_with('┌') && l.chars().count() == 120), "borders redrawn at 120:\n{s}");
    t.tmux(&["resize-window", "-t", "t", "-x", "80", "-y", "24"]);
    t.wait_screen("80 columns again", |s| width(s) == 80 && s.contains("1/1 live"));
    // Help, then quit.
    t.keys("?");
    t.wait_screen("the help", |s| s.contains("any key closes this help"));
    t.keys("x");
    t.keys("q");
    assert_eq!(t.wait_restored(), 0);
    // The log file the dashboard named holds the session's lines.
    let log = std::fs::read_to_string(t.dir.path().join(".devloop/watch.log")).unwrap();
    assert!(log.contains("[hello] resync: compared everything by content"), "{log}");
}

#[test]
fn sigterm_while_the_dashboard_is_up_restores_the_terminal() {
    let t = Tmux::start();
    t.wait_screen("the live service", |s| s.contains("1/1 live"));
    let pid = t.tmux(&["display", "-p", "-t", "t", "#{pane_pid}"]);
    // The pane runs sh, whose child is devloop.
    let out = Command::new("pgrep").args(["-P", pid.trim(), "-x", "devloop"]).output().unwrap();
    let devloop: i32 = String::from_utf8_lossy(&out.stdout).trim().parse().expect("devloop's pid");
    unsafe { libc::kill(devloop, libc::SIGTERM) };
    assert_eq!(t.wait_restored(), 0);
}

#[test]
fn ctrl_c_quits_and_restores_the_terminal() {
    let t = Tmux::start();
    t.wait_screen("the live service", |s| s.contains("1/1 live"));
    // Raw mode: Ctrl-C is a key for the dashboard, not a signal.
    t.keys("C-c");
    assert_eq!(t.wait_restored(), 0);
}

/// A bug in the dashboard (a panic, injected): the terminal is given back,
/// devloop stops every service cleanly, and says so with exit code 4.
#[test]
fn a_panicking_dashboard_gives_the_terminal_back_and_stops_devloop() {
    let t = Tmux::start_env("DEVLOOP_FAULTS=cli:ui-panic");
    let code = t.wait_restored_saying("devloop: the dashboard crashed (panic): a bug; devloop stops");
    assert_eq!(code, 4);
    // The panic's message went to the log, not over the screen.
    let log = std::fs::read_to_string(t.dir.path().join(".devloop/watch.log")).unwrap();
    assert!(log.contains("injected fault: ui-panic"), "{log}");
    // Every service stopped: the app's process is gone with the agent.
    let pid: i32 = log
        .lines()
        .find_map(|l| l.strip_prefix("[hello] app started (pid ")?.strip_suffix(')')?.parse().ok())
        .unwrap_or_else(|| panic!("the app never started: {log}"));
    let deadline = Instant::now() + T;
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(Instant::now() < deadline, "the app (pid {pid}) outlived devloop");
        std::thread::sleep(Duration::from_millis(50));
    }
}
