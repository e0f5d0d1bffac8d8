//! The intercept, in the agent: listeners that the session holds (they
//! close when it ends, so the forwarder in front of them hands new
//! connections to the app), and what happens to each connection.
//!
//! - Without a header, the whole connection is the developer's: it becomes
//!   an [`StreamHeader::Inbound`] stream to the CLI, which dials the
//!   developer's port. If nothing listens there, the CLI refuses the
//!   stream, and the caller's connection is closed at once, or, when it
//!   had sent an HTTP request, answered `502` with devloop's reason.
//! - With a header (a personal intercept), each HTTP/1.1 request goes its
//!   own way: to the developer if it carries the header, to the app
//!   otherwise, one request at a time so the answers come back in order
//!   (keep-alive and pipelined requests mix freely; an `Upgrade` that is
//!   switched becomes a raw connection to whoever switched it). Anything
//!   that is not HTTP/1.1 goes to the app, whole and untouched.
//!
//! Whatever a caller sends, a connection that fails ends alone: no panic,
//! and nothing buffered without bound (a stream's window, a head's 64 KiB).

use crate::http::{self, Body, Buffered, Head, HeadError};
use devloop_agent::mux::{Mux, Stream};
use devloop_agent::protocol::{HeaderMatch, InterceptPort, StreamHeader, CHUNK_SIZE, TCP_WINDOW};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// How long connecting to the app may take.
const APP_TIMEOUT: Duration = Duration::from_secs(5);

/// The intercept a session holds: its listeners and their connections,
/// which all end when this is dropped.
pub struct Held {
    _tasks: JoinSet<()>,
    listeners: Arc<Listeners>,
    pub listening: Vec<String>,
    pub lease: Duration,
}

/// The listeners' descriptors (their tasks own them), to stop them now,
/// not when their aborted tasks are next polled: from then on the
/// forwarder finds nobody on the claim port and hands new callers to the
/// app. (Until then, a caller the kernel queued on a listener about to
/// go away was reset.)
struct Listeners {
    fds: Vec<std::os::fd::RawFd>,
    stopped: AtomicBool,
}

impl Listeners {
    fn stop(&self) {
        if self.stopped.swap(true, Ordering::AcqRel) {
            return;
        }
        for fd in &self.fds {
            // SAFETY: the listener tasks own these descriptors and are
            // aborted only after `Held::drop` stopped them (after which
            // this does nothing); shutdown does not close.
            unsafe { libc::shutdown(*fd, libc::SHUT_RDWR) };
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.listeners.stop();
    }
}

/// One intercepted port, resolved.
#[derive(Clone)]
struct Port {
    port: u16,
    app: Option<SocketAddr>,
    header: Option<HeaderMatch>,
}

/// Takes the intercept: binds every port's listener (all or none), then
/// serves them until dropped.
pub async fn hold(
    ports: Vec<InterceptPort>,
    header: Option<HeaderMatch>,
    lease_ms: u64,
    mux: Mux,
) -> Result<Held, String> {
    let mut bound = Vec::new();
    for p in &ports {
        let addr: SocketAddr = p.listen.parse().map_err(|_| format!("`{}` is not an ip:port", p.listen))?;
        // Only the forwarder in front of it faces the network: what reaches
        // the agent's own listeners comes from the same host (or pod).
        if !addr.ip().is_loopback() {
            return Err(format!("`{addr}`: the agent listens on loopback only"));
        }
        let app = match &p.app {
            Some(a) => Some(a.parse::<SocketAddr>().map_err(|_| format!("`{a}` is not an ip:port"))?),
            None => None,
        };
        let l = listen(addr).map_err(|e| format!("cannot listen on {addr} for port {}: {e}", p.port))?;
        bound.push((l, Port { port: p.port, app, header: header.clone() }));
    }
    let mut tasks = JoinSet::new();
    let mut listening = Vec::new();
    let mut fds = Vec::new();
    for (l, port) in bound {
        listening.push(l.local_addr().map(|a| a.to_string()).unwrap_or_default());
        fds.push(std::os::fd::AsRawFd::as_raw_fd(&l));
        tasks.spawn(accept_loop(l, port, mux.clone()));
    }
    let listeners = Arc::new(Listeners { fds, stopped: AtomicBool::new(false) });
    // When devloop goes, the listeners stop before the connections in
    // flight hear of it: a caller who reads their 502 and calls again
    // reaches the app, not a listener about to close.
    let l = listeners.clone();
    mux.at_end(move || l.stop());
    Ok(Held { _tasks: tasks, listeners, listening, lease: Duration::from_millis(lease_ms.max(100)) })
}

/// Callers arrive in bursts (a thousand at once, from the forwarder's
/// threads): the accept queue is deep, since a SYN that finds it full is
/// dropped and retried only a second later.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let s = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    s.set_reuseaddr(true)?;
    s.bind(addr)?;
    s.listen(4096)
}

