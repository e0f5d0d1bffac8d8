//! The first sync into a fresh pod (part `first`, with KUBECONFIG): devloop
//! against `tar -c | kubectl exec -i POD -- tar -x`, in the same run, on
//! two links and two trees.
//!
//! - Links: the API server as it is (loopback here: CPU-bound), and a
//!   100 Mbit/s link: a TCP proxy in front of the API server, which both
//!   devloop and kubectl reach through a kubeconfig that points at it (TLS
//!   passes through untouched).
//! - Trees: the bench's 20k-file tree (source files and 4 x 50 MiB of
//!   random binaries, which do not compress), and a real source tree: a
//!   copy of the crate sources in cargo's registry (made once, under
//!   ~/.cache/devloop; its `.gitignore` files are left out, so that tar
//!   and devloop carry the same files).
//! - Each run gets a fresh pod (no agent, nothing synced) and dropped page
//!   caches; then the unchanged re-sync: a second `devloop sync --once`.
//! - Besides wall time: the CPU of the processes on this machine (devloop;
//!   tar and kubectl), of the pod (the agent; the pod's tar) and, on the
//!   project's own cluster, of the API server, kubelet and containerd.
//!
//! Options (env): BENCH_FIRST_LINKS (`direct,100mbit`), BENCH_FIRST_TREES
//! (`20k,registry`).

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const POD_ROOT: &str = "/app";
const APP: &str = "first";

struct Cluster {
    kubectl: PathBuf,
    ns: String,
    /// The cluster's own state directory (scripts/test-cluster), when this
    /// is the project's cluster: its processes' CPU is counted.
    state: Option<PathBuf>,
}

/// What one method cost.
#[derive(Default, Clone, Copy)]
struct Cost {
    secs: f64,
    /// CPU seconds: processes here, the pod, the cluster's own processes.
    here: f64,
    pod: Option<f64>,
    plane: Option<f64>,
    files: usize,
    /// From devloop's `in_sync` event: files whose hash came from the
    /// cache here, and in the pod.
    reused: Option<(u64, u64)>,
}

impl Cost {
    fn show(&self, what: &str, floor: Option<&Cost>) {
        let ratio = floor.map(|f| format!("   {:.2}x tar", self.secs / f.secs)).unwrap_or_default();
        let opt = |v: Option<f64>| v.map(|v| format!("{v:.1} s")).unwrap_or_else(|| "-".into());
        let reused = self.reused.map(|(h, p)| format!(", hashes reused: {h} here, {p} in the pod")).unwrap_or_default();
        println!(
            "  {what:<34} {:>6.2} s{ratio:<13} CPU here {:.1} s, pod {}, API server+kubelet+containerd {}   ({} files in the pod{reused})",
            self.secs,
            self.here,
            opt(self.pod),
            opt(self.plane),
            self.files
        );
    }
}

fn children_cpu() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut u) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

/// CPU seconds of a process so far (None once it is gone).
fn proc_cpu(pid: &str) -> Option<f64> {
    let pid: u32 = pid.parse().ok()?;
    std::path::Path::new(&format!("/proc/{pid}")).exists().then_some(())?;
    // SAFETY: sysconf has no preconditions.
    Some(proc_cpu_ticks(pid) as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64)
}

