//! End-to-end sync on the local target: the real devloop and devloop-agent
//! binaries, real files, real processes.

mod util;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};
use util::*;

const T: Duration = Duration::from_secs(20);

#[test]
fn initial_sync_sends_differences_removes_extras_and_keeps_excluded_paths() {
    let p = Project::new();
    p.write("a.txt", b"alpha");
    p.write("dir/b.txt", b"beta");
    p.write("dir/run.sh", b"#!/bin/sh\necho hi\n");
    std::fs::set_permissions(p.src().join("dir/run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("b.txt", p.src().join("dir/link")).unwrap();
    p.write("scratch.tmp", b"excluded in config");
    std::fs::write(p.src().join(".gitignore"), "*.log\n").unwrap();
    p.write("debug.log", b"ignored by .gitignore");
    // Ignore files below the root count for their own directory.
    p.write("dir/.devloopignore", b"secret.txt\n");
    p.write("dir/secret.txt", b"ignored by dir/.devloopignore");
    p.write("dir/sub/.gitignore", b"*.bin\n");
    p.write("dir/sub/blob.bin", b"ignored by dir/sub/.gitignore");
    p.write("blob.bin", b"not ignored: the pattern is dir/sub's");
    // The target already has: a stale file, an extra file, an extra dir,
    // and excluded paths devloop must never touch.
    let out = p.out();
    std::fs::create_dir_all(out.join("dir")).unwrap();
    std::fs::create_dir_all(out.join("gone/deeper")).unwrap();
    std::fs::create_dir_all(out.join("node_modules/pkg")).unwrap();
    std::fs::write(out.join("dir/b.txt"), "stale").unwrap();
    std::fs::write(out.join("extra.txt"), "remove me").unwrap();
    std::fs::write(out.join("gone/deeper/x"), "remove me").unwrap();
    std::fs::write(out.join("node_modules/pkg/index.js"), "keep me").unwrap();
    std::fs::write(out.join("server.log"), "keep me: ignored").unwrap();
    let before = fingerprint(&p.src());

    let (code, output) = p.sync_once();
    assert_eq!(code, 0, "{output}");
    let skip = |r: &str| excluded(r) || r.ends_with(".log") || r == "dir/secret.txt" || r == "dir/sub/blob.bin";
    assert_eq!(snapshot(&p.src(), &skip), snapshot(&out, &skip));
    assert_eq!(std::fs::read_to_string(out.join("node_modules/pkg/index.js")).unwrap(), "keep me");
    assert_eq!(std::fs::read_to_string(out.join("server.log")).unwrap(), "keep me: ignored");
    assert!(!out.join("debug.log").exists(), ".gitignore'd file not sent");
    assert!(!out.join("dir/secret.txt").exists(), "a nested .devloopignore was not applied");
    assert!(!out.join("dir/sub/blob.bin").exists(), "a nested .gitignore was not applied");
    assert!(out.join("blob.bin").exists(), "a nested .gitignore leaked to its parent");
    assert!(!out.join("scratch.tmp").exists(), "excluded file not sent");
    assert!(std::fs::metadata(out.join("dir/run.sh")).unwrap().permissions().mode() & 0o111 != 0);
    assert_eq!(before, fingerprint(&p.src()), "source tree modified");

    // A second run finds nothing to send.
    let (code, output) = p.sync_once();
    assert_eq!(code, 0, "{output}");
    assert!(!output.contains("sending"), "an unchanged re-sync sent files:\n{output}");
}

#[test]
fn live_sync_follows_every_kind_of_change() {
    let p = Project::new();
    p.write("keep.txt", b"keep");
    p.write("old/dir/file.txt", b"in a dir that will be renamed");
    let mut w = p.watch();
    // The suite runs with either watcher (DEVLOOP_WATCHER); this proves
    // which one ran.
    let want = std::env::var("DEVLOOP_WATCHER").ok().filter(|v| !v.is_empty()).unwrap_or("inotify".into());
    assert_eq!(w.wait_first("watching", T)["watcher"], want.as_str());
    wait_converged(&p, Some(&mut w), T);
    let src = p.src();
    type Step<'a> = (&'static str, Box<dyn Fn() + 'a>);
    let steps: Vec<Step> = vec![
        ("edit", Box::new(|| p.write("keep.txt", b"edited"))),
        ("create in new dirs", Box::new(|| p.write("new/deep/er/x.txt", b"x"))),
        ("delete file", Box::new(|| std::fs::remove_file(src.join("new/deep/er/x.txt")).unwrap())),
        ("rename file", Box::new(|| std::fs::rename(src.join("keep.txt"), src.join("renamed.txt")).unwrap())),
        ("rename dir", Box::new(|| std::fs::rename(src.join("old"), src.join("moved")).unwrap())),
        (
            "chmod +x",
            Box::new(|| {
                std::fs::set_permissions(src.join("renamed.txt"), std::fs::Permissions::from_mode(0o755)).unwrap()
            }),
        ),
        ("symlink", Box::new(|| std::os::unix::fs::symlink("renamed.txt", src.join("ln")).unwrap())),
        (
            "file becomes dir",
            Box::new(|| {
                std::fs::remove_file(src.join("renamed.txt")).unwrap();
                p.write("renamed.txt/inner", b"now a dir");
            }),
        ),
        ("delete whole tree", Box::new(|| std::fs::remove_dir_all(src.join("moved")).unwrap())),
        ("excluded stays out", Box::new(|| p.write("node_modules/big.js", b"never synced"))),
        ("empty file", Box::new(|| p.write("empty", b""))),
    ];
    for (name, step) in &steps {
        step();
        std::thread::sleep(Duration::from_millis(30));
        wait_converged(&p, Some(&mut w), T);
        eprintln!("ok: {name}");
    }
    assert!(!p.out().join("node_modules").exists());
    assert_eq!(w.count("sync_error"), 0, "{}", w.dump());
    assert_eq!(w.interrupt(), 0);
}

/// The first scan reads nested ignore files (on several threads); what it
/// read must keep filtering the live changes that follow.
#[test]
fn nested_ignore_files_from_the_first_scan_filter_live_changes() {
    let p = Project::new();
    p.write("a/.devloopignore", b"*.tmp\n");
    p.write("a/b/.gitignore", b"build/\n");
    p.write("z/keep.txt", b"k");
    let mut w = p.watch();
    wait_converged(&p, Some(&mut w), T);
    p.write("a/scratch.tmp", b"ignored by a/.devloopignore");
    p.write("a/b/build/out.o", b"ignored by a/b/.gitignore");
    p.write("a/b/new.txt", b"synced");
    p.write("z/late.txt", b"synced last");
    let out = p.out();
    let t0 = Instant::now();
    while !(out.join("a/b/new.txt").exists() && out.join("z/late.txt").exists()) {
        assert!(t0.elapsed() < T, "live changes never synced:\n{}", w.dump());
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(!out.join("a/scratch.tmp").exists(), "a/.devloopignore ignored while watching");
    assert!(!out.join("a/b/build").exists(), "a/b/.gitignore ignored while watching");
    assert_eq!(w.interrupt(), 0);
}

#[test]
fn a_thousand_file_branch_switch_converges_in_a_few_batches() {
    let p = Project::new();
    for i in 0..1000 {
        p.write(&format!("pkg{}/file{i}.rs", i % 40), format!("fn v1_{i}() {{}}\n").as_bytes());
    }
    let mut w = p.watch();
    wait_converged(&p, Some(&mut w), T);
    let before = w.count("sync_started");
    // "git checkout other-branch": half deleted, a quarter rewritten, new
    // files in new directories, as fast as the disk allows.
    let src = p.src();
    for i in 0..1000 {
        let f = src.join(format!("pkg{}/file{i}.rs", i % 40));
        match i % 4 {
            0 | 1 => std::fs::remove_file(f).unwrap(),
            2 => std::fs::write(f, format!("fn v2_{i}() {{}}\n")).unwrap(),
            _ => {}
        }
    }
    for i in 0..500 {
        p.write(&format!("newpkg{}/n{i}.rs", i % 20), b"fn new() {}\n");
    }
    wait_converged(&p, Some(&mut w), Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(300));
    let batches = w.count("sync_started") - before;
    eprintln!("branch switch took {batches} batches");
    assert!(batches <= 40, "a 2000-change storm should coalesce, took {batches} batches");
    assert_eq!(w.count("sync_error"), 0, "{}", w.dump());
}

#[test]
fn a_reader_never_sees_a_partial_file() {
    let p = Project::new();
    const LEN: usize = 2 << 20;
    p.write("big.bin", &vec![b'a'; LEN]);
    let mut w = p.watch();
    wait_converged(&p, Some(&mut w), T);
    let target = p.out().join("big.bin");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut reads = 0u64;
            let mut versions = std::collections::BTreeSet::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let b = std::fs::read(&target).expect("the file is always there");
                assert_eq!(b.len(), LEN, "partial file seen");
                assert!(b.iter().all(|x| *x == b[0]), "mixed content seen");
                versions.insert(b[0]);
                reads += 1;
            }
            (reads, versions)
        })
    };
    for v in b"bcdefghijklmnopqrst" {
        p.replace("big.bin", &vec![*v; LEN]);
        std::thread::sleep(Duration::from_millis(40));
    }
    wait_converged(&p, Some(&mut w), T);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (reads, versions) = reader.join().expect("reader saw only whole files");
    assert!(reads > 20 && versions.len() > 3, "reader too slow to prove anything: {reads} reads, {versions:?}");
}

