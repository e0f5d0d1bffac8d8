//! Helpers the bench binaries share (each `mod common;`s it and uses a
//! part of it).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The devloop binary under test: this build's, or `DEVLOOP_BENCH_BIN`'s
/// (another build, for an A/B in one sitting; its devloop-agent beside it).
pub fn devloop_bin() -> PathBuf {
    match std::env::var_os("DEVLOOP_BENCH_BIN") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_BIN_EXE_devloop")),
    }
}

pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// The bench's repo-like tree: `files` source files (a few KiB each, some
/// up to 64 KiB, text that compresses like code) and `big` random
/// binaries of `big_mb` MiB (which do not compress). Returns its bytes.
pub fn make_tree(root: &Path, files: usize, big: usize, big_mb: usize) -> u64 {
    let mut total = 0u64;
    let mut seed = 0x2545f4914f6cdd1du64;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for i in 0..files {
        let dir = root.join(format!("pkg{:03}/mod{:02}", i % 300, (i / 300) % 20));
        std::fs::create_dir_all(&dir).unwrap();
        // Sizes like source code: mostly a few KiB, some up to 64 KiB.
        let size = match rnd() % 10 {
            0 => 16_384 + (rnd() % 49_152) as usize,
            _ => 256 + (rnd() % 8_000) as usize,
        };
        let line = format!("// file {i}: some source text that compresses like code\n");
        let content: Vec<u8> = line.bytes().cycle().take(size).collect();
        total += size as u64;
        std::fs::write(dir.join(format!("f{i}.rs")), content).unwrap();
    }
    std::fs::create_dir_all(root.join("assets")).unwrap();
    for b in 0..big {
        let mut data = vec![0u8; big_mb << 20];
        for chunk in data.chunks_mut(8) {
            chunk.copy_from_slice(&rnd().to_le_bytes()[..chunk.len()]);
        }
        total += data.len() as u64;
        std::fs::write(root.join(format!("assets/blob{b}.bin")), data).unwrap();
    }
    total
}

pub fn time_cmd(c: &mut Command) -> f64 {
    let t0 = Instant::now();
    let s = c.status().unwrap();
    assert!(s.success(), "{c:?} failed");
    t0.elapsed().as_secs_f64()
}

/// Counts what crosses a TCP proxy between devloop and the API server.
#[derive(Default)]
pub struct Traffic {
    pub connections: std::sync::atomic::AtomicU64,
    pub up: std::sync::atomic::AtomicU64,
    pub down: std::sync::atomic::AtomicU64,
}

/// A loopback TCP proxy to `upstream`; returns its address.
pub fn proxy(upstream: std::net::SocketAddr, t: std::sync::Arc<Traffic>) -> std::net::SocketAddr {
    throttled_proxy(upstream, t, None)
}

/// A link of `bits_per_s` in each direction, shared by every connection
/// through it: a chunk leaves when the link has carried the ones before it.
pub struct Link {
    bytes_per_s: f64,
    free_at: [std::sync::Mutex<Instant>; 2],
}

impl Link {
    pub fn new(bits_per_s: f64) -> std::sync::Arc<Link> {
        let now = Instant::now();
        std::sync::Arc::new(Link {
            bytes_per_s: bits_per_s / 8.0,
            free_at: [std::sync::Mutex::new(now), std::sync::Mutex::new(now)],
        })
    }

    /// Waits until `n` bytes have crossed in direction `up` (or down).
    fn carry(&self, up: bool, n: usize) {
        let done = {
            let mut free = self.free_at[up as usize].lock().unwrap();
            let start = (*free).max(Instant::now());
            *free = start + Duration::from_secs_f64(n as f64 / self.bytes_per_s);
            *free
        };
        let now = Instant::now();
        if done > now {
            std::thread::sleep(done - now);
        }
    }
}

/// [`proxy`], over `link` when given (TLS passes through untouched).
pub fn throttled_proxy(
    upstream: std::net::SocketAddr,
    t: std::sync::Arc<Traffic>,
    link: Option<std::sync::Arc<Link>>,
) -> std::net::SocketAddr {
    use std::sync::atomic::Ordering::Relaxed;
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            t.connections.fetch_add(1, Relaxed);
            let Ok(s) = std::net::TcpStream::connect(upstream) else { continue };
            // As a router or a VPN relays: each read goes on at once (with
            // Nagle's algorithm a small write waits for the last one's ACK,
            // up to 40 ms per round trip, which no link adds).
            let _ = (c.set_nodelay(true), s.set_nodelay(true));
            for (mut a, mut b, up) in [(c.try_clone().unwrap(), s.try_clone().unwrap(), true), (s, c, false)] {
                let (t, link) = (t.clone(), link.clone());
                std::thread::spawn(move || {
                    // Small reads on a throttled link, so that its pace is
                    // even, as a real link's is.
                    let mut buf = vec![0u8; if link.is_some() { 16 << 10 } else { 64 << 10 }];
                    while let Ok(n) = std::io::Read::read(&mut a, &mut buf) {
                        if n == 0 {
                            break;
                        }
                        if let Some(l) = &link {
                            l.carry(up, n);
                        }
                        if std::io::Write::write_all(&mut b, &buf[..n]).is_err() {
                            break;
                        }
                        (if up { &t.up } else { &t.down }).fetch_add(n as u64, Relaxed);
                    }
                    let _ = b.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
    addr
}

pub fn kubectl_like(args: &[&str], kubeconfig: &Path) -> serde_json::Value {
    // The bench drives the cluster through a tiny API helper: curl with the
    // kubeconfig's client certificate (the project's own test cluster).
    let kc: serde_json::Value = serde_yaml_to_json(kubeconfig);
    let user = &kc["users"][0]["user"];
    let server = kc["clusters"][0]["cluster"]["server"].as_str().unwrap().to_string();
    let mut c = Command::new("curl");
    c.args(["-sf", "--cacert", kc["clusters"][0]["cluster"]["certificate-authority"].as_str().unwrap_or("")]).args([
        "--cert",
        user["client-certificate"].as_str().unwrap_or(""),
        "--key",
        user["client-key"].as_str().unwrap_or(""),
    ]);
    let (method, path, body) = (args[0], args[1], args.get(2));
    let kind = if method == "PATCH" { "merge-patch+json" } else { "json" };
    c.args(["-H", &format!("Content-Type: application/{kind}")]);
    c.args(["-X", method, &format!("{server}{path}")]);
    if let Some(b) = body {
        c.args(["-d", b]);
    }
    let out = c.output().unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

pub fn serde_yaml_to_json(p: &Path) -> serde_json::Value {
    serde_yaml::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// CPU time (user + system) of a process so far, in clock ticks.
pub fn proc_cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = s.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 (1-based) of the whole line.
    f.get(11).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0)
}
