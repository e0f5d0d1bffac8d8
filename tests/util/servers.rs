//! Servers on loopback that stand for the developer's process and for the
//! app: a raw echo, and a small HTTP/1.1 server that says who it is and
//! what it got (keep-alive, chunked request bodies, an `Upgrade` that
//! switches to a raw echo). Each runs on its own thread's runtime, so
//! tests that drive devloop with blocking calls can use them.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A listener on a free loopback port with a deep accept queue (a
/// thousand connections may arrive at once).
fn listen() -> TcpListener {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    // std has no backlog setting: re-listen through libc on the same fd.
    unsafe {
        libc::listen(std::os::fd::AsRawFd::as_raw_fd(&l), 4096);
    }
    l
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// What a server saw.
#[derive(Default)]
pub struct Seen {
    pub connections: AtomicU64,
    pub requests: AtomicU64,
}

fn serve_forever(l: TcpListener, seen: Arc<Seen>, each: impl Fn(TcpStream, Arc<Seen>) + Send + Sync + 'static) {
    let each = Arc::new(each);
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { continue };
            seen.connections.fetch_add(1, Ordering::Relaxed);
            let (each, seen) = (each.clone(), seen.clone());
            std::thread::Builder::new().stack_size(256 << 10).spawn(move || each(s, seen)).unwrap();
        }
    });
}

/// Echoes every connection until EOF, then closes its side.
pub fn echo() -> (u16, Arc<Seen>) {
    let l = listen();
    let port = l.local_addr().unwrap().port();
    let seen = Arc::new(Seen::default());
    serve_forever(l, seen.clone(), |mut s, _| {
        let _ = s.set_nodelay(true);
        let mut w = s.try_clone().unwrap();
        let _ = std::io::copy(&mut s, &mut w);
        let _ = w.shutdown(std::net::Shutdown::Write);
    });
    (port, seen)
}

/// Accepts and reads, but never answers: a request stays in flight.
pub fn silent() -> (u16, Arc<Seen>) {
    let l = listen();
    let port = l.local_addr().unwrap().port();
    let seen = Arc::new(Seen::default());
    serve_forever(l, seen.clone(), |mut s, seen| {
        let mut buf = [0u8; 4096];
        while matches!(s.read(&mut buf), Ok(n) if n > 0) {
            seen.requests.fetch_add(1, Ordering::Relaxed);
        }
    });
    (port, seen)
}

/// An HTTP/1.1 server answering each request with `NAME METHOD PATH
/// len=BODY_LEN sum=BODY_SUM` (Content-Length framed), keep-alive; a
/// request with `Upgrade` gets `101` and then a raw echo.
pub fn http(name: &'static str) -> (u16, Arc<Seen>) {
    let l = listen();
    let port = l.local_addr().unwrap().port();
    let seen = Arc::new(Seen::default());
    serve_forever(l, seen.clone(), move |s, seen| {
        let _ = s.set_nodelay(true);
        let mut w = s.try_clone().unwrap();
        let mut r = BufReader::new(s);
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let parts: Vec<String> = line.trim_end().split(' ').map(String::from).collect();
            if parts.len() != 3 || !parts[2].starts_with("HTTP/1.") {
                return;
            }
            let mut headers = Vec::new();
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).unwrap_or(0) == 0 {
                    return;
                }
                if h == "\r\n" {
                    break;
                }
                if let Some((k, v)) = h.split_once(':') {
                    headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
                }
            }
            let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
            let body = if get("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
                let mut body = Vec::new();
                loop {
                    let mut size = String::new();
                    r.read_line(&mut size).unwrap();
                    let n = usize::from_str_radix(size.trim().split(';').next().unwrap(), 16).unwrap();
                    if n == 0 {
                        let mut end = String::new();
                        r.read_line(&mut end).unwrap();
                        break;
                    }
                    let mut chunk = vec![0u8; n + 2];
                    r.read_exact(&mut chunk).unwrap();
                    body.extend_from_slice(&chunk[..n]);
                }
                body
            } else {
                let n: usize = get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
                let mut body = vec![0u8; n];
                r.read_exact(&mut body).unwrap();
                body
            };
            seen.requests.fetch_add(1, Ordering::Relaxed);
            if get("upgrade").is_some() {
                let _ =
                    w.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n");
                let _ = std::io::copy(&mut r, &mut w);
                return;
            }
            let sum: u64 = body.iter().map(|b| *b as u64).sum();
            let text = format!("{name} {} {} len={} sum={sum}", parts[0], parts[1], body.len());
            let close = get("connection").is_some_and(|c| c.eq_ignore_ascii_case("close"));
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n{}\r\n{text}",
                text.len(),
                if close { "Connection: close\r\n" } else { "" }
            );
            if w.write_all(resp.as_bytes()).is_err() || close {
                return;
            }
        }
    });
    (port, seen)
}

/// Reads one Content-Length-framed response's body from `r` (with its
/// status line).
pub fn read_response(r: &mut BufReader<TcpStream>) -> std::io::Result<(u16, String)> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let status: u16 = line.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        r.read_line(&mut h)?;
        if h == "\r\n" || h.is_empty() {
            break;
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Sends one request on a new connection and reads its answer.
pub fn get(port: u16, path: &str, headers: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(20)))?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n").as_bytes())?;
    read_response(&mut BufReader::new(s))
}
