//! The intercept on the local target, with the real binaries: the
//! forwarder stands where the Service's traffic arrives (`listen`), the
//! agent holds the intercept, devloop carries each connection to the
//! developer's port; without devloop, the forwarder hands connections to
//! the fallback app, as the sidecar does in a pod.

mod util;

use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};
use util::servers;
use util::*;

const T: Duration = Duration::from_secs(30);

/// A project whose service intercepts `svc` (on 127.0.0.1) to `dev`,
/// with `app` as the fallback; `extra` adds keys to `intercept:`.
fn project(svc: u16, dev: u16, app: Option<u16>, extra: &str) -> Project {
    let fallback = app.map(|a| format!(", fallback: \"127.0.0.1:{a}\"")).unwrap_or_default();
    Project::with_yaml(&format!(
        "services:\n  web:\n    target: {{local: {{root: out}}}}\n    sync:\n      - from: src\n    intercept: {{listen: \"127.0.0.1:{svc}\", ports: [\"{svc}:{dev}\"]{fallback}{extra}}}\n"
    ))
}

/// Stops what devloop left running (the forwarder), whatever the test did.
struct Down<'a>(&'a Project);

impl Drop for Down<'_> {
    fn drop(&mut self) {
        let _ = self.0.cmd(&["down"]).output();
    }
}

fn watch(p: &Project) -> Watching {
    let mut w = p.watch();
    w.wait_first("intercept_on", T);
    w
}

fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Sends `data`, half-closes, and reads everything back.
fn round_trip(port: u16, data: &[u8]) -> Vec<u8> {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let mut w = s.try_clone().unwrap();
    let data = data.to_vec();
    let writer = std::thread::spawn(move || {
        w.write_all(&data).unwrap();
        w.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut got = Vec::new();
    let mut r = s;
    r.read_to_end(&mut got).unwrap();
    writer.join().unwrap();
    got
}

#[test]
fn round_trips_are_byte_exact_small_and_100_mb_both_ways() {
    let (dev, _) = servers::echo();
    let svc = servers::free_port();
    let p = project(svc, dev, None, "");
    let _down = Down(&p);
    let mut w = watch(&p);
    for (i, len) in [0usize, 1, 1000, 100 << 20].into_iter().enumerate() {
        let data = payload(i as u64, len);
        let got = round_trip(svc, &data);
        assert!(got == data, "{len} bytes: {} came back, or different", got.len());
    }
    // The connections were the developer's, and each is an event.
    let closed = w.wait_for("the 100 MB connection closed", T, |e| {
        e["type"] == "intercept_closed" && e["bytes_in"].as_u64() == Some(100 << 20)
    });
    assert_eq!(closed["bytes_out"].as_u64(), Some(100 << 20));
}

#[test]
fn a_thousand_concurrent_connections_all_arrive_whole() {
    let (dev, seen) = servers::echo();
    let svc = servers::free_port();
    let p = project(svc, dev, None, "");
    let _down = Down(&p);
    let _w = watch(&p);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let failures = rt.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tasks = Vec::new();
        for i in 0..1000u64 {
            tasks.push(tokio::spawn(async move {
                let data = payload(i, 1000 + (i as usize * 37) % 20_000);
                let s = tokio::net::TcpStream::connect(("127.0.0.1", svc)).await.map_err(|e| e.to_string())?;
                let (mut r, mut w) = s.into_split();
                let sent = data.clone();
                let writer = tokio::spawn(async move {
                    w.write_all(&sent).await?;
                    w.shutdown().await
                });
                let mut got = Vec::new();
                r.read_to_end(&mut got).await.map_err(|e| e.to_string())?;
                writer.await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
                if got != data {
                    return Err(format!("connection {i}: {} bytes back of {}", got.len(), data.len()));
                }
                Ok::<(), String>(())
            }));
        }
        let mut failures = Vec::new();
        for t in tasks {
            match tokio::time::timeout(T, t).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => failures.push(e),
                other => failures.push(format!("{other:?}")),
            }
        }
        failures
    });
    assert!(failures.is_empty(), "{} of 1000 failed: {:?}", failures.len(), &failures[..failures.len().min(5)]);
    assert_eq!(seen.connections.load(std::sync::atomic::Ordering::Relaxed), 1000, "each reached the developer");
}

