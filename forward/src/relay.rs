//! The forwarder's one loop: accepts on every route's listener, hands each
//! connection to the agent's claim port if something listens there, else
//! to the app, and copies bytes both ways. One thread, non-blocking
//! sockets, edge-triggered epoll: no connection can hold up another, and
//! a thousand idle connections cost a few kilobytes each.
//!
//! Each direction has one buffer, filled only when empty, so nothing is
//! buffered beyond it: a slow reader slows its own connection only. An
//! end (EOF) passes on as a half-close; a broken side resets the other.

use crate::route::Route;
use crate::say;
use crate::sys::{self, Errno, Event, EAGAIN, EPOLLERR, EPOLLET, EPOLLHUP, EPOLLIN, EPOLLOUT, EPOLLRDHUP};

/// The accept queue's depth: callers arrive in bursts, and a SYN that
/// finds the queue full is retried only a second later.
pub const BACKLOG: i32 = 4096;
/// Connections open at once; past it, callers wait in the accept queue.
pub const MAX_CONNS: usize = 16384;
pub const MAX_ROUTES: usize = 64;
/// How long connecting to the agent's claim port may take. It is on
/// loopback, where a port nobody listens on refuses at once; a connection
/// that waits has found a live agent's accept queue full, and is that
/// agent's to take.
const CLAIM_TIMEOUT_MS: u64 = 5000;
const APP_TIMEOUT_MS: u64 = 5000;
/// One direction's buffer.
const BUF: usize = 32 << 10;
/// A streaming direction's pipe: what moves through it in one splice.
const PIPE: usize = 256 << 10;
/// Reads per direction before other connections get their turn.
const ROUNDS: usize = 16;
/// How often connections still connecting are checked for their timeout.
const TICK_MS: i32 = 100;

const LISTENER: u64 = 1 << 40;
const STOP: u64 = 1 << 41;
const CALLER: usize = 0;
const UPSTREAM: usize = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Phase {
    /// Never used (all-zero memory is this).
    Free = 0,
    /// Connecting to the agent's claim port.
    Claim,
    /// Connecting to the app.
    App,
    Relay,
    /// Closed; its slot is reused after the current batch of events.
    Closed,
}

/// One direction: `start..end` of its buffer is still to be written.
/// Once a read fills the buffer, the direction streams: from then on its
/// bytes go through a pipe with splice, in the kernel, never copied into
/// this process and out again (`piped` bytes are in the pipe).
#[derive(Clone, Copy)]
struct Dir {
    start: u32,
    end: u32,
    eof: bool,
    shut: bool,
    /// Read end, write end; -1 until the direction streams.
    pipe: [i32; 2],
    piped: u32,
}

/// Bytes moved by splice, all connections together (what the tests look
/// at to know the kernel path was taken).
pub static SPLICED: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

const IDLE: Dir = Dir { start: 0, end: 0, eof: false, shut: false, pipe: [-1, -1], piped: 0 };

/// A connection. All-zero memory is a valid, free one.
struct Conn {
    phase: Phase,
    queued: bool,
    route: u16,
    fds: [i32; 2],
    can_read: [bool; 2],
    can_write: [bool; 2],
    /// 0: caller → upstream; 1: upstream → caller.
    dirs: [Dir; 2],
    deadline: u64,
    /// Two buffers of `BUF`, mapped while the connection relays.
    buf: *mut u8,
}

/// Indices in mapped memory: a stack, or a ring of up to `MAX_CONNS`.
struct Slots {
    at: *mut u32,
    head: usize,
    len: usize,
}

impl Slots {
    fn new() -> Result<Slots, Errno> {
        Ok(Slots { at: sys::map(MAX_CONNS * 4)? as *mut u32, head: 0, len: 0 })
    }

    fn push(&mut self, i: usize) {
        debug_assert!(self.len < MAX_CONNS);
        // SAFETY: the ring holds MAX_CONNS entries and never more (each
        // connection is in it at most once).
        unsafe { *self.at.add((self.head + self.len) % MAX_CONNS) = i as u32 };
        self.len += 1;
    }

