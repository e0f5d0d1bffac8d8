//! Intercept benchmarks, each figure beside its peers measured in the same
//! run. Run with `bench/run` (it builds the release binaries and the
//! forwarder, and installs socat).
//!
//! 1. (intercept) On loopback, with the local target: a client reaches a
//!    server on this machine directly, through socat (a plain TCP relay,
//!    `fork`), and through devloop's intercept (the forwarder, the agent,
//!    a stream on the agent's connection, devloop, the local port):
//!    - 1 GiB each way;
//!    - a 64-byte round trip, p50/p99, on an open connection and on a new
//!      connection each time (what devloop adds to each);
//!    - round trips per second with 1 and with 1000 keep-alive
//!      connections, and the errors at 1000.
//! 2. (intercept-kube, with KUBECONFIG) A server in a pod (busybox `nc`),
//!    reached from here through a plain port-forward (kube's, as `kubectl
//!    port-forward` does it) and through devloop's agent connection, which
//!    is itself a port-forward carrying streams (what an intercepted
//!    connection rides on): 256 MiB each way, 64-byte round trips.
//!
//! Options (env): BENCH_ONLY (comma list; this bench runs `intercept` and
//! `intercept-kube`), BENCH_RPS_SECS (default 5), BENCH_ROUNDS (throughput
//! runs per path, default 3; the median is shown), BENCH_MEASURE (up or
//! down: that throughput only, for profiling).

mod common;
use common::*;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const GIB: u64 = 1 << 30;
const MSG: usize = 64;

/// A listener on loopback with a deep accept queue (a thousand callers
/// may arrive at once).
fn listener() -> TcpListener {
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.set_reuseaddr(true).unwrap();
    s.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    s.listen(4096).unwrap()
}

fn serve<F, Fut>(l: TcpListener, each: F)
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let each = Arc::new(each);
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(each(s));
        }
    });
}

/// The three servers: a sink (reads to EOF, answers the count), a source
/// (reads a count, sends that many bytes), an echo of 64-byte messages.
struct Servers {
    sink: u16,
    source: u16,
    echo: u16,
}

fn servers() -> Servers {
    let (a, b, c) = (listener(), listener(), listener());
    let ports = Servers {
        sink: a.local_addr().unwrap().port(),
        source: b.local_addr().unwrap().port(),
        echo: c.local_addr().unwrap().port(),
    };
    serve(a, |mut s| async move {
        let mut buf = vec![0u8; 256 << 10];
        let mut n = 0u64;
        while let Ok(k) = s.read(&mut buf).await {
            if k == 0 {
                break;
            }
            n += k as u64;
        }
        let _ = s.write_all(&n.to_le_bytes()).await;
    });
    serve(b, |mut s| async move {
        let mut want = [0u8; 8];
        if s.read_exact(&mut want).await.is_err() {
            return;
        }
        let mut left = u64::from_le_bytes(want);
        let buf = vec![0x5au8; 256 << 10];
        while left > 0 {
            let k = left.min(buf.len() as u64) as usize;
            if s.write_all(&buf[..k]).await.is_err() {
                return;
            }
            left -= k as u64;
        }
        let _ = s.shutdown().await;
    });
    serve(c, |mut s| async move {
        let mut m = [0u8; MSG];
        while s.read_exact(&mut m).await.is_ok() {
            if s.write_all(&m).await.is_err() {
                return;
            }
        }
    });
    ports
}

/// Writes `n` bytes in 256 KiB pieces.
async fn send_bytes<W: AsyncWrite + Unpin>(w: &mut W, n: u64) {
    let buf = vec![0xa5u8; 256 << 10];
    let mut left = n;
    while left > 0 {
        let k = left.min(buf.len() as u64) as usize;
        w.write_all(&buf[..k]).await.unwrap();
        left -= k as u64;
    }
}

/// Sends `n` bytes, half-closes, waits for the sink's count.
async fn upload<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(mut r: R, mut w: W, n: u64) -> f64 {
    let t0 = Instant::now();
    send_bytes(&mut w, n).await;
    w.shutdown().await.unwrap();
    let mut got = [0u8; 8];
    r.read_exact(&mut got).await.unwrap();
    assert_eq!(u64::from_le_bytes(got), n, "the sink got every byte");
    t0.elapsed().as_secs_f64()
}