/// A caller that stops reading stalls only its own connection: another
/// moves 64 MiB meanwhile, and file edits keep landing.
#[test]
fn a_slow_reader_slows_only_its_own_connection() {
    let (dev, _) = servers::echo();
    let svc = servers::free_port();
    let p = project(svc, dev, None, "");
    let _down = Down(&p);
    let mut w = watch(&p);
    // The stalled caller: writes, and never reads the echo.
    let stalled = TcpStream::connect(("127.0.0.1", svc)).unwrap();
    let mut sw = stalled.try_clone().unwrap();
    let written = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let count = written.clone();
    std::thread::spawn(move || {
        let chunk = vec![7u8; 64 << 10];
        while sw.write_all(&chunk).is_ok() {
            count.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
    });
    // Until it stalls (every buffer on the way full).
    let t0 = Instant::now();
    let mut last = u64::MAX;
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = written.load(std::sync::atomic::Ordering::Relaxed);
        if now == last {
            break;
        }
        last = now;
        assert!(t0.elapsed() < T, "the stalled connection never stalled");
    }
    let fast = std::thread::spawn(move || round_trip(svc, &payload(9, 64 << 20)));
    for i in 0..10 {
        p.write("edit.txt", format!("edit {i}").as_bytes());
        wait_converged(&p, Some(&mut w), T);
    }
    let got = fast.join().unwrap();
    assert!(got == payload(9, 64 << 20), "the fast connection's 64 MiB came back whole");
    assert_eq!(written.load(std::sync::atomic::Ordering::Relaxed), last, "the stalled one stayed stalled");
    drop(stalled);
}

/// devloop killed (SIGKILL) while a request is in flight: that request's
/// connection ends, and new connections reach the app, at once (the
/// agent goes with devloop, and the forwarder hands new calls to the app).
#[test]
fn a_killed_devloop_hands_new_connections_to_the_app() {
    let (dev, seen) = servers::silent();
    let (app, _) = servers::http("app");
    let svc = servers::free_port();
    let p = project(svc, dev, Some(app), ", lease_ms: 1000");
    let _down = Down(&p);
    let mut w = watch(&p);
    let mut inflight = TcpStream::connect(("127.0.0.1", svc)).unwrap();
    inflight.set_read_timeout(Some(T)).unwrap();
    inflight.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    // The request reached the developer's process, which holds it.
    let t0 = Instant::now();
    while seen.requests.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        assert!(t0.elapsed() < T, "the request never reached the developer's process\n{}", w.dump());
        std::thread::sleep(Duration::from_millis(10));
    }
    w.child.kill().unwrap();
    let killed = Instant::now();
    let _ = w.child.wait();
    // The request in flight ends, never hangs: its caller reads why.
    let mut rest = Vec::new();
    let _ = inflight.read_to_end(&mut rest);
    let rest = String::from_utf8_lossy(&rest);
    assert!(
        rest.starts_with("HTTP/1.1 502 ") && rest.contains("intercepted for a developer"),
        "the request in flight should end in a 502 that says why: {rest:?}"
    );
    let (status, body) = servers::get(svc, "/after", "")
        .unwrap_or_else(|e| panic!("a new connection should be answered by the app: {e}\n{}", w.dump()));
    assert_eq!((status, body.as_str()), (200, "app GET /after len=0 sum=0"));
    println!("the app answered {} ms after devloop was killed", killed.elapsed().as_millis());
    assert!(killed.elapsed() < Duration::from_millis(1000 + 2000), "within the lease");
}