    /// Last in, first out.
    fn pop(&mut self) -> Option<usize> {
        if self.len == 0 {
            return None;
        }
        self.len -= 1;
        // SAFETY: within the ring, as in push.
        Some(unsafe { *self.at.add((self.head + self.len) % MAX_CONNS) } as usize)
    }

    /// First in, first out.
    fn shift(&mut self) -> Option<usize> {
        if self.len == 0 {
            return None;
        }
        // SAFETY: within the ring, as in push.
        let i = unsafe { *self.at.add(self.head) } as usize;
        self.head = (self.head + 1) % MAX_CONNS;
        self.len -= 1;
        Some(i)
    }
}

struct Relay<'a> {
    routes: &'a [Route],
    listeners: [i32; MAX_ROUTES],
    /// A listener whose queue may hold callers this loop has not taken
    /// (no free slot, or out of descriptors).
    backlogged: [bool; MAX_ROUTES],
    /// Said that accepting failed (once, until it works again).
    warned: [bool; MAX_ROUTES],
    retry_at: u64,
    ep: i32,
    conns: &'static mut [Conn],
    /// Slots never used above this index.
    high: usize,
    free: Slots,
    /// Connections with work left after their turn.
    ready: Slots,
    /// Closed in this batch of events: free after it.
    closed: Slots,
    connecting: usize,
    live: usize,
    draining: bool,
}

/// Serves the routes on their bound listeners until `stop` (a descriptor:
/// the stop signals, say) is readable and every connection has ended.
pub fn serve(routes: &[Route], listeners: &[i32], stop: Option<i32>) -> Result<(), Errno> {
    let ep = sys::epoll()?;
    let conns = sys::map(MAX_CONNS * core::mem::size_of::<Conn>())?;
    // SAFETY: the mapping is zeroed, sized for MAX_CONNS connections, and
    // all-zero is a valid Conn; it lives as long as the process.
    let conns = unsafe { core::slice::from_raw_parts_mut(conns as *mut Conn, MAX_CONNS) };
    let mut r = Relay {
        routes,
        listeners: [-1; MAX_ROUTES],
        backlogged: [false; MAX_ROUTES],
        warned: [false; MAX_ROUTES],
        retry_at: 0,
        ep,
        conns,
        high: 0,
        free: Slots::new()?,
        ready: Slots::new()?,
        closed: Slots::new()?,
        connecting: 0,
        live: 0,
        draining: false,
    };
    for i in (0..MAX_CONNS).rev() {
        r.free.push(i);
    }
    for (i, &fd) in listeners.iter().enumerate().take(MAX_ROUTES) {
        r.listeners[i] = fd;
        sys::epoll_add(ep, fd, EPOLLIN | EPOLLET, LISTENER | i as u64)?;
        r.backlogged[i] = true;
    }
    if let Some(fd) = stop {
        sys::epoll_add(ep, fd, EPOLLIN, STOP)?;
    }
    let mut events = [Event::default(); 256];
    loop {
        r.retry_backlogged();
        if r.draining && r.live == 0 {
            return Ok(());
        }
        let timeout = if r.ready.len > 0 {
            0
        } else if r.connecting > 0 || r.backlogged.iter().any(|b| *b) {
            TICK_MS
        } else {
            -1
        };
        let n = sys::epoll_wait(ep, &mut events, timeout)?;
        for ev in &events[..n] {
            let (data, flags) = (ev.data, ev.events);
            if data & STOP != 0 {
                r.stop(stop.unwrap_or(-1));
            } else if data & LISTENER != 0 {
                r.accept_all((data & 0xffff) as usize);
            } else {
                r.on_event((data >> 1) as usize, (data & 1) as usize, flags);
            }
        }
        let turns = r.ready.len;
        for _ in 0..turns {
            if let Some(i) = r.ready.shift() {
                r.conns[i].queued = false;
                if r.conns[i].phase == Phase::Relay {
                    r.pump(i);
                }
            }
        }
        r.expire();
        while let Some(i) = r.closed.pop() {
            r.conns[i].phase = Phase::Free;
            r.free.push(i);
        }
    }
}

