//! Drives the real `devloop` binary (and, through it, the real
//! `devloop-agent`) on temporary directories.
#![allow(dead_code)]

pub mod servers;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub fn devloop() -> Command {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_devloop"));
    let agent = bin.with_file_name("devloop-agent");
    assert!(
        agent.is_file(),
        "{} is missing: run the suite with `cargo test --workspace`, which builds it",
        agent.display()
    );
    let mut c = Command::new(bin);
    c.env("DEVLOOP_AGENT_BIN", agent);
    c
}

/// A project: a temp dir with `src/` (the source tree) and `devloop.yaml`
/// syncing it into `out/` on the local target.
pub struct Project {
    pub dir: tempfile::TempDir,
}

impl Project {
    pub fn new() -> Project {
        Project::with_yaml(
            "services:\n  svc:\n    target: {local: {root: out}}\n    sync:\n      - from: src\n        exclude: [\"*.tmp\", \"node_modules/\"]\n",
        )
    }

    pub fn with_yaml(yaml: &str) -> Project {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("src")).unwrap();
        std::fs::write(dir.path().join("devloop.yaml"), yaml).unwrap();
        Project { dir }
    }

    pub fn src(&self) -> PathBuf {
        self.dir.path().join("src")
    }

    pub fn out(&self) -> PathBuf {
        self.dir.path().join("out")
    }

    pub fn write(&self, rel: &str, content: &[u8]) {
        let p = self.src().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }

    /// Replaces a source file atomically (as editors do), so the source
    /// itself never holds a partial file.
    pub fn replace(&self, rel: &str, content: &[u8]) {
        let p = self.src().join(rel);
        let tmp = self.dir.path().join(".editor-tmp");
        std::fs::write(&tmp, content).unwrap();
        std::fs::rename(tmp, p).unwrap();
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = devloop();
        c.current_dir(self.dir.path()).args(args);
        // Hash caches (both sides) stay in the project.
        c.env("DEVLOOP_CACHE_DIR", self.cache());
        c
    }

    /// Where the project's devloop keeps its caches.
    pub fn cache(&self) -> PathBuf {
        self.dir.path().join("cache")
    }

    /// `devloop sync --once`, returning (exit code, stdout).
    pub fn sync_once(&self) -> (i32, String) {
        let out = self.cmd(&["sync", "--once"]).output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        )
    }

    /// `devloop --json sync --once`, which must succeed within `timeout`;
    /// returns its `in_sync` event's files, and the hashes reused here and
    /// in the target.
    pub fn in_sync(&self, timeout: Duration) -> (u64, u64, u64) {
        let out = output_within(self.cmd(&["--json", "sync", "--once"]), timeout);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
        let ev = stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|e| e["type"] == "in_sync")
            .unwrap_or_else(|| panic!("no in_sync event:\n{stdout}"));
        (ev["files"].as_u64().unwrap(), ev["reused"].as_u64().unwrap(), ev["target_reused"].as_u64().unwrap())
    }

    /// Starts `devloop --json watch` and waits until it is watching.
    pub fn watch(&self) -> Watching {
        self.watch_n(1)
    }

    /// Starts `devloop --json watch` and waits until `n` sessions (one per
    /// pod) are watching.
    pub fn watch_n(&self, n: usize) -> Watching {
        Watching::spawn(self.cmd(&["--json", "watch"]), n)
    }
}

impl Watching {
    /// Starts a `devloop --json watch` command and waits until `n`
    /// sessions are watching.
    pub fn spawn(mut cmd: Command, n: usize) -> Watching {
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let v: serde_json::Value =
                    serde_json::from_str(&line).unwrap_or_else(|e| panic!("not NDJSON: {line}: {e}"));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        let mut w = Watching { child, rx, seen: Vec::new() };
        for _ in 0..n {
            w.wait_event("watching", Duration::from_secs(60));
        }
        w
    }
}

/// A running `devloop watch` and the events it printed.
pub struct Watching {
    pub child: Child,
    rx: mpsc::Receiver<serde_json::Value>,
    pub seen: Vec<serde_json::Value>,
}

impl Watching {
    /// Collects events until one of `kind` arrives (after those already
    /// seen); panics with everything seen on timeout.
    pub fn wait_event(&mut self, kind: &str, timeout: Duration) -> serde_json::Value {
        self.wait_for(&format!("`{kind}` event"), timeout, |v| v["type"] == kind)
    }