/// Asks the source for `n` bytes and reads them to its end.
async fn download<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(mut r: R, mut w: W, n: u64) -> f64 {
    let t0 = Instant::now();
    w.write_all(&n.to_le_bytes()).await.unwrap();
    let mut buf = vec![0u8; 256 << 10];
    let mut got = 0u64;
    loop {
        let k = r.read(&mut buf).await.unwrap();
        if k == 0 {
            break;
        }
        got += k as u64;
    }
    assert_eq!(got, n, "every byte arrived");
    t0.elapsed().as_secs_f64()
}

/// 64-byte round trips on one open connection, in ms.
async fn round_trips<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(mut r: R, mut w: W, n: usize) -> Vec<f64> {
    let m = [7u8; MSG];
    let mut back = [0u8; MSG];
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        w.write_all(&m).await.unwrap();
        r.read_exact(&mut back).await.unwrap();
        v.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    v
}

async fn tcp(port: u16) -> (tokio::net::tcp::OwnedReadHalf, tokio::net::tcp::OwnedWriteHalf) {
    let s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.set_nodelay(true).unwrap();
    s.into_split()
}

/// A new connection and one round trip, `n` times, in ms.
async fn connect_round_trips(port: u16, n: usize) -> Vec<f64> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        let (r, w) = tcp(port).await;
        round_trips(r, w, 1).await;
        v.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    v
}