/// Empties the page cache (as root), so every run reads the tree from disk.
fn drop_caches() -> bool {
    let _ = Command::new("sync").status();
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

impl Cluster {
    fn kubectl(&self, kubeconfig: &Path) -> Command {
        let mut c = Command::new(&self.kubectl);
        c.arg("--kubeconfig").arg(kubeconfig).args(["-n", &self.ns]);
        c
    }

    fn out(&self, kubeconfig: &Path, args: &[&str]) -> String {
        let o = self.kubectl(kubeconfig).args(args).output().expect("kubectl runs");
        let err = String::from_utf8_lossy(&o.stderr);
        // A forced delete warns that it does not wait: it is meant not to.
        if !o.status.success() || !(err.is_empty() || err.contains("Immediate deletion")) {
            eprint!("kubectl {}: {err}", args.join(" "));
        }
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Replaces the bench pod with a new one (no agent, an empty root) and
    /// returns its name.
    fn fresh_pod(&self, kubeconfig: &Path) -> String {
        let old = self.out(kubeconfig, &["get", "pods", "-l", &format!("app={APP}"), "-o", "name"]);
        if !old.trim().is_empty() {
            self.out(
                kubeconfig,
                &["delete", "pods", "-l", &format!("app={APP}"), "--grace-period=0", "--force", "--wait=false"],
            );
        }
        let t0 = Instant::now();
        let fmt = r#"{range .items[*]}{.metadata.name} {.status.phase} {.metadata.deletionTimestamp} {.status.containerStatuses[0].ready}{"\n"}{end}"#;
        loop {
            let list =
                self.out(kubeconfig, &["get", "pods", "-l", &format!("app={APP}"), "-o", &format!("jsonpath={fmt}")]);
            let fresh = list.lines().find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                // name, phase, ready (a pod being deleted has a timestamp
                // between them, and so four fields).
                (f.len() == 3 && f[1] == "Running" && f[2] == "true" && !old.contains(&format!("pod/{}\n", f[0])))
                    .then(|| f[0].to_string())
            });
            if let Some(p) = fresh {
                return p;
            }
            assert!(t0.elapsed() < Duration::from_secs(120), "no fresh ready pod of app={APP} (last: {list})");
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// The pod's CPU seconds so far, from its cgroup on this node (None on
    /// a cluster whose nodes are elsewhere).
    fn pod_cpu(&self, kubeconfig: &Path, pod: &str) -> Option<f64> {
        let uid = self.out(kubeconfig, &["get", "pod", pod, "-o", "jsonpath={.metadata.uid}"]);
        let uid = uid.trim();
        for class in ["besteffort/", "burstable/", ""] {
            for root in ["/sys/fs/cgroup/cpuacct/kubepods/", "/sys/fs/cgroup/cpu,cpuacct/kubepods/"] {
                if let Ok(ns) = std::fs::read_to_string(format!("{root}{class}pod{uid}/cpuacct.usage")) {
                    return ns.trim().parse::<f64>().ok().map(|n| n / 1e9);
                }
            }
            let v2 = format!("/sys/fs/cgroup/kubepods/{class}pod{uid}/cpu.stat");
            if let Ok(s) = std::fs::read_to_string(v2) {
                let us =
                    s.lines().find_map(|l| l.strip_prefix("usage_usec ")).and_then(|v| v.trim().parse::<f64>().ok());
                return us.map(|u| u / 1e6);
            }
        }
        None
    }

    /// CPU seconds of the API server, kubelet and containerd so far.
    fn plane_cpu(&self) -> Option<f64> {
        let state = self.state.as_ref()?;
        let mut sum = 0.0;
        for c in ["kube-apiserver", "kubelet", "containerd"] {
            let pid = std::fs::read_to_string(state.join(format!("pids/{c}.pid"))).ok()?;
            sum += proc_cpu(pid.trim())?;
        }
        Some(sum)
    }

    fn files_in_pod(&self, kubeconfig: &Path, pod: &str) -> usize {
        let n = self.out(kubeconfig, &["exec", pod, "--", "sh", "-c", &format!("find {POD_ROOT} -type f | wc -l")]);
        n.trim().parse().unwrap_or(0)
    }

    /// Runs `cmd` against `pod` and says what it cost.
    fn cost(&self, kubeconfig: &Path, pod: &str, cmd: &mut Command) -> Cost {
        let (pod0, plane0, here0) = (self.pod_cpu(kubeconfig, pod), self.plane_cpu(), children_cpu());
        let t0 = Instant::now();
        let out = cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).output().expect("the command runs");
        let secs = t0.elapsed().as_secs_f64();
        assert!(out.status.success(), "{cmd:?} failed");
        let reused = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|e| e["type"] == "in_sync")
            .map(|e| (e["reused"].as_u64().unwrap_or(0), e["target_reused"].as_u64().unwrap_or(0)));
        let here = children_cpu() - here0;
        let pod_cpu = self.pod_cpu(kubeconfig, pod).zip(pod0).map(|(a, b)| a - b);
        let plane = self.plane_cpu().zip(plane0).map(|(a, b)| a - b);
        Cost { secs, here, pod: pod_cpu, plane, files: self.files_in_pod(kubeconfig, pod), reused }
    }
}

/// The crate sources of cargo's registry, copied once to a fixed place
/// (so that every run, and every later build, sees the same tree).
fn registry_tree() -> Option<PathBuf> {
    let home = PathBuf::from(std::env::var_os("HOME")?);
    let cache = std::env::var_os("DEVLOOP_CACHE").map(PathBuf::from).unwrap_or_else(|| home.join(".cache/devloop"));
    let dst = cache.join("bench-registry-src");
    if dst.join(".complete").exists() {
        return Some(dst);
    }
    let cargo_home = std::env::var_os("CARGO_HOME").map(PathBuf::from).unwrap_or_else(|| home.join(".cargo"));
    let src = std::fs::read_dir(cargo_home.join("registry/src")).ok()?.flatten().next()?.path();
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::create_dir_all(&dst).ok()?;
    let ok = Command::new("cp").arg("-a").arg(format!("{}/.", src.display())).arg(&dst).status().ok()?.success();
    // Ignore files would make devloop leave out what tar carries.
    let _ = Command::new("find").arg(&dst).args(["-name", ".gitignore", "-delete"]).status();
    (ok && std::fs::write(dst.join(".complete"), "").is_ok()).then_some(dst)
}