    /// Collects events until one for which `pred` holds arrives (after
    /// those already seen); panics with everything seen on timeout.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let start = self.seen.len();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = self.seen[start..].iter().find(|v| pred(v)) {
                return v.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(v) => self.seen.push(v),
                Err(_) => panic!("no {what} within {timeout:?}; saw:\n{}", self.dump()),
            }
        }
    }

    /// The first event of `kind` since devloop started (waiting for it if
    /// it has not come yet).
    pub fn wait_first(&mut self, kind: &str, timeout: Duration) -> serde_json::Value {
        if let Some(v) = self.seen.iter().find(|v| v["type"] == kind) {
            return v.clone();
        }
        self.wait_event(kind, timeout)
    }

    /// The pid of the agent of the first session.
    pub fn agent_pid(&mut self) -> i32 {
        self.wait_first("agent_connected", Duration::from_secs(20))["pid"].as_u64().unwrap() as i32
    }

    /// Takes whatever events are already waiting.
    pub fn drain(&mut self) {
        while let Ok(v) = self.rx.try_recv() {
            self.seen.push(v);
        }
    }

    pub fn count(&mut self, kind: &str) -> usize {
        self.drain();
        self.seen.iter().filter(|v| v["type"] == kind).count()
    }

    pub fn dump(&self) -> String {
        self.seen.iter().map(|v| v.to_string()).collect::<Vec<_>>().join("\n")
    }

    /// SIGINT, like Ctrl-C; returns the exit code.
    pub fn interrupt(mut self) -> i32 {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code().unwrap_or(-1);
            }
            assert!(Instant::now() < deadline, "devloop did not exit after SIGINT");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Watching {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a tree holds: path → (kind, content, executable).
pub type Snapshot = BTreeMap<String, (char, Vec<u8>, bool)>;

/// Snapshots a tree, leaving out paths for which `skip` is true.
pub fn snapshot(root: &Path, skip: &dyn Fn(&str) -> bool) -> Snapshot {
    let mut out = BTreeMap::new();
    fn go(root: &Path, dir: &Path, skip: &dyn Fn(&str) -> bool, out: &mut Snapshot) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_str().unwrap().to_string();
            if skip(&rel) {
                continue;
            }
            // Entries can vanish while the agent works (its temporaries).
            let Ok(md) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if md.file_type().is_symlink() {
                let Ok(t) = std::fs::read_link(&p) else {
                    continue;
                };
                out.insert(rel, ('l', t.to_str().unwrap().as_bytes().to_vec(), false));
            } else if md.is_dir() {
                out.insert(rel, ('d', vec![], false));
                go(root, &p, skip, out);
            } else {
                let exec = md.permissions().mode() & 0o111 != 0;
                out.insert(rel, ('f', std::fs::read(&p).unwrap_or_default(), exec));
            }
        }
    }
    go(root, root, skip, &mut out);
    out
}

/// Paths the default project excludes.
pub fn excluded(rel: &str) -> bool {
    rel.ends_with(".tmp") || rel == "node_modules" || rel.starts_with("node_modules/") || rel.contains("/node_modules")
}

/// Waits until the target equals the source (minus excludes); panics with
/// the difference on timeout.
pub fn wait_converged(p: &Project, w: Option<&mut Watching>, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let a = snapshot(&p.src(), &excluded);
        let b = snapshot(&p.out(), &excluded);
        if a == b {
            return;
        }
        if Instant::now() > deadline {
            let only_src: Vec<_> = a.keys().filter(|k| b.get(*k) != a.get(*k)).take(10).collect();
            let only_out: Vec<_> = b.keys().filter(|k| !a.contains_key(*k)).take(10).collect();
            panic!(
                "target did not converge in {timeout:?}\n differing/missing in target: {only_src:?}\n extra in target: {only_out:?}\n events:\n{}",
                w.map(|w| {
                    w.drain();
                    w.dump()
                })
                .unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every file's content and mtime, to prove the source is never modified.
pub fn fingerprint(root: &Path) -> BTreeMap<String, (Vec<u8>, std::time::SystemTime, u32)> {
    let mut out = BTreeMap::new();
    for (k, _) in snapshot(root, &|_| false) {
        let p = root.join(&k);
        let md = std::fs::symlink_metadata(&p).unwrap();
        let content = if md.is_file() { std::fs::read(&p).unwrap() } else { vec![] };
        out.insert(k, (content, md.modified().unwrap(), md.permissions().mode()));
    }
    out
}

/// Runs a command to its end, as `Command::output` does, but fails the
/// test (killing the command) if it takes longer than `timeout`.
pub fn output_within(mut cmd: Command, timeout: Duration) -> std::process::Output {
    use std::io::Read;
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut readers = Vec::new();
    for mut pipe in
        [Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>, Box::new(child.stderr.take().unwrap())]
    {
        readers.push(std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = pipe.read_to_end(&mut v);
            v
        }));
    }
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not end within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut outs = readers.into_iter().map(|r| r.join().unwrap());
    std::process::Output { status, stdout: outs.next().unwrap(), stderr: outs.next().unwrap() }
}