/// devloop frozen (a laptop's lid closed: SIGSTOP): the agent hears
/// nothing within the lease, releases the intercept, and new connections
/// reach the app; devloop woken, the intercept resumes.
#[test]
fn a_frozen_devloop_loses_the_intercept_within_its_lease_and_gets_it_back() {
    let (dev, _) = servers::http("dev");
    let (app, _) = servers::http("app");
    let svc = servers::free_port();
    let p = project(svc, dev, Some(app), ", lease_ms: 1000");
    let _down = Down(&p);
    let mut w = watch(&p);
    assert_eq!(servers::get(svc, "/a", "").unwrap().1, "dev GET /a len=0 sum=0");
    let pid = w.child.id() as i32;
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let frozen = Instant::now();
    let mut answered_by_app = None;
    while frozen.elapsed() < Duration::from_secs(10) {
        if servers::get(svc, "/b", "").is_ok_and(|(_, b)| b.starts_with("app ")) {
            answered_by_app = Some(frozen.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let after = answered_by_app.expect("the app never answered while devloop was frozen");
    println!("the app answered {} ms after devloop froze (lease 1000 ms)", after.as_millis());
    assert!(after >= Duration::from_millis(900), "not before the lease ran out: {after:?}");
    // Woken: it reconnects and takes the intercept again.
    w.wait_event("intercept_on", T);
    let t0 = Instant::now();
    loop {
        if servers::get(svc, "/c", "").is_ok_and(|(_, b)| b.starts_with("dev ")) {
            break;
        }
        assert!(t0.elapsed() < T, "the intercept never resumed\n{}", w.dump());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Nothing listens on the local port: an HTTP caller gets a 502 naming
/// devloop and the reason, a raw caller a closed connection, at once; each
/// refusal is an event.
#[test]
fn a_closed_local_port_answers_at_once_and_is_reported() {
    let dev = servers::free_port();
    let svc = servers::free_port();
    let p = project(svc, dev, None, "");
    let _down = Down(&p);
    let mut w = watch(&p);
    let t0 = Instant::now();
    let (status, body) = servers::get(svc, "/x", "").unwrap();
    assert_eq!(status, 502);
    assert!(body.contains("devloop") && body.contains(&format!("localhost:{dev}")), "{body}");
    let mut raw = TcpStream::connect(("127.0.0.1", svc)).unwrap();
    raw.set_read_timeout(Some(T)).unwrap();
    raw.write_all(b"\x00\x01binary protocol").unwrap();
    let mut got = Vec::new();
    let _ = raw.read_to_end(&mut got);
    assert!(got.is_empty(), "{got:?}");
    assert!(t0.elapsed() < Duration::from_secs(5), "answered at once: {:?}", t0.elapsed());
    w.wait_event("intercept_refused", T);
    w.wait_event("intercept_refused", T);
}

/// A personal intercept: on one keep-alive connection, requests with the
/// header go to the developer and the others to the app, in order, with
/// chunked bodies and pipelining; an Upgrade switches to a raw
/// connection; what is not HTTP/1.1 goes to the app whole.
#[test]
fn a_personal_intercept_routes_each_request_by_its_header() {
    let (dev, _) = servers::http("dev");
    let (app, _) = servers::http("app");
    let svc = servers::free_port();
    let p = project(svc, dev, Some(app), ", header: {x-dev: alice}");
    let _down = Down(&p);
    let _w = watch(&p);
    let s = TcpStream::connect(("127.0.0.1", svc)).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let mut tx = s.try_clone().unwrap();
    let mut rx = BufReader::new(s);
    let mut ask = |req: &str| {
        tx.write_all(req.as_bytes()).unwrap();
        servers::read_response(&mut rx).unwrap()
    };
    assert_eq!(ask("GET /1 HTTP/1.1\r\nHost: x\r\n\r\n").1, "app GET /1 len=0 sum=0");
    assert_eq!(ask("GET /2 HTTP/1.1\r\nHost: x\r\nX-Dev: alice\r\n\r\n").1, "dev GET /2 len=0 sum=0");
    assert_eq!(
        ask(
            "POST /3 HTTP/1.1\r\nx-dev: alice\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n3\r\nabc\r\n0\r\n\r\n"
        )
        .1,
        format!("dev POST /3 len=8 sum={}", b"helloabc".iter().map(|b| *b as u64).sum::<u64>())
    );
    assert_eq!(ask("GET /4 HTTP/1.1\r\nX-Dev: bob\r\n\r\n").1, "app GET /4 len=0 sum=0", "another value is not ours");
    assert_eq!(ask("POST /5 HTTP/1.1\r\nContent-Length: 3\r\n\r\nxyz").1, "app POST /5 len=3 sum=363");
    // Pipelined: both sent at once, answered in order.
    tx.write_all(b"GET /6 HTTP/1.1\r\nx-dev: alice\r\n\r\nGET /7 HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!(servers::read_response(&mut rx).unwrap().1, "dev GET /6 len=0 sum=0");
    assert_eq!(servers::read_response(&mut rx).unwrap().1, "app GET /7 len=0 sum=0");
    // An Upgrade the developer accepts: raw both ways from then on.
    tx.write_all(b"GET /ws HTTP/1.1\r\nx-dev: alice\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n").unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut rx, &mut line).unwrap();
    assert!(line.starts_with("HTTP/1.1 101"), "{line}");
    loop {
        let mut h = String::new();
        std::io::BufRead::read_line(&mut rx, &mut h).unwrap();
        if h == "\r\n" {
            break;
        }
    }
    tx.write_all(b"raw bytes after the switch").unwrap();
    let mut echoed = [0u8; 26];
    rx.read_exact(&mut echoed).unwrap();
    assert_eq!(&echoed, b"raw bytes after the switch");
    // Not HTTP/1.1: the app's port gets the bytes, untouched. (The test's
    // app speaks HTTP only, so it closes; an HTTP/1.0 request shows the
    // connection reached it whole.)
    let (status, body) = {
        let mut s = TcpStream::connect(("127.0.0.1", svc)).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        s.write_all(b"GET /old HTTP/1.0\r\nx-dev: alice\r\n\r\n").unwrap();
        servers::read_response(&mut BufReader::new(s)).unwrap()
    };
    assert_eq!((status, body.as_str()), (200, "app GET /old len=0 sum=0"), "HTTP/1.0 is the app's, header or not");
    let mut tls = TcpStream::connect(("127.0.0.1", svc)).unwrap();
    tls.set_read_timeout(Some(T)).unwrap();
    tls.write_all(b"\x16\x03\x01\x00\x05hello").unwrap();
    let mut got = Vec::new();
    let _ = tls.read_to_end(&mut got);
    assert!(got.is_empty(), "garbage gets no answer from devloop itself: {got:?}");
}

/// `devloop run`: the command gets the target's environment, and a
/// Service it names (`ECHO_SERVICE_HOST`/`PORT`, here a loopback echo
/// server standing for a cluster Service) is reached at a local address
/// devloop listens on, through the agent. The command's exit code is
/// devloop's.
#[test]
fn run_reaches_the_targets_services_through_the_agent() {
    let (echo, seen) = servers::echo();
    let p = Project::new();
    let env = |c: &mut std::process::Command| {
        // The local target's agent is devloop's child: it has this
        // environment, as a container has its own.
        c.env("ECHO_SERVICE_HOST", "127.0.0.1")
            .env("ECHO_SERVICE_PORT", echo.to_string())
            .env("ECHO_PORT", format!("tcp://127.0.0.1:{echo}"))
            .env("FROM_THE_TARGET", "yes");
    };
    let script = "echo \"addr=$ECHO_SERVICE_HOST:$ECHO_SERVICE_PORT link=$ECHO_PORT target=$FROM_THE_TARGET\"; \
                  exec 3<>/dev/tcp/$ECHO_SERVICE_HOST/$ECHO_SERVICE_PORT; printf through-the-agent >&3; \
                  echo \"got=$(head -c 17 <&3)\"; exit 7";
    let mut c = p.cmd(&["run", "svc", "--", "bash", "-c", script]);
    env(&mut c);
    let out = c.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "the command's exit code\n{stdout}\n{stderr}");
    let addr = stdout.lines().find_map(|l| l.strip_prefix("addr=")).unwrap_or_else(|| panic!("{stdout}\n{stderr}"));
    let (addr, rest) = addr.split_once(' ').unwrap();
    let local: u16 = addr.strip_prefix("127.0.0.1:").unwrap().parse().unwrap();
    assert_ne!(local, echo, "the command gets devloop's local address, not the original one");
    assert!(rest.contains(&format!("link=tcp://127.0.0.1:{local}")), "docker-link variables too: {rest}");
    assert!(rest.contains("target=yes"), "{rest}");
    assert!(stdout.contains("got=through-the-agent"), "{stdout}\n{stderr}");
    assert_eq!(seen.connections.load(std::sync::atomic::Ordering::Relaxed), 1, "the Service saw the connection");
    assert!(
        stderr.contains(&format!("127.0.0.1:{echo} → 127.0.0.1:{local}")),
        "devloop says what it tunnels: {stderr}"
    );

    // `devloop env`: the target's environment, without devloop's token.
    let mut c = p.cmd(&["env", "svc", "--format", "json"]);
    env(&mut c);
    let out = c.output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let vars: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(vars["ECHO_SERVICE_PORT"], echo.to_string());
    assert_eq!(vars["FROM_THE_TARGET"], "yes");
    assert!(vars.get("DEVLOOP_AGENT_TOKEN").is_none(), "the session token stays secret");

    // A command that cannot start says so.
    let out = p.cmd(&["run", "svc", "--", "/nonexistent/cmd"]).output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot start `/nonexistent/cmd`") && stderr.contains("hint:"), "{stderr}");
}

/// `devloop trigger web intercept off` (the dashboard's `i`): the app
/// answers while devloop keeps running; `on` takes the calls back, on
/// the same agent connection.
#[test]
fn the_intercept_is_let_go_and_taken_back_on_request() {
    let (dev, _) = servers::http("dev");
    let (app, _) = servers::http("app");
    let svc = servers::free_port();
    let p = project(svc, dev, Some(app), "");
    let _down = Down(&p);
    let mut w = watch(&p);
    let answer =
        |path: &str| servers::get(svc, path, "").map(|(_, body)| body).unwrap_or_else(|e| format!("error: {e}"));
    assert!(answer("/1").starts_with("dev GET /1"), "intercepted at first");
    let trigger = |on: &str| {
        let out = output_within(p.cmd(&["trigger", "web", "intercept", on]), T);
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "intercept {on}: {text}");
    };
    trigger("off");
    w.wait_first("intercept_off", T);
    assert!(answer("/2").starts_with("app GET /2"), "let go: the app answers\n{}", w.dump());
    trigger("on");
    w.wait_for("the intercept taken again", T, |v| v["type"] == "intercept_on");
    assert_eq!(w.count("intercept_on"), 2, "{}", w.dump());
    assert!(answer("/3").starts_with("dev GET /3"), "taken back: the developer's process answers\n{}", w.dump());
    // Still the first agent: no reconnect happened on the way.
    assert_eq!(w.count("agent_connected"), 1, "{}", w.dump());
    assert_eq!(w.interrupt(), 0);
}