fn tree_size(p: &Path) -> (usize, u64) {
    fn walk(p: &Path, acc: &mut (usize, u64)) {
        for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
            let Ok(t) = e.file_type() else { continue };
            if t.is_dir() {
                walk(&e.path(), acc);
            } else if t.is_file() {
                acc.0 += 1;
                acc.1 += e.metadata().map(|m| m.len()).unwrap_or(0);
            }
        }
    }
    let mut acc = (0, 0);
    walk(p, &mut acc);
    acc
}

fn main() {
    let only = std::env::var("BENCH_ONLY").unwrap_or_else(|_| "first".into());
    if !only.split(',').any(|p| p.trim() == "first") {
        return;
    }
    println!("## 8. first sync into a fresh pod: devloop against tar | kubectl exec");
    let Some(kubeconfig) = std::env::var_os("KUBECONFIG").map(PathBuf::from) else {
        println!("SKIP: no cluster (KUBECONFIG unset; scripts/test-cluster up starts one)\n");
        return;
    };
    let kubectl = std::env::var_os("DEVLOOP_KUBECTL").map(PathBuf::from).unwrap_or_else(|| "kubectl".into());
    if Command::new(&kubectl).arg("version").arg("--client").output().is_err() {
        println!("SKIP: no kubectl (set DEVLOOP_KUBECTL; scripts/test-cluster env prints it)\n");
        return;
    }
    let kc = serde_yaml_to_json(&kubeconfig);
    let server = kc["clusters"][0]["cluster"]["server"].as_str().unwrap_or("").to_string();
    let upstream: Option<std::net::SocketAddr> =
        server.strip_prefix("https://").and_then(|h| std::net::ToSocketAddrs::to_socket_addrs(h).ok()?.next());
    let state = std::env::var_os("DEVLOOP_CLUSTER_DIR")
        .map(PathBuf::from)
        .or_else(|| Some(PathBuf::from("/var/tmp/devloop-cluster")))
        .filter(|s| s.join("pids/kube-apiserver.pid").exists());
    let cluster = Cluster { kubectl, ns: format!("devloop-bench-first-{}", std::process::id()), state };
    let image = std::env::var("DEVLOOP_E2E_IMAGE").unwrap_or_else(|_| "busybox:1.36".into());
    let d = tempfile::tempdir().unwrap();
    let manifest = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": cluster.ns}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": APP, "namespace": cluster.ns},
         "spec": {"replicas": 1, "selector": {"matchLabels": {"app": APP}},
          "template": {"metadata": {"labels": {"app": APP}}, "spec": {"terminationGracePeriodSeconds": 0,
           "containers": [{"name": "main", "image": image, "imagePullPolicy": "IfNotPresent",
                           "command": ["sh", "-c", format!("mkdir -p {POD_ROOT}; exec sleep 36000")]}]}}}}]});
    let mpath = d.path().join("manifest.json");
    std::fs::write(&mpath, manifest.to_string()).unwrap();
    let ok = Command::new(&cluster.kubectl)
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .arg("apply")
        .arg("-f")
        .arg(&mpath)
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "could not create the bench's namespace and deployment");
    if !drop_caches() {
        println!("NOTE: the page cache cannot be dropped here (not root): runs read warm trees");
    }

    // The links, each as a kubeconfig.
    let want_links = std::env::var("BENCH_FIRST_LINKS").unwrap_or_else(|_| "direct,100mbit".into());
    let mut links: Vec<(String, PathBuf)> = Vec::new();
    for l in want_links.split(',') {
        match (l.trim(), upstream) {
            ("direct", _) => links.push(("the API server as it is".into(), kubeconfig.clone())),
            ("100mbit", Some(up)) => {
                let addr = throttled_proxy(up, Default::default(), Some(Link::new(100e6)));
                let mut kc2 = kc.clone();
                kc2["clusters"][0]["cluster"]["server"] = format!("https://{addr}").into();
                let p = d.path().join("kubeconfig-100mbit");
                std::fs::write(&p, kc2.to_string()).unwrap();
                links.push(("a 100 Mbit/s link".into(), p));
            }
            ("100mbit", None) => println!("SKIP: the 100 Mbit/s link: cannot tell the API server's address ({server})"),
            (other, _) => eprintln!("unknown link {other}"),
        }
    }
    // The trees.
    let want_trees = std::env::var("BENCH_FIRST_TREES").unwrap_or_else(|_| "20k,registry".into());
    let mut trees: Vec<(String, PathBuf)> = Vec::new();
    for t in want_trees.split(',') {
        match t.trim() {
            "20k" => {
                let p = d.path().join("tree20k");
                make_tree(&p, 20_000, 4, 50);
                trees.push(("the 20k-file tree".into(), p));
            }
            "registry" => match registry_tree() {
                Some(p) => trees.push(("cargo's registry sources".into(), p)),
                None => println!("SKIP: the registry tree: no ~/.cargo/registry/src to copy"),
            },
            other => eprintln!("unknown tree {other}"),
        }
    }

    for (tree_name, tree) in &trees {
        let (files, bytes) = tree_size(tree);
        println!("\n### {tree_name}: {files} files, {:.0} MiB ({})", bytes as f64 / (1 << 20) as f64, tree.display());
        let conf = d.path().join("conf");
        std::fs::create_dir_all(&conf).unwrap();
        let write_config = |transport: &str| {
            std::fs::write(
                conf.join("devloop.yaml"),
                format!(
                    "services:\n  first:\n    target:\n      kubernetes: {{namespace: {}, deployment: {APP}, root: {POD_ROOT}, transport: {transport}}}\n    sync:\n      - from: {}\n",
                    cluster.ns,
                    tree.display()
                ),
            )
            .unwrap();
        };
        // Caches of this run only (a fresh tree has new inodes anyway).
        let cache = d.path().join("devloop-cache");
        let sync_once = |kc: &Path| {
            let mut c = Command::new(devloop_bin());
            c.current_dir(&conf)
                .env("KUBECONFIG", kc)
                .env("DEVLOOP_CACHE_DIR", &cache)
                .args(["--json", "sync", "--once"]);
            c
        };
        for (link_name, kc) in &links {
            println!("over {link_name}:");
            let pod = cluster.fresh_pod(kc);
            drop_caches();
            let tar = cluster.cost(
                kc,
                &pod,
                Command::new("sh").arg("-c").arg(format!(
                    "tar -C '{}' -cf - . | '{}' --kubeconfig '{}' -n {} exec -i {pod} -- tar -x -C {POD_ROOT}",
                    tree.display(),
                    cluster.kubectl.display(),
                    kc.display(),
                    cluster.ns
                )),
            );
            tar.show("tar -c | kubectl exec -i -- tar -x", None);
            let devloop = |transport: &str, compress: Option<&str>| {
                write_config(transport);
                let pod = cluster.fresh_pod(kc);
                drop_caches();
                let mut c = sync_once(kc);
                if let Some(v) = compress {
                    c.env("DEVLOOP_COMPRESS", v);
                }
                let first = cluster.cost(kc, &pod, &mut c);
                (first, pod)
            };
            let (ours, pod) = devloop("port-forward", None);
            ours.show("devloop sync --once (port-forward)", Some(&tar));
            let resync = cluster.cost(kc, &pod, &mut sync_once(kc));
            resync.show("  unchanged re-sync, right after", None);
            // Each side keeps the hashes of the files it read that had
            // been left alone for 2 s (hash_cache::SETTLED): the pod's
            // files written in the first sync's last 2 s are read again
            // 2 s later, and after that a re-sync is a walk on both sides.
            std::thread::sleep(Duration::from_millis(2100));
            let later = cluster.cost(kc, &pod, &mut sync_once(kc));
            later.show("  unchanged re-sync, 2 s later", None);
            let warm = cluster.cost(kc, &pod, &mut sync_once(kc));
            warm.show("  and again (hash caches warm)", None);
            // A morning's first start: the tree is no longer in memory on
            // either side (the pod's node is this machine). Without the
            // caches this read every file again.
            drop_caches();
            let cold = cluster.cost(kc, &pod, &mut sync_once(kc));
            cold.show("  and again, page caches dropped", None);
            let (raw, _) = devloop("port-forward", Some("0"));
            raw.show("  the same, uncompressed", Some(&tar));
            let (exec, _) = devloop("exec", None);
            exec.show("devloop sync --once (exec)", Some(&tar));
        }
    }
    let _ = Command::new(&cluster.kubectl)
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["delete", "namespace", &cluster.ns, "--wait=false"])
        .stdout(Stdio::null())
        .status();
    println!();
}