#[test]
fn killing_the_agent_mid_batch_leaves_old_or_new_files_and_converges() {
    let p = Project::new();
    const N: usize = 40;
    for i in 0..N {
        p.write(&format!("f{i}"), &vec![b'o'; 1 << 20]);
    }
    let mut w = p.watch();
    wait_converged(&p, Some(&mut w), T);
    let pid = w.agent_pid();
    for i in 0..N {
        p.replace(&format!("f{i}"), &vec![b'n'; 1 << 20]);
    }
    w.wait_event("sync_started", T);
    unsafe { libc::kill(pid, libc::SIGKILL) };
    // Every file is whole: all old or all new, never a mix or a fragment.
    for i in 0..N {
        let b = std::fs::read(p.out().join(format!("f{i}"))).unwrap();
        assert_eq!(b.len(), 1 << 20);
        assert!(b.iter().all(|x| *x == b[0]) && (b[0] == b'o' || b[0] == b'n'));
    }
    w.wait_event("agent_lost", T);
    w.wait_event("agent_connected", T);
    wait_converged(&p, Some(&mut w), T);
    let temps: Vec<_> = snapshot(&p.out(), &|_| false).into_keys().filter(|k| k.contains(".devloop-tmp-")).collect();
    assert!(temps.is_empty(), "temporaries left behind: {temps:?}");
}