/// Round trips per second over `conns` keep-alive connections for
/// `secs`; and the errors (a connection that failed, at any point).
async fn rps(port: u16, conns: usize, secs: f64) -> (f64, u64) {
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (done, errors) = (done.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let run = async {
                let s = TcpStream::connect(("127.0.0.1", port)).await?;
                s.set_nodelay(true)?;
                let (mut r, mut w) = s.into_split();
                let m = [9u8; MSG];
                let mut back = [0u8; MSG];
                while Instant::now() < deadline {
                    w.write_all(&m).await?;
                    r.read_exact(&mut back).await?;
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Ok::<(), std::io::Error>(())
            };
            match tokio::time::timeout(Duration::from_secs_f64(secs + 30.0), run).await {
                Ok(Ok(())) => {}
                _ => {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let t0 = Instant::now();
    for t in tasks {
        let _ = t.await;
    }
    (done.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64(), errors.load(Ordering::Relaxed))
}

/// A socat relay to `to`, as a plain TCP relay is run: a process per
/// connection (`fork`), a deep accept queue.
struct Socat {
    child: Child,
    port: u16,
}

impl Socat {
    fn start(to: u16) -> Socat {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new("socat")
            .arg(format!("TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr,backlog=4096"))
            .arg(format!("TCP:127.0.0.1:{to},nodelay"))
            .stderr(Stdio::null())
            .spawn()
            .expect("socat (bench/run installs it)");
        let t0 = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(t0.elapsed() < Duration::from_secs(10), "socat never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
        Socat { child, port }
    }
}

impl Drop for Socat {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `devloop intercept` on the local target, standing in for a Service on
/// three ports that go to the three servers.
struct Devloop {
    child: Child,
    dir: tempfile::TempDir,
    ports: [u16; 3],
}

impl Devloop {
    fn start(s: &Servers) -> Devloop {
        let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let ports = [free(), free(), free()];
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("src")).unwrap();
        std::fs::write(
            dir.path().join("devloop.yaml"),
            format!(
                "services:\n  bench:\n    target: {{local: {{root: out}}}}\n    sync:\n      - from: src\n    intercept: {{listen: \"127.0.0.1\", ports: [\"{}:{}\", \"{}:{}\", \"{}:{}\"]}}\n",
                ports[0], s.sink, ports[1], s.source, ports[2], s.echo
            ),
        )
        .unwrap();
        let mut child = Command::new(devloop_bin())
            .current_dir(dir.path())
            .env("DEVLOOP_AGENT_BIN", devloop_bin().with_file_name("devloop-agent"))
            .args(["--json", "intercept", "bench"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        let t0 = Instant::now();
        for line in std::io::BufRead::lines(out).map_while(Result::ok) {
            if line.contains("\"type\":\"intercept_on\"") {
                break;
            }
            assert!(!line.contains("\"type\":\"error\""), "devloop: {line}");
            assert!(t0.elapsed() < Duration::from_secs(60), "no intercept_on");
        }
        Devloop { child, dir, ports }
    }
}

impl Drop for Devloop {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
        let _ = Command::new(devloop_bin()).current_dir(self.dir.path()).arg("down").stdout(Stdio::null()).status();
    }
}

fn mibs(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / (1 << 20) as f64 / secs
}

fn bench_loopback(rt: &tokio::runtime::Runtime, rps_secs: f64) {
    println!("## 1. intercept on loopback (local target): direct, socat (a plain TCP relay), devloop");
    let s = rt.block_on(async { servers() });
    let socat = [Socat::start(s.sink), Socat::start(s.source), Socat::start(s.echo)];
    let dl = Devloop::start(&s);
    let paths: [(&str, [u16; 3]); 3] = [
        ("direct", [s.sink, s.source, s.echo]),
        ("socat", [socat[0].port, socat[1].port, socat[2].port]),
        ("devloop", dl.ports),
    ];
    let mut open = Vec::new();
    let mut fresh = Vec::new();
    let mut one = Vec::new();
    let mut many = Vec::new();
    // BENCH_MEASURE=down (say) runs one measure only, for profiling.
    let only = std::env::var("BENCH_MEASURE").ok();
    let want = |m: &str| only.as_deref().is_none_or(|o| o == m);
    // Throughput swings by ±15% between runs on 2 cores: the paths take
    // turns, round after round, and each figure is the median.
    let rounds: usize = std::env::var("BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let mut up_runs = vec![Vec::new(); paths.len()];
    let mut down_runs = vec![Vec::new(); paths.len()];
    for _ in 0..rounds {
        for (i, (_, p)) in paths.iter().enumerate() {
            let p = *p;
            if want("up") {
                up_runs[i].push(rt.block_on(async move {
                    let (r, w) = tcp(p[0]).await;
                    upload(r, w, GIB).await
                }));
            }
            if want("down") {
                down_runs[i].push(rt.block_on(async move {
                    let (r, w) = tcp(p[1]).await;
                    download(r, w, GIB).await
                }));
            }
        }
    }
    let median = |v: &mut Vec<f64>| if v.is_empty() { f64::NAN } else { percentile(v, 0.5) };
    let up: Vec<f64> = up_runs.iter_mut().map(median).collect();
    let down: Vec<f64> = down_runs.iter_mut().map(median).collect();
    for (_, p) in &paths {
        let (p, rt) = (*p, rt);
        if only.is_some() {
            continue;
        }
        open.push(rt.block_on(async move {
            let (r, w) = tcp(p[2]).await;
            round_trips(r, w, 100).await; // warm-up
            let (r, w) = tcp(p[2]).await;
            round_trips(r, w, 5000).await
        }));
        fresh.push(rt.block_on(connect_round_trips(p[2], 1000)));
        one.push(rt.block_on(rps(p[2], 1, rps_secs)));
        many.push(rt.block_on(rps(p[2], 1000, rps_secs * 2.0)));
    }
    let names: Vec<&str> = paths.iter().map(|p| p.0).collect();
    if only.is_some() {
        println!("up {up:?} s, down {down:?} s (direct, socat, devloop)");
        return;
    }
    let row = |label: &str, v: &[f64], unit: &str| {
        let cells: Vec<String> = names.iter().zip(v).map(|(n, x)| format!("{n} {x:.0} {unit}")).collect();
        println!("{label}: {} | devloop / socat = {:.2}x", cells.join(" | "), v[2] / v[1]);
    };
    row(
        &format!("1 GiB up (client → server), median of {rounds}"),
        &up.iter().map(|t| mibs(GIB, *t)).collect::<Vec<_>>(),
        "MiB/s",
    );
    row(
        &format!("1 GiB down (server → client), median of {rounds}"),
        &down.iter().map(|t| mibs(GIB, *t)).collect::<Vec<_>>(),
        "MiB/s",
    );
    for (label, data) in [
        ("64 B round trip, open connection (5000)", &mut open),
        ("new connection + 64 B round trip (1000)", &mut fresh),
    ] {
        let stats: Vec<(f64, f64)> = data.iter_mut().map(|v| (percentile(v, 0.5), percentile(v, 0.99))).collect();
        let cells: Vec<String> =
            names.iter().zip(&stats).map(|(n, (a, b))| format!("{n} p50 {a:.3} p99 {b:.3} ms")).collect();
        println!(
            "{label}: {} | devloop adds p50 {:+.3} ms, p99 {:+.3} ms to direct (socat adds p50 {:+.3} ms)",
            cells.join(" | "),
            stats[2].0 - stats[0].0,
            stats[2].1 - stats[0].1,
            stats[1].0 - stats[0].0
        );
    }
    for (label, data) in
        [("round trips/s, 1 keep-alive connection", &one), ("round trips/s, 1000 keep-alive connections", &many)]
    {
        let cells: Vec<String> =
            names.iter().zip(data.iter()).map(|(n, (r, e))| format!("{n} {r:.0}/s ({e} errors)")).collect();
        println!("{label}: {} | devloop / socat = {:.2}x", cells.join(" | "), data[2].0 / data[1].0);
    }
    println!();
}

fn bench_kube(rt: &tokio::runtime::Runtime) {
    println!("## 2. through the port-forward (cluster): a plain port-forward, and devloop's agent connection");
    if std::env::var_os("KUBECONFIG").is_none() {
        println!("SKIP: no cluster (KUBECONFIG unset; scripts/test-cluster up starts one)\n");
        return;
    }
    rt.block_on(async {
        use devloop::endpoint::kubernetes::{self, PodEndpoint};
        use k8s_openapi::api::apps::v1::Deployment;
        use k8s_openapi::api::core::v1::{Namespace, Pod};
        use kube::api::{Api, DeleteParams, PostParams};
        const N: u64 = 256 << 20;
        let client = kube::Client::try_default().await.unwrap();
        let ns = format!("devloop-bench-intercept-{}", std::process::id());
        let nss: Api<Namespace> = Api::all(client.clone());
        nss.create(&PostParams::default(), &serde_json::from_value(serde_json::json!({"metadata": {"name": ns}})).unwrap())
            .await
            .unwrap();
        let image = std::env::var("DEVLOOP_E2E_IMAGE").unwrap_or_else(|_| "busybox:1.36".into());
        // busybox nc: a sink (reads N bytes, answers the count, in text: a
        // port-forward cannot half-close, so the sink cannot wait for an
        // end), a source of N bytes, an echo.
        let script = format!(
            "mkdir -p /tmp/b && printf '#!/bin/sh\\nexec head -c {N} /dev/zero\\n' > /tmp/b/src && \
             printf '#!/bin/sh\\nhead -c {N} | wc -c\\n' > /tmp/b/sink && chmod +x /tmp/b/src /tmp/b/sink && \
             (nc -ll -p 9001 -e /tmp/b/sink &) && (nc -ll -p 9002 -e /tmp/b/src &) && (nc -ll -p 9003 -e cat &) && \
             exec sleep 3600"
        );
        let dep: Deployment = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "srv"},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "srv"}},
                "template": {"metadata": {"labels": {"app": "srv"}}, "spec": {"terminationGracePeriodSeconds": 1,
                    "containers": [{"name": "main", "image": image, "imagePullPolicy": "IfNotPresent",
                        "command": ["sh", "-c", script]}]}}}
        }))
        .unwrap();
        Api::<Deployment>::namespaced(client.clone(), &ns).create(&PostParams::default(), &dep).await.unwrap();
        let k: devloop::config::KubeTarget = devloop::config::KubeTarget {
            namespace: Some(ns.clone()),
            pods: devloop::config::PodSelector::Deployment("srv".into()),
            container: None,
            context: None,
            root: "/tmp/app".into(),
            transport: devloop::config::KubeTransport::PortForward,
            helper_image: devloop::config::DEFAULT_HELPER_IMAGE.into(),
        };
        let cluster = kubernetes::connect(&k).await.unwrap();
        let t0 = Instant::now();
        let pod = loop {
            if let Some(p) = kubernetes::ready_pods(&cluster, &k.pods).await.unwrap().into_iter().next() {
                break p;
            }
            assert!(t0.elapsed() < Duration::from_secs(120), "the bench pod never became ready");
            tokio::time::sleep(Duration::from_millis(300)).await;
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        // The plain forward: one port-forward per connection, as kubectl's.
        let plain = |port: u16| {
            let pods = pods.clone();
            let pod = pod.clone();
            async move {
                let mut pf = pods.portforward(&pod, &[port]).await.unwrap();
                let s = pf.take_stream(port).unwrap();
                tokio::spawn(async move {
                    let _ = pf.join().await;
                });
                tokio::io::split(s)
            }
        };
        // devloop's: streams on its one agent connection.
        let agent = Arc::new(kubernetes::agent_image().expect("the static agent (scripts/build-agent)"));
        let ep = devloop::endpoint::Endpoint::Pod(Arc::new(PodEndpoint::new(cluster.clone(), &pod, &k, agent)));
        let (tx, _erx) = tokio::sync::mpsc::unbounded_channel();
        let rep = devloop::events::Reporter::new("bench", tx);
        let (ctx, mut crx) = tokio::sync::watch::channel(devloop::supervisor::Conn::Connecting);
        let cancel = tokio_util::sync::CancellationToken::new();
        tokio::spawn(devloop::supervisor::supervise(ep, devloop::session::Mode::Watch, rep, cancel.clone(), ctx));
        let agent_client = loop {
            if let devloop::supervisor::Conn::Up(c) = &*crx.borrow_and_update() {
                break c.clone();
            }
            crx.changed().await.unwrap();
        };
        let dial = |port: u16| {
            let c = agent_client.clone();
            async move { c.dial("127.0.0.1", port).unwrap().into_split() }
        };
        // The sink answers in text (`wc -c`) once it has N bytes.
        async fn up_text<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(mut r: R, mut w: W, n: u64) -> f64 {
            let t0 = Instant::now();
            send_bytes(&mut w, n).await;
            w.flush().await.unwrap();
            let mut got = String::new();
            r.read_to_string(&mut got).await.unwrap();
            drop(w);
            assert_eq!(got.trim().parse::<u64>().ok(), Some(n), "the sink got every byte: {got:?}");
            t0.elapsed().as_secs_f64()
        }
        async fn down_all<R: AsyncRead + Unpin>(mut r: R, n: u64) -> f64 {
            let t0 = Instant::now();
            let mut buf = vec![0u8; 256 << 10];
            let mut got = 0u64;
            loop {
                let k = r.read(&mut buf).await.unwrap();
                if k == 0 {
                    break;
                }
                got += k as u64;
            }
            assert_eq!(got, n);
            t0.elapsed().as_secs_f64()
        }
        let (r, w) = plain(9001).await;
        let p_up = up_text(r, w, N).await;
        let (r, _w) = plain(9002).await;
        let p_down = down_all(r, N).await;
        let (r, w) = plain(9003).await;
        let mut p_rt = round_trips(r, w, 300).await;
        let (r, w) = dial(9001).await;
        let d_up = up_text(r, w, N).await;
        let (r, _w) = dial(9002).await;
        let d_down = down_all(r, N).await;
        let (r, w) = dial(9003).await;
        let mut d_rt = round_trips(r, w, 300).await;
        cancel.cancel();
        let (pu, du) = (mibs(N, p_up), mibs(N, d_up));
        let (pd, dd) = (mibs(N, p_down), mibs(N, d_down));
        println!("256 MiB up: plain port-forward {pu:.0} MiB/s | devloop {du:.0} MiB/s | devloop / plain = {:.2}x", du / pu);
        println!("256 MiB down: plain port-forward {pd:.0} MiB/s | devloop {dd:.0} MiB/s | devloop / plain = {:.2}x", dd / pd);
        let (p50, p99) = (percentile(&mut p_rt, 0.5), percentile(&mut p_rt, 0.99));
        let (d50, d99) = (percentile(&mut d_rt, 0.5), percentile(&mut d_rt, 0.99));
        println!(
            "64 B round trip (300): plain port-forward p50 {p50:.3} p99 {p99:.3} ms | devloop p50 {d50:.3} p99 {d99:.3} ms | devloop / plain p50 = {:.2}x\n",
            d50 / p50
        );
        let _ = nss.delete(&ns, &DeleteParams::default()).await;
    });
}

fn main() {
    let only = std::env::var("BENCH_ONLY").unwrap_or_else(|_| "intercept,intercept-kube".into());
    let rps_secs: f64 = std::env::var("BENCH_RPS_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(5.0);
    let parts: Vec<&str> = only.split(',').map(str::trim).collect();
    if !parts.iter().any(|p| p.starts_with("intercept")) {
        return;
    }
    devloop_agent::mux::raise_open_files_limit();
    println!(
        "# devloop intercept benchmarks ({} cores)\n",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    if parts.contains(&"intercept") {
        bench_loopback(&rt, rps_secs);
    }
    if parts.contains(&"intercept-kube") {
        bench_kube(&rt);
    }
}