impl Relay<'_> {
    fn stop(&mut self, fd: i32) {
        let mut drain = [0u8; 128];
        while matches!(sys::read(fd, &mut drain), Ok(n) if n > 0) {}
        if self.draining {
            return;
        }
        self.draining = true;
        for l in self.listeners.iter_mut().filter(|l| **l >= 0) {
            sys::close(*l);
            *l = -1;
        }
        self.backlogged = [false; MAX_ROUTES];
    }

    fn retry_backlogged(&mut self) {
        if self.free.len == 0 || sys::now_ms() < self.retry_at {
            return;
        }
        for i in 0..self.routes.len().min(MAX_ROUTES) {
            if self.backlogged[i] {
                self.accept_all(i);
            }
        }
    }

    fn accept_all(&mut self, li: usize) {
        let Some(&fd) = self.listeners.get(li).filter(|fd| **fd >= 0) else { return };
        loop {
            let Some(i) = self.free.pop() else {
                self.backlogged[li] = true;
                return;
            };
            match sys::accept(fd) {
                Ok(caller) => {
                    self.warned[li] = false;
                    sys::set_nodelay(caller);
                    self.high = self.high.max(i + 1);
                    self.live += 1;
                    let c = &mut self.conns[i];
                    *c = Conn {
                        phase: Phase::Free,
                        queued: false,
                        route: li as u16,
                        fds: [caller, -1],
                        can_read: [false; 2],
                        can_write: [false; 2],
                        dirs: [IDLE; 2],
                        deadline: 0,
                        buf: core::ptr::null_mut(),
                    };
                    self.advance(i, Phase::Free);
                }
                Err(e) => {
                    self.free.push(i);
                    match e {
                        EAGAIN => self.backlogged[li] = false,
                        // A caller that gave up while queued.
                        Errno(103) => continue,
                        _ => {
                            // Out of descriptors or memory: the callers
                            // wait in the queue until something frees up.
                            if !self.warned[li] {
                                say!("cannot accept on {}: {e}; retrying", self.routes[li].listen);
                                self.warned[li] = true;
                            }
                            self.backlogged[li] = true;
                            self.retry_at = sys::now_ms() + TICK_MS as u64;
                        }
                    }
                    return;
                }
            }
        }
    }

    /// Connects the connection's upstream to the next candidate after
    /// `after` (the claim port, then the app); the caller is closed when
    /// none takes it.
    fn advance(&mut self, i: usize, after: Phase) {
        let route = self.routes[self.conns[i].route as usize];
        let candidates = [(Phase::Claim, route.claim, CLAIM_TIMEOUT_MS), (Phase::App, route.app, APP_TIMEOUT_MS)];
        let skip = match after {
            Phase::Claim => 1,
            Phase::App => 2,
            _ => 0,
        };
        for (phase, target, wait) in candidates.into_iter().skip(skip) {
            let Some(addr) = target else { continue };
            let sa = sys::SockAddr::of(&addr);
            let Ok(fd) = sys::tcp_socket(&sa) else { continue };
            sys::set_nodelay(fd);
            if sys::epoll_add(self.ep, fd, EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, token(i, UPSTREAM)).is_err() {
                sys::close(fd);
                continue;
            }
            self.conns[i].fds[UPSTREAM] = fd;
            match sys::connect(fd, &sa) {
                Ok(true) => return self.relay(i),
                Ok(false) => {
                    let c = &mut self.conns[i];
                    c.phase = phase;
                    c.deadline = sys::now_ms() + wait;
                    self.connecting += 1;
                    return;
                }
                Err(_) => {
                    sys::close(fd);
                    self.conns[i].fds[UPSTREAM] = -1;
                }
            }
        }
        self.finish(i, false);
    }

    /// A connect in progress ended (or timed out: `gave_up`).
    fn connected(&mut self, i: usize, gave_up: bool) {
        self.connecting -= 1;
        let c = &mut self.conns[i];
        let was = c.phase;
        // Between phases: neither connecting nor relaying.
        c.phase = Phase::Free;
        let fd = c.fds[UPSTREAM];
        if !gave_up && sys::connect_result(fd).is_ok() {
            return self.relay(i);
        }
        sys::close(fd);
        c.fds[UPSTREAM] = -1;
        self.advance(i, was);
    }

    fn relay(&mut self, i: usize) {
        let Ok(buf) = sys::map(2 * BUF) else { return self.finish(i, true) };
        let c = &mut self.conns[i];
        c.phase = Phase::Relay;
        c.buf = buf;
        c.can_read = [true; 2];
        c.can_write = [true; 2];
        if sys::epoll_add(self.ep, c.fds[CALLER], EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, token(i, CALLER)).is_err()
        {
            return self.finish(i, true);
        }
        self.pump(i);
    }

    fn on_event(&mut self, i: usize, side: usize, flags: u32) {
        let Some(c) = self.conns.get_mut(i) else { return };
        match c.phase {
            Phase::Claim | Phase::App if side == UPSTREAM && flags & (EPOLLOUT | EPOLLERR | EPOLLHUP) != 0 => {
                self.connected(i, false)
            }
            Phase::Relay => {
                if flags & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR) != 0 {
                    c.can_read[side] = true;
                }
                if flags & (EPOLLOUT | EPOLLHUP | EPOLLERR) != 0 {
                    c.can_write[side] = true;
                }
                self.pump(i);
            }
            _ => {}
        }
    }

    fn pump(&mut self, i: usize) {
        let mut more = false;
        for d in 0..2 {
            match self.pump_dir(i, d) {
                Ok(m) => more |= m,
                Err(_) => return self.finish(i, true),
            }
        }
        let c = &mut self.conns[i];
        if c.dirs[0].shut && c.dirs[1].shut {
            return self.finish(i, false);
        }
        if more && !c.queued {
            c.queued = true;
            self.ready.push(i);
        }
    }

    /// Moves one direction's bytes until a side would block; Ok(true) when
    /// its turn ran out with work left.
    fn pump_dir(&mut self, i: usize, d: usize) -> Result<bool, Errno> {
        let c = &mut self.conns[i];
        let (src, dst) = (d, 1 - d);
        // SAFETY: `buf` maps 2 * BUF bytes while the connection relays;
        // direction d owns the d-th half.
        let buf = unsafe { core::slice::from_raw_parts_mut(c.buf.add(d * BUF), BUF) };
        for _ in 0..ROUNDS {
            let dir = &mut c.dirs[d];
            if dir.start < dir.end {
                if !c.can_write[dst] {
                    return Ok(false);
                }
                match sys::send(c.fds[dst], &buf[dir.start as usize..dir.end as usize]) {
                    Ok(n) => dir.start += n as u32,
                    Err(EAGAIN) => {
                        c.can_write[dst] = false;
                        return Ok(false);
                    }
                    Err(e) => return Err(e),
                }
                if dir.start < dir.end {
                    continue;
                }
                dir.start = 0;
                dir.end = 0;
            }
            if dir.piped > 0 {
                if !c.can_write[dst] {
                    return Ok(false);
                }
                match sys::splice(dir.pipe[0], c.fds[dst], dir.piped as usize) {
                    Ok(n) => {
                        dir.piped -= n as u32;
                        SPLICED.fetch_add(n as u64, core::sync::atomic::Ordering::Relaxed);
                    }
                    Err(EAGAIN) => {
                        c.can_write[dst] = false;
                        return Ok(false);
                    }
                    Err(e) => return Err(e),
                }
                if dir.piped > 0 {
                    continue;
                }
            }
            if dir.eof {
                if !dir.shut {
                    sys::shutdown_write(c.fds[dst]);
                    dir.shut = true;
                }
                return Ok(false);
            }
            if !c.can_read[src] {
                return Ok(false);
            }
            // The pipe is empty here: EAGAIN means the source is.
            let streams = dir.pipe[1] >= 0;
            let got = match streams {
                true => sys::splice(c.fds[src], dir.pipe[1], PIPE),
                false => sys::read(c.fds[src], buf),
            };
            match got {
                Ok(0) => dir.eof = true,
                Ok(n) if streams => dir.piped = n as u32,
                Ok(n) => {
                    dir.end = n as u32;
                    // Without a pipe (out of descriptors, say) it goes on
                    // through the buffer.
                    if n == BUF {
                        if let Ok(p) = sys::pipe(PIPE) {
                            dir.pipe = p;
                        }
                    }
                }
                Err(EAGAIN) => {
                    c.can_read[src] = false;
                    return Ok(false);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Closes both sides (`reset`: the other side learns it broke).
    fn finish(&mut self, i: usize, reset: bool) {
        let c = &mut self.conns[i];
        if matches!(c.phase, Phase::Claim | Phase::App) {
            self.connecting -= 1;
        }
        for fd in c.fds.iter_mut().filter(|fd| **fd >= 0) {
            if reset {
                sys::set_reset_on_close(*fd);
            }
            sys::close(*fd);
            *fd = -1;
        }
        for fd in c.dirs.iter_mut().flat_map(|d| d.pipe.iter_mut()).filter(|fd| **fd >= 0) {
            sys::close(*fd);
            *fd = -1;
        }
        if !c.buf.is_null() {
            // SAFETY: mapped in relay() with this size; nothing refers to
            // it once the connection is closed.
            unsafe { sys::unmap(c.buf, 2 * BUF) };
            c.buf = core::ptr::null_mut();
        }
        c.phase = Phase::Closed;
        self.live -= 1;
        self.closed.push(i);
    }

    /// Connections that waited too long for their upstream try the next.
    fn expire(&mut self) {
        if self.connecting == 0 {
            return;
        }
        let now = sys::now_ms();
        for i in 0..self.high {
            let c = &self.conns[i];
            if matches!(c.phase, Phase::Claim | Phase::App) && now >= c.deadline {
                self.connected(i, true);
            }
        }
    }
}

fn token(i: usize, side: usize) -> u64 {
    ((i as u64) << 1) | side as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;
    use std::time::Duration;
    use std::vec::Vec;

    /// A forwarder on its own thread for `route` (its `listen` is bound
    /// here, on a free port); returns that port and the stop pipe's write
    /// end.
    fn forwarder(app: Option<u16>, claim: Option<u16>) -> (u16, UnixStream, std::thread::JoinHandle<()>) {
        let addr = |p: u16| std::format!("127.0.0.1:{p}").parse().unwrap();
        let l = crate::sys::listen(&"127.0.0.1:0".parse().unwrap(), BACKLOG).unwrap();
        // SAFETY: the descriptor was just created and is handed over.
        let std_l: TcpListener = unsafe { std::os::fd::FromRawFd::from_raw_fd(l) };
        let port = std_l.local_addr().unwrap().port();
        std::mem::forget(std_l);
        let route = Route { listen: addr(port), app: app.map(addr), claim: claim.map(addr) };
        let (stop_r, stop_w) = std::os::unix::net::UnixStream::pair().unwrap();
        stop_r.set_nonblocking(true).unwrap();
        let t = std::thread::spawn(move || {
            let routes = [route];
            serve(&routes, &[l], Some(stop_r.as_raw_fd())).unwrap();
        });
        (port, stop_w, t)
    }

    /// A listener on a free loopback port with a deep accept queue (std's
    /// is 128 deep: a burst from the forwarder would overflow it).
    fn deep_listener() -> TcpListener {
        let fd = crate::sys::listen(&"127.0.0.1:0".parse().unwrap(), BACKLOG).unwrap();
        // SAFETY: the descriptor was just created and is handed over.
        let l: TcpListener = unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) };
        l.set_nonblocking(false).unwrap();
        l
    }

    /// A loopback server that answers each connection with `name` and then
    /// echoes what it reads, until EOF.
    fn server(name: &'static str) -> u16 {
        let l = deep_listener();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                std::thread::spawn(move || {
                    let _ = s.write_all(name.as_bytes());
                    let mut w = s.try_clone().unwrap();
                    let _ = std::io::copy(&mut s, &mut w);
                    let _ = w.shutdown(Shutdown::Write);
                });
            }
        });
        port
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    fn exchange(port: u16, data: &[u8]) -> Vec<u8> {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut w = s.try_clone().unwrap();
        let data = data.to_vec();
        let t = std::thread::spawn(move || {
            w.write_all(&data).unwrap();
            w.shutdown(Shutdown::Write).unwrap();
        });
        let mut got = Vec::new();
        (&s).read_to_end(&mut got).unwrap();
        t.join().unwrap();
        got
    }

    #[test]
    fn the_claim_port_takes_connections_while_something_listens_there_else_the_app() {
        let app = server("app:");
        let claim = free_port();
        let (port, _stop, _) = forwarder(Some(app), Some(claim));
        assert_eq!(exchange(port, b"1"), b"app:1", "nothing on the claim port: the app");
        let agent = TcpListener::bind(("127.0.0.1", claim)).unwrap();
        std::thread::spawn(move || {
            for s in agent.incoming() {
                let mut s = s.unwrap();
                let _ = s.write_all(b"dev:");
                let mut w = s.try_clone().unwrap();
                let _ = std::io::copy(&mut s, &mut w);
                let _ = w.shutdown(Shutdown::Write);
            }
        });
        assert_eq!(exchange(port, b"2"), b"dev:2", "the claim port listens: it takes the connection");
    }

    #[test]
    fn with_nobody_to_take_it_a_connection_is_closed_at_once() {
        let (port, _stop, _) = forwarder(None, Some(free_port()));
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = Vec::new();
        let r = s.read_to_end(&mut got);
        assert!(got.is_empty() && r.is_ok_and(|n| n == 0), "closed, not left hanging");
    }

    #[test]
    fn bytes_arrive_exact_both_ways_with_half_close() {
        let (port, _stop, _) = forwarder(Some(server("")), None);
        let data: Vec<u8> = (0..(24 << 20)).map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        let spliced = SPLICED.load(core::sync::atomic::Ordering::Relaxed);
        assert!(exchange(port, &data) == data, "24 MiB echoed byte for byte");
        // Other tests run beside this one, so only a lower bound holds:
        // the bulk of both directions went through the kernel's pipes.
        let moved = SPLICED.load(core::sync::atomic::Ordering::Relaxed) - spliced;
        assert!(moved >= 24 << 20, "only {moved} bytes of 48 MiB went by splice");
        assert_eq!(exchange(port, b""), b"", "an empty exchange ends cleanly");
    }

    #[test]
    fn two_thousand_connections_at_once_all_arrive() {
        let (port, _stop, _) = forwarder(Some(server("")), None);
        let threads: Vec<_> = (0..2000u32)
            .map(|i| {
                std::thread::Builder::new()
                    .stack_size(64 << 10)
                    .spawn(move || exchange(port, &i.to_le_bytes()) == i.to_le_bytes())
                    .unwrap()
            })
            .collect();
        let ok = threads.into_iter().map(|t| t.join().unwrap()).filter(|ok| *ok).count();
        assert_eq!(ok, 2000);
    }

    #[test]
    fn a_stalled_reader_does_not_hold_up_another_connection() {
        let (port, _stop, _) = forwarder(Some(server("")), None);
        // Writes and never reads: every buffer on its way fills.
        let stalled = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let mut w = stalled.try_clone().unwrap();
        std::thread::spawn(move || {
            let chunk = [7u8; 65536];
            while w.write_all(&chunk).is_ok() {}
        });
        std::thread::sleep(Duration::from_millis(300));
        let data = std::vec![1u8; 8 << 20];
        assert!(exchange(port, &data) == data);
        drop(stalled);
    }

    #[test]
    fn stopping_closes_the_listener_and_lets_connections_finish() {
        let (port, mut stop, t) = forwarder(Some(server("app:")), None);
        let mut open = TcpStream::connect(("127.0.0.1", port)).unwrap();
        open.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut hello = [0u8; 4];
        open.read_exact(&mut hello).unwrap();
        stop.write_all(b"x").unwrap();
        let t0 = std::time::Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_ok() {
            assert!(t0.elapsed() < Duration::from_secs(5), "the listener should close");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!t.is_finished(), "a connection is still open: the forwarder waits for it");
        open.write_all(b"still").unwrap();
        open.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        open.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b"still");
        let t0 = std::time::Instant::now();
        while !t.is_finished() {
            assert!(t0.elapsed() < Duration::from_secs(5), "the forwarder should end with its last connection");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