#[test]
fn post_sync_commands_run_on_matching_changes_and_the_app_restarts() {
    let p = Project::with_yaml(
        r#"services:
  svc:
    target: {local: {root: out}}
    sync:
      - from: src
    on_sync:
      - when: "*.json"
        run: "cat package.json > installed.txt"
      - when: ["scripts/*.sh"]
        run: [sh, -c, "exit 3"]
    app:
      run: "echo app-pid-$$; exec sleep 1000"
      grace_ms: 500
"#,
    );
    p.write("package.json", b"{\"v\":1}");
    p.write("main.txt", b"1");
    let mut w = p.watch();
    // The initial sync brought package.json, so its command ran once.
    let ex = w.wait_first("command_exited", T);
    assert_eq!(ex["code"], 0, "{}", w.dump());
    let first = w.wait_first("app_started", T)["pid"].as_u64().unwrap();
    p.replace("package.json", b"{\"v\":2}");
    let ex = w.wait_event("command_exited", T);
    assert_eq!(ex["code"], 0, "{}", w.dump());
    assert_eq!(std::fs::read_to_string(p.out().join("installed.txt")).unwrap(), "{\"v\":2}");
    let second = w.wait_event("app_started", T)["pid"].as_u64().unwrap();
    assert_ne!(first, second, "app restarted after the sync");
    // The old app is gone.
    assert!(unsafe { libc::kill(first as i32, 0) } != 0, "old app still running");
    // A failing command is reported with its exit code, and the app is left
    // alone (no restart after a failed post-sync command).
    p.write("scripts/x.sh", b"echo");
    let ex = w.wait_event("command_exited", T);
    assert_eq!(ex["code"], 3, "{}", w.dump());
    // Ctrl-C stops the agent and the app: nothing is left running.
    let agent = w.agent_pid();
    assert_eq!(w.interrupt(), 0);
    let deadline = Instant::now() + Duration::from_secs(5);
    while (unsafe { libc::kill(agent, 0) } == 0 || unsafe { libc::kill(second as i32, 0) } == 0)
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(unsafe { libc::kill(agent, 0) } != 0, "agent still running after Ctrl-C");
    assert!(unsafe { libc::kill(second as i32, 0) } != 0, "app still running after Ctrl-C");
}