async fn accept_loop(l: TcpListener, port: Port, mux: Mux) {
    // This loop's connections: dropped with it.
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            a = l.accept() => match a {
                Ok((conn, peer)) => {
                    let _ = conn.set_nodelay(true);
                    let (port, mux) = (port.clone(), mux.clone());
                    conns.spawn(async move {
                        match port.header.clone() {
                            None => whole(conn, peer.to_string(), port, mux).await,
                            Some(m) => personal(conn, peer.to_string(), port, m, mux).await,
                        }
                    });
                }
                // Out of descriptors, say: the next accept may succeed.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

fn inbound(mux: &Mux, port: &Port, peer: &str) -> Option<Stream> {
    mux.open(&StreamHeader::Inbound { port: port.port, peer: peer.to_string() }, TCP_WINDOW).ok()
}

/// Whether the first bytes a caller sent look like an HTTP request (so a
/// refusal can be a readable `502` instead of a closed connection).
fn looks_like_http(first: &[u8]) -> bool {
    let methods: [&[u8]; 9] =
        [b"GET ", b"POST ", b"PUT ", b"DELETE ", b"HEAD ", b"PATCH ", b"OPTIONS ", b"CONNECT ", b"TRACE "];
    methods.iter().any(|m| first.starts_with(m))
}

/// The whole connection goes to the developer.
async fn whole(conn: TcpStream, peer: String, port: Port, mux: Mux) {
    let Some(stream) = inbound(&mux, &port, &peer) else {
        // The session is ending: the app answers instead.
        return to_app(conn, Vec::new(), port.app).await;
    };
    let (mut sr, mut sw) = stream.into_split();
    let (mut cr, mut cw) = conn.into_split();
    // The caller's first bytes, for a 502 if the developer's end refuses.
    let first = Mutex::new(Vec::new());
    let up = async {
        let mut buf = vec![0u8; CHUNK_SIZE];
        loop {
            let n = cr.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            {
                let mut f = first.lock().unwrap_or_else(|e| e.into_inner());
                if f.len() < 16 {
                    let take = n.min(16 - f.len());
                    f.extend_from_slice(&buf[..take]);
                }
            }
            sw.write_all(&buf[..n]).await?;
        }
        sw.shutdown().await
    };
    let down = async {
        // Straight from the stream's chunks to the caller's socket.
        match sr.copy_to(&mut cw).await {
            Ok(_) => {
                let _ = cw.shutdown().await;
                Ok(())
            }
            Err(e) => {
                let http = looks_like_http(&first.lock().unwrap_or_else(|e| e.into_inner()));
                if sr.delivered() == 0 && http {
                    let body = format!("devloop: this request was intercepted for a developer: {e}");
                    let _ = cw.write_all(&http::error_response(502, "Bad Gateway", &body)).await;
                }
                let _ = cw.shutdown().await;
                Err(e)
            }
        }
    };
    tokio::pin!(up, down);
    // The developer's side failing ends both directions; its normal end
    // (FIN) leaves the caller's side to finish.
    let mut up_done = false;
    loop {
        tokio::select! {
            r = &mut up, if !up_done => {
                up_done = true;
                if r.is_err() { return; }
            }
            r = &mut down => {
                if r.is_err() || up_done { return; }
                // Half-closed by the developer: the caller may still send.
                let _ = (&mut up).await;
                return;
            }
        }
    }
}

/// Hands a connection to the app, `first` (bytes already read from it)
/// first; closes it when there is no app to take it.
async fn to_app(mut conn: TcpStream, first: Vec<u8>, app: Option<SocketAddr>) {
    let Some(app) = app else { return };
    let Ok(Ok(mut up)) = tokio::time::timeout(APP_TIMEOUT, TcpStream::connect(app)).await else { return };
    let _ = up.set_nodelay(true);
    if up.write_all(&first).await.is_err() {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut conn, &mut up).await;
}

type Reader = Buffered<Box<dyn AsyncRead + Unpin + Send>>;
type Writer = Box<dyn AsyncWrite + Unpin + Send>;

/// Where one request goes, kept for the next that goes the same way.
struct Upstream {
    r: Reader,
    w: Writer,
    dev: bool,
}

async fn open_app(app: Option<SocketAddr>) -> Option<Upstream> {
    let app = app?;
    let tcp = tokio::time::timeout(APP_TIMEOUT, TcpStream::connect(app)).await.ok()?.ok()?;
    let _ = tcp.set_nodelay(true);
    let (r, w) = tcp.into_split();
    Some(Upstream { r: Buffered::new(Box::new(r)), w: Box::new(w), dev: false })
}

fn open_dev(mux: &Mux, port: &Port, peer: &str) -> Option<Upstream> {
    let (r, w) = inbound(mux, port, peer)?.into_split();
    Some(Upstream { r: Buffered::new(Box::new(r)), w: Box::new(w), dev: true })
}

/// A head without one header (all its lines).
fn without_header(raw: &[u8], name: &str) -> Vec<u8> {
    let text = String::from_utf8_lossy(raw);
    let mut out = String::with_capacity(raw.len());
    for line in text.split_inclusive("\r\n") {
        let skip = line.split_once(':').is_some_and(|(k, _)| k.trim().eq_ignore_ascii_case(name));
        if !skip {
            out.push_str(line);
        }
    }
    out.into_bytes()
}

/// A personal intercept: each request goes its own way.
async fn personal(conn: TcpStream, peer: String, port: Port, m: HeaderMatch, mux: Mux) {
    let (cr, mut cw) = conn.into_split();
    let mut caller = Buffered::new(cr);
    let mut dev: Option<Upstream> = None;
    let mut app: Option<Upstream> = None;
    let mut first = true;
    loop {
        let raw = match caller.read_head(true).await {
            Ok(Some(h)) => h,
            Ok(None) => break,
            Err(HeadError::NotHttp) if first => {
                // Not HTTP/1.1 (TLS, HTTP/2, anything else): the app takes
                // the whole connection, as it came.
                let (cr, rest) = caller.into_parts();
                if let Ok(conn) = cr.reunite(cw) {
                    to_app(conn, rest, port.app).await;
                }
                return;
            }
            // Garbage after a request, a head too large, a caller gone.
            Err(_) => break,
        };
        first = false;
        let Some(head) = Head::parse(&raw) else {
            let _ = cw
                .write_all(&http::error_response(400, "Bad Request", "devloop: a request head that does not parse"))
                .await;
            break;
        };
        let body = match http::request_body(&head) {
            Ok(b) => b,
            Err(why) => {
                let _ = cw.write_all(&http::error_response(400, "Bad Request", &format!("devloop: {why}"))).await;
                break;
            }
        };
        let mine = head.get(&m.name) == Some(m.value.as_str());
        // The developer's way, if the session still carries it; else the
        // app's.
        if mine && dev.is_none() {
            dev = open_dev(&mux, &port, &peer);
        }
        if (!mine || dev.is_none()) && app.is_none() {
            app = open_app(port.app).await;
        }
        let up = match (mine, dev.as_mut(), app.as_mut()) {
            (true, Some(d), _) => d,
            (_, _, Some(a)) => a,
            _ => {
                let why = "devloop: the app of this intercepted service cannot be reached";
                let _ = cw.write_all(&http::error_response(502, "Bad Gateway", why)).await;
                break;
            }
        };
        // The caller may wait for `100 Continue` before its body: it gets
        // it here, and the upstream gets a request without the wait.
        let out = if head.has_token("expect", "100-continue") {
            if cw.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.is_err() {
                break;
            }
            without_header(&raw, "expect")
        } else {
            raw
        };
        if up.w.write_all(&out).await.is_err() || caller.copy_body(body, &mut up.w).await.is_err() {
            let _ = cw.write_all(&http::error_response(502, "Bad Gateway", &gone(up.dev, "took the request"))).await;
            break;
        }
        // Its answer, after any interim ones.
        let keep = loop {
            let rh = match up.r.read_head(false).await {
                Ok(Some(h)) => h,
                other => {
                    // The developer's end says why (nothing listens there,
                    // say): the caller reads it.
                    let why = match other {
                        Err(HeadError::Io(e)) if up.dev => {
                            format!("devloop: this request was intercepted for a developer: {e}")
                        }
                        _ => gone(up.dev, "answered"),
                    };
                    let _ = cw.write_all(&http::error_response(502, "Bad Gateway", &why)).await;
                    break false;
                }
            };
            let Some(rhead) = Head::parse(&rh) else { break false };
            if cw.write_all(&rh).await.is_err() {
                break false;
            }
            let status = rhead.status();
            if status == 101 && head.upgrades() {
                // Switched protocols: from here on, raw both ways.
                let up = if up.dev { dev.take() } else { app.take() };
                if let Some(up) = up {
                    raw_both(caller, cw, up).await;
                }
                return;
            }
            if (100..200).contains(&status) {
                continue;
            }
            let rbody = http::response_body(head.method(), &rhead);
            if up.r.copy_body(rbody, &mut cw).await.is_err() {
                break false;
            }
            break !(rbody == Body::UntilClose || rhead.closes());
        };
        if !keep || head.closes() {
            break;
        }
    }
    let _ = cw.shutdown().await;
    for up in [dev, app].into_iter().flatten() {
        let mut w = up.w;
        let _ = w.shutdown().await;
    }
}

fn gone(dev: bool, what: &str) -> String {
    if dev {
        format!("devloop: the developer's process never {what} (it is gone, or devloop is)")
    } else {
        format!("devloop: the app never {what}")
    }
}

/// After a switch of protocols: what each side buffered goes to the other
/// first, then bytes flow both ways until both ends close.
async fn raw_both(
    caller: Buffered<tokio::net::tcp::OwnedReadHalf>,
    mut cw: tokio::net::tcp::OwnedWriteHalf,
    up: Upstream,
) {
    let (mut cr, c_rest) = caller.into_parts();
    let (mut ur, u_rest) = up.r.into_parts();
    let mut uw = up.w;
    if uw.write_all(&c_rest).await.is_err() || cw.write_all(&u_rest).await.is_err() {
        return;
    }
    let a = async {
        let _ = tokio::io::copy(&mut cr, &mut uw).await;
        let _ = uw.shutdown().await;
    };
    let b = async {
        let _ = tokio::io::copy(&mut ur, &mut cw).await;
        let _ = cw.shutdown().await;
    };
    tokio::join!(a, b);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_is_left_out_and_the_rest_kept() {
        let raw = b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n";
        assert_eq!(without_header(raw, "expect"), b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n");
        assert!(looks_like_http(b"GET / HTTP/1.1"));
        assert!(!looks_like_http(b"\x16\x03\x01"));
    }
}
