//! devloop-forward: the intercept's forwarder.
//!
//! It listens where the intercepted traffic arrives (the port the Service
//! now points at) and hands each connection on: to devloop's agent, on
//! its claim port on loopback, while the agent holds the intercept (it
//! listens there only while a devloop is connected to it, within the
//! lease); else to the app's own port. So when devloop goes away, by any
//! means, new connections reach the app at once, and a pod started while
//! devloop is away (it has the forwarder from its template) serves the app
//! as before.
//!
//! Nothing but std, so it is small enough to travel into pods in a
//! ConfigMap, and runs in the app's own image (static, no shell needed).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

const USAGE: &str = "\
usage: devloop-forward LISTEN=APP[+CLAIM]...

For each route, listens on LISTEN (ip:port) and hands each connection to
CLAIM (devloop's agent, on loopback) when something listens there, else to
APP (the app's own port; `-` for none: the connection is closed). Example:
  devloop-forward 0.0.0.0:40080=127.0.0.1:8080+127.0.0.1:40081";

/// How long a connection to the agent's claim port may take. It is on
/// loopback, where a port nobody listens on refuses at once; a connection
/// that waits has found a live agent's accept queue full, and it is that
/// agent's to take.
const CLAIM_TIMEOUT: Duration = Duration::from_secs(5);
/// The accept queue's depth: callers arrive in bursts, and a SYN that
/// finds the queue full is retried only a second later.
const BACKLOG: i32 = 4096;
/// How long a connection to the app may take.
const APP_TIMEOUT: Duration = Duration::from_secs(5);
/// Each connection's two copying threads need little stack.
const STACK: usize = 64 << 10;

#[derive(Debug, Clone, Copy)]
struct Route {
    listen: SocketAddr,
    app: Option<SocketAddr>,
    claim: Option<SocketAddr>,
}

fn parse(arg: &str) -> Result<Route, String> {
    let (listen, rest) = arg.split_once('=').ok_or_else(|| format!("`{arg}`: expected LISTEN=APP[+CLAIM]"))?;
    let (app, claim) = match rest.split_once('+') {
        Some((a, c)) => (a, Some(c)),
        None => (rest, None),
    };
    let addr = |s: &str| s.parse::<SocketAddr>().map_err(|_| format!("`{s}` is not an ip:port"));
    let app = if app == "-" { None } else { Some(addr(app)?) };
    Ok(Route { listen: addr(listen)?, app, claim: claim.map(addr).transpose()? })
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() || args.iter().any(|a| a == "-h" || a == "--help") {
        eprintln!("{USAGE}");
        std::process::exit(if args.is_empty() { 2 } else { 0 });
    }
    let routes: Vec<Route> = match args.iter().map(|a| parse(a)).collect() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("devloop-forward: {e}\n\n{USAGE}");
            std::process::exit(2);
        }
    };
    let mut listeners = Vec::new();
    for r in &routes {
        match TcpListener::bind(r.listen) {
            Ok(l) => {
                deepen(&l);
                listeners.push((l, *r))
            }
            Err(e) => {
                eprintln!("devloop-forward: cannot listen on {}: {e}", r.listen);
                std::process::exit(1);
            }
        }
    }
    for (l, r) in &listeners {
        let claim =
            r.claim.map(|c| format!(", to devloop's agent at {c} while it holds the intercept")).unwrap_or_default();
        let app = r.app.map_or("no app".to_string(), |a| a.to_string());
        println!("devloop-forward listening on {} for {app}{claim}", l.local_addr().map_or(r.listen, |a| a));
    }
    let _ = std::io::stdout().flush();
    let mut threads = Vec::new();
    for (l, r) in listeners {
        threads.push(std::thread::spawn(move || serve(l, r)));
    }
    for t in threads {
        let _ = t.join();
    }
}

/// std listens with a backlog of 128 and has no setting: listening again
/// on the same socket only changes the queue's depth.
#[cfg(unix)]
fn deepen(l: &TcpListener) {
    extern "C" {
        fn listen(fd: i32, backlog: i32) -> i32;
    }
    // SAFETY: the descriptor is a bound, listening socket this process owns.
    unsafe {
        listen(std::os::fd::AsRawFd::as_raw_fd(l), BACKLOG);
    }
}

#[cfg(not(unix))]
fn deepen(_: &TcpListener) {}

fn serve(l: TcpListener, r: Route) {
    loop {
        match l.accept() {
            Ok((conn, _)) => {
                let spawned = std::thread::Builder::new().stack_size(STACK).spawn(move || forward(conn, r));
                if let Err(e) = spawned {
                    // Out of threads: this connection is refused (closed),
                    // the next ones may fare better.
                    eprintln!("devloop-forward: cannot start a thread: {e}");
                }
            }
            Err(e) => {
                eprintln!("devloop-forward: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Hands one connection to the agent if it holds the intercept, else to
/// the app; a connection neither takes is closed.
fn forward(conn: TcpStream, r: Route) {
    let upstream = r
        .claim
        .and_then(|c| TcpStream::connect_timeout(&c, CLAIM_TIMEOUT).ok())
        .or_else(|| r.app.and_then(|a| TcpStream::connect_timeout(&a, APP_TIMEOUT).ok()));
    if let Some(up) = upstream {
        splice(conn, up);
    }
}

/// Copies both ways until both directions end, passing each end (EOF) on
/// as a half-close.
fn splice(a: TcpStream, b: TcpStream) {
    let _ = a.set_nodelay(true);
    let _ = b.set_nodelay(true);
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else { return };
    let back = std::thread::Builder::new().stack_size(STACK).spawn(move || copy(b2, a2));
    copy(a, b);
    if let Ok(t) = back {
        let _ = t.join();
    }
}

fn copy(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = vec![0u8; 32 << 10];
    loop {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    // The other side is gone: stop reading this one too.
                    let _ = from.shutdown(Shutdown::Read);
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => {
                let _ = to.shutdown(Shutdown::Both);
                return;
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_parse_and_bad_ones_say_why() {
        let r = parse("0.0.0.0:40080=127.0.0.1:8080+127.0.0.1:40081").unwrap();
        assert_eq!(r.listen.port(), 40080);
        assert_eq!(r.app.unwrap().port(), 8080);
        assert_eq!(r.claim.unwrap().port(), 40081);
        assert!(parse("0.0.0.0:1=127.0.0.1:2").unwrap().claim.is_none());
        assert!(parse("0.0.0.0:1=-+127.0.0.1:3").unwrap().app.is_none());
        assert!(parse("nonsense").unwrap_err().contains("LISTEN=APP"));
        assert!(parse("0.0.0.0:1=localhost").unwrap_err().contains("not an ip:port"));
    }
}