#[test]
fn sync_once_reports_an_unreachable_target_with_exit_code_3() {
    let p = Project::with_yaml(
        "services:\n  svc:\n    target: {exec: {command: [\"false\"]}}\n    sync:\n      - from: src\n",
    );
    let (code, output) = p.sync_once();
    assert_eq!(code, 3, "{output}");
    assert!(output.contains("error"), "{output}");
}

#[test]
fn the_exec_target_runs_the_agent_through_a_user_command() {
    let agent = std::path::PathBuf::from(env!("CARGO_BIN_EXE_devloop")).with_file_name("devloop-agent");
    let yaml = format!(
        "services:\n  svc:\n    target:\n      exec:\n        command: [sh, -c, 'exec \"$0\" serve --stdio --token-stdin --root out', {}]\n        token: stdin\n    sync:\n      - from: src\n",
        agent.display()
    );
    let p = Project::with_yaml(&yaml);
    p.write("hello.txt", b"through exec");
    let (code, output) = p.sync_once();
    assert_eq!(code, 0, "{output}");
    assert_eq!(std::fs::read_to_string(p.out().join("hello.txt")).unwrap(), "through exec");
}

/// Over an exec command (a network, as far as devloop can tell), a large
/// sync travels in zstd blocks: the bytes that cross the command's stdin
/// are a fraction of the tree, and the tree lands byte for byte. With
/// compression turned off, the same count is the whole tree: the counter
/// counts, and compression is what shrinks it.
#[test]
fn the_exec_target_carries_a_large_sync_compressed() {
    let agent = std::path::PathBuf::from(env!("CARGO_BIN_EXE_devloop")).with_file_name("devloop-agent");
    let tree: Vec<(String, Vec<u8>)> = (0..200)
        .map(|i| {
            let text = format!("pub fn item_{i}(x: u64) -> u64 {{ x * {i} + 1 }} // source text\n").repeat(300);
            (format!("m{}/f{i}.rs", i % 7), text.into_bytes())
        })
        .collect();
    let total: usize = tree.iter().map(|(_, c)| c.len()).sum();
    for (compress, max, min) in [("1", total / 4, 0), ("0", usize::MAX, total)] {
        let p = Project::with_yaml("");
        let count = p.dir.path().join("stdin-bytes");
        let yaml = format!(
            "services:\n  svc:\n    target:\n      exec:\n        command: [bash, -c, 'tee >(wc -c > \"$1\") | exec \"$0\" serve --stdio --token-stdin --root out', {}, {}]\n        token: stdin\n    sync:\n      - from: src\n",
            agent.display(),
            count.display()
        );
        std::fs::write(p.dir.path().join("devloop.yaml"), yaml).unwrap();
        for (rel, content) in &tree {
            p.write(rel, content);
        }
        let out = output_within(
            {
                let mut c = p.cmd(&["sync", "--once"]);
                c.env("DEVLOOP_COMPRESS", compress);
                c
            },
            T,
        );
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        for (rel, content) in &tree {
            assert_eq!(&std::fs::read(p.out().join(rel)).unwrap(), content, "{rel} (compress={compress})");
        }
        // wc writes once the agent's stdin has closed.
        let t0 = Instant::now();
        let sent = loop {
            if let Some(n) = std::fs::read_to_string(&count).ok().and_then(|s| s.trim().parse::<usize>().ok()) {
                break n;
            }
            assert!(t0.elapsed() < T, "the byte count never came");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(sent <= max && sent >= min, "compress={compress}: {sent} bytes crossed for a {total}-byte tree");
    }
}

#[test]
fn a_file_being_written_in_place_is_synced_when_closed_not_half_way() {
    use std::io::Write;
    let p = Project::new();
    p.write("doc.txt", b"old");
    let mut w = p.watch();
    wait_converged(&p, Some(&mut w), T);
    let target = p.out().join("doc.txt");
    // An editor saving in place, slowly: truncate, half, pause, rest, close.
    let mut f = std::fs::File::create(p.src().join("doc.txt")).unwrap();
    f.write_all(b"first half|").unwrap();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(120) {
        let now = std::fs::read(&target).unwrap();
        assert!(now == b"old", "target showed a file still being written: {:?}", String::from_utf8_lossy(&now));
        std::thread::sleep(Duration::from_millis(2));
    }
    f.write_all(b"second half").unwrap();
    drop(f);
    wait_converged(&p, Some(&mut w), T);
    assert_eq!(std::fs::read(&target).unwrap(), b"first half|second half");

    // A writer that keeps the file open (a log) is still synced, after a
    // short hold.
    let mut log = std::fs::OpenOptions::new().create(true).append(true).open(p.src().join("app.log")).unwrap();
    log.write_all(b"line 1\n").unwrap();
    let t0 = Instant::now();
    while std::fs::read(p.out().join("app.log")).ok().as_deref() != Some(b"line 1\n".as_slice()) {
        assert!(t0.elapsed() < Duration::from_secs(5), "an open file was never synced\n{}", w.dump());
        std::thread::sleep(Duration::from_millis(10));
    }
    // ...and keeps syncing while it stays open.
    log.write_all(b"line 2\n").unwrap();
    let t0 = Instant::now();
    while std::fs::read(p.out().join("app.log")).ok().as_deref() != Some(b"line 1\nline 2\n".as_slice()) {
        assert!(t0.elapsed() < Duration::from_secs(5), "later writes to an open file were never synced\n{}", w.dump());
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(log);
}

/// An unchanged re-sync reads no file on either side once the tree has
/// settled: both take the hashes from their caches. A file changed behind
/// devloop's back, on either side, with its size and mtime as they were,
/// is still found (its ctime moved) and put right.
#[test]
fn an_unchanged_resync_reads_no_file_and_still_finds_a_hidden_change() {
    let p = Project::new();
    let n = 1200;
    for i in 0..n {
        p.write(&format!("d{}/f{i}.txt", i % 10), format!("file {i:05}").as_bytes());
    }
    let in_sync = || p.in_sync(T);
    assert_eq!(in_sync(), (n, 0, 0), "the first sync");
    // Hashes are only kept for files left alone for 2 s (see hash_cache):
    // wait until every file on both sides is that old.
    std::thread::sleep(Duration::from_millis(2100));
    assert_eq!(in_sync(), (n, 0, 0), "the second sync reads both trees, and keeps their hashes");
    assert_eq!(in_sync(), (n, n, n), "the third reads neither");

    // Same size, mtime put back: only the ctime says it changed.
    let sneak = |path: std::path::PathBuf, content: &str| {
        let old = std::fs::metadata(&path).unwrap().modified().unwrap();
        std::fs::write(&path, content).unwrap();
        std::fs::File::options().write(true).open(&path).unwrap().set_modified(old).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().modified().unwrap(), old);
    };
    sneak(p.src().join("d3/f3.txt"), "FILE 00003");
    sneak(p.out().join("d4/f4.txt"), "pod! 00004");
    assert_eq!(in_sync(), (n, n - 1, n - 1), "each side read the one file that changed");
    assert_eq!(std::fs::read_to_string(p.out().join("d3/f3.txt")).unwrap(), "FILE 00003", "the source's change");
    assert_eq!(std::fs::read_to_string(p.out().join("d4/f4.txt")).unwrap(), "file 00004", "the target put right");
    assert!(p.cache().join("hashes").is_dir() && p.cache().join("target-hashes").is_dir());
}

#[test]
fn a_missing_cluster_is_reported_with_exit_code_3_and_a_hint() {
    let p = Project::with_yaml(
        "services:\n  web:\n    target:\n      kubernetes: {deployment: web, root: /app}\n    sync:\n      - from: src\n",
    );
    let kubeconfig = p.dir.path().join("no-such-kubeconfig");
    let out = p
        .cmd(&["sync", "--once"])
        .env("KUBECONFIG", &kubeconfig)
        .env("HOME", p.dir.path())
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{text}");
    assert!(text.contains("cannot load the cluster configuration") && text.contains("hint: set KUBECONFIG"), "{text}");
}
