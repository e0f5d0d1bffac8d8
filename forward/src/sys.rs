//! The Linux (x86_64) system calls the forwarder makes, raw: it links no
//! libc, so that it is a few kilobytes and runs in any image.

use core::arch::asm;
use core::net::SocketAddr;

/// A failed call: its errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

pub const EINTR: Errno = Errno(4);
pub const EAGAIN: Errno = Errno(11);
pub const EINPROGRESS: Errno = Errno(115);

impl core::fmt::Display for Errno {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let known = match self.0 {
            1 => "operation not permitted",
            12 => "out of memory",
            13 => "permission denied",
            22 => "invalid argument",
            23 | 24 => "too many open files",
            32 => "broken pipe",
            97 => "address family not supported",
            98 => "address in use",
            99 => "address not available",
            104 => "connection reset by peer",
            110 => "timed out",
            111 => "connection refused",
            _ => return write!(f, "errno {}", self.0),
        };
        write!(f, "{known} (errno {})", self.0)
    }
}

#[inline(always)]
unsafe fn call(n: usize, a: [usize; 6]) -> isize {
    let r: isize;
    asm!(
        "syscall",
        inlateout("rax") n as isize => r,
        in("rdi") a[0], in("rsi") a[1], in("rdx") a[2], in("r10") a[3], in("r8") a[4], in("r9") a[5],
        lateout("rcx") _, lateout("r11") _,
        options(nostack),
    );
    r
}

fn check(r: isize) -> Result<usize, Errno> {
    if (-4095..0).contains(&r) {
        Err(Errno(-r as i32))
    } else {
        Ok(r as usize)
    }
}

/// A system call, retried while a signal interrupts it.
fn sys(n: usize, a: [usize; 6]) -> Result<usize, Errno> {
    loop {
        // SAFETY: every caller passes arguments valid for call `n`
        // (pointers into live buffers of the stated lengths).
        match check(unsafe { call(n, a) }) {
            Err(EINTR) => continue,
            r => return r,
        }
    }
}

const READ: usize = 0;
const CLOSE: usize = 3;
const MMAP: usize = 9;
const MUNMAP: usize = 11;
const RT_SIGPROCMASK: usize = 14;
const SOCKET: usize = 41;
const CONNECT: usize = 42;
const SENDTO: usize = 44;
const SHUTDOWN: usize = 48;
const BIND: usize = 49;
const LISTEN: usize = 50;
const SETSOCKOPT: usize = 54;
const GETSOCKOPT: usize = 55;
const WRITE: usize = 1;
const EXIT_GROUP: usize = 231;
const EPOLL_WAIT: usize = 232;
const EPOLL_CTL: usize = 233;
const CLOCK_GETTIME: usize = 228;
const ACCEPT4: usize = 288;
const SIGNALFD4: usize = 289;
const EPOLL_CREATE1: usize = 291;
const PRLIMIT64: usize = 302;
const RT_SIGACTION: usize = 13;
const FCNTL: usize = 72;
const SPLICE: usize = 275;
const PIPE2: usize = 293;

const NONBLOCK: usize = 0o4000;
const CLOEXEC: usize = 0o2000000;
const MSG_NOSIGNAL: usize = 0x4000;

pub const EPOLLIN: u32 = 0x1;
pub const EPOLLOUT: u32 = 0x4;
pub const EPOLLERR: u32 = 0x8;
pub const EPOLLHUP: u32 = 0x10;
pub const EPOLLRDHUP: u32 = 0x2000;
pub const EPOLLET: u32 = 1 << 31;

/// The kernel's `struct epoll_event` (packed on x86_64).
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
pub struct Event {
    pub events: u32,
    pub data: u64,
}

pub fn read(fd: i32, buf: &mut [u8]) -> Result<usize, Errno> {
    sys(READ, [fd as usize, buf.as_mut_ptr() as usize, buf.len(), 0, 0, 0])
}

/// Writes to a socket; a peer that is gone is an error (EPIPE), not a
/// SIGPIPE.
pub fn send(fd: i32, buf: &[u8]) -> Result<usize, Errno> {
    sys(SENDTO, [fd as usize, buf.as_ptr() as usize, buf.len(), MSG_NOSIGNAL, 0, 0])
}

/// Writes all of `buf` to a file (stdout, stderr).
pub fn write_all(fd: i32, mut buf: &[u8]) {
    while !buf.is_empty() {
        match sys(WRITE, [fd as usize, buf.as_ptr() as usize, buf.len(), 0, 0, 0]) {
            Ok(n) if n > 0 => buf = &buf[n..],
            _ => return,
        }
    }
}

pub fn close(fd: i32) {
    // SAFETY: closing a descriptor has no memory effects.
    let _ = unsafe { call(CLOSE, [fd as usize, 0, 0, 0, 0, 0]) };
}

pub fn exit(code: i32) -> ! {
    loop {
        // SAFETY: exit_group does not return.
        unsafe { call(EXIT_GROUP, [code as usize, 0, 0, 0, 0, 0]) };
    }
}

/// Anonymous, zeroed memory of `len` bytes.
pub fn map(len: usize) -> Result<*mut u8, Errno> {
    const PROT_RW: usize = 0x3;
    const PRIVATE_ANON: usize = 0x2 | 0x20;
    sys(MMAP, [0, len, PROT_RW, PRIVATE_ANON, usize::MAX, 0]).map(|p| p as *mut u8)
}

/// # Safety
/// `ptr..ptr+len` was mapped by [`map`] and nothing refers to it any more.
pub unsafe fn unmap(ptr: *mut u8, len: usize) {
    let _ = sys(MUNMAP, [ptr as usize, len, 0, 0, 0, 0]);
}

/// Milliseconds on the monotonic clock.
pub fn now_ms() -> u64 {
    let mut ts = [0i64; 2];
    let _ = sys(CLOCK_GETTIME, [1, ts.as_mut_ptr() as usize, 0, 0, 0, 0]);
    ts[0] as u64 * 1000 + ts[1] as u64 / 1_000_000
}

/// A socket address as the kernel takes it.
pub struct SockAddr {
    buf: [u8; 28],
    len: usize,
}

impl SockAddr {
    pub fn of(a: &SocketAddr) -> SockAddr {
        let mut buf = [0u8; 28];
        let len = match a {
            SocketAddr::V4(v) => {
                buf[0..2].copy_from_slice(&2u16.to_ne_bytes());
                buf[2..4].copy_from_slice(&v.port().to_be_bytes());
                buf[4..8].copy_from_slice(&v.ip().octets());
                16
            }
            SocketAddr::V6(v) => {
                buf[0..2].copy_from_slice(&10u16.to_ne_bytes());
                buf[2..4].copy_from_slice(&v.port().to_be_bytes());
                buf[4..8].copy_from_slice(&v.flowinfo().to_be_bytes());
                buf[8..24].copy_from_slice(&v.ip().octets());
                buf[24..28].copy_from_slice(&v.scope_id().to_ne_bytes());
                28
            }
        };
        SockAddr { buf, len }
    }

    fn family(&self) -> usize {
        u16::from_ne_bytes([self.buf[0], self.buf[1]]) as usize
    }
}

/// A non-blocking TCP socket for `a`'s family.
pub fn tcp_socket(a: &SockAddr) -> Result<i32, Errno> {
    const SOCK_STREAM: usize = 1;
    sys(SOCKET, [a.family(), SOCK_STREAM | NONBLOCK | CLOEXEC, 0, 0, 0, 0]).map(|fd| fd as i32)
}

fn set_int(fd: i32, level: usize, name: usize, value: i32) -> Result<(), Errno> {
    sys(SETSOCKOPT, [fd as usize, level, name, &value as *const i32 as usize, 4, 0]).map(drop)
}

/// Small writes go out at once: requests and answers are often small.
pub fn set_nodelay(fd: i32) {
    let _ = set_int(fd, 6, 1, 1);
}

/// Closing sends a reset instead of an orderly end: the other side
/// learns that its connection broke, rather than that it ended well.
pub fn set_reset_on_close(fd: i32) {
    let linger = [1i32, 0];
    let _ = sys(SETSOCKOPT, [fd as usize, 1, 13, linger.as_ptr() as usize, 8, 0]);
}

/// A listening socket on `a` with an accept queue `backlog` deep.
pub fn listen(a: &SocketAddr, backlog: i32) -> Result<i32, Errno> {
    let sa = SockAddr::of(a);
    let fd = tcp_socket(&sa)?;
    let bound = set_int(fd, 1, 2, 1)
        .and_then(|_| sys(BIND, [fd as usize, sa.buf.as_ptr() as usize, sa.len, 0, 0, 0]))
        .and_then(|_| sys(LISTEN, [fd as usize, backlog as usize, 0, 0, 0, 0]));
    match bound {
        Ok(_) => Ok(fd),
        Err(e) => {
            close(fd);
            Err(e)
        }
    }
}

/// The next waiting connection, non-blocking.
pub fn accept(fd: i32) -> Result<i32, Errno> {
    sys(ACCEPT4, [fd as usize, 0, 0, NONBLOCK | CLOEXEC, 0, 0]).map(|c| c as i32)
}

/// Starts connecting `fd` to `a`: Ok(true) when connected already,
/// Ok(false) when in progress (writable once done).
pub fn connect(fd: i32, a: &SockAddr) -> Result<bool, Errno> {
    match sys(CONNECT, [fd as usize, a.buf.as_ptr() as usize, a.len, 0, 0, 0]) {
        Ok(_) => Ok(true),
        Err(EINPROGRESS) => Ok(false),
        Err(e) => Err(e),
    }
}

/// How a connect in progress ended: Ok when connected.
pub fn connect_result(fd: i32) -> Result<(), Errno> {
    let mut err = 0i32;
    let mut len = 4u32;
    sys(GETSOCKOPT, [fd as usize, 1, 4, &mut err as *mut i32 as usize, &mut len as *mut u32 as usize, 0])?;
    if err == 0 {
        Ok(())
    } else {
        Err(Errno(err))
    }
}

pub fn shutdown_write(fd: i32) {
    let _ = sys(SHUTDOWN, [fd as usize, 1, 0, 0, 0, 0]);
}

pub fn epoll() -> Result<i32, Errno> {
    sys(EPOLL_CREATE1, [CLOEXEC, 0, 0, 0, 0, 0]).map(|fd| fd as i32)
}

pub fn epoll_add(ep: i32, fd: i32, events: u32, data: u64) -> Result<(), Errno> {
    let ev = Event { events, data };
    sys(EPOLL_CTL, [ep as usize, 1, fd as usize, &ev as *const Event as usize, 0, 0]).map(drop)
}

/// Waits for events (`timeout_ms` < 0: without a timeout).
pub fn epoll_wait(ep: i32, events: &mut [Event], timeout_ms: i32) -> Result<usize, Errno> {
    sys(EPOLL_WAIT, [ep as usize, events.as_mut_ptr() as usize, events.len(), timeout_ms as isize as usize, 0, 0])
}

/// SIGTERM and SIGINT, blocked and readable from the returned descriptor
/// instead (PID 1 of a container ignores signals it has no handler for,
/// and a pod being deleted would wait out its grace period).
pub fn stop_signals() -> Result<i32, Errno> {
    let mask: u64 = (1 << (15 - 1)) | (1 << (2 - 1));
    const SIG_BLOCK: usize = 0;
    sys(RT_SIGPROCMASK, [SIG_BLOCK, &mask as *const u64 as usize, 0, 8, 0, 0])?;
    sys(SIGNALFD4, [usize::MAX, &mask as *const u64 as usize, 8, NONBLOCK | CLOEXEC, 0, 0]).map(|fd| fd as i32)
}

/// A pipe, both ends non-blocking: its read end, then its write end,
/// holding up to `bytes` (when the system allows it that much).
pub fn pipe(bytes: usize) -> Result<[i32; 2], Errno> {
    const F_SETPIPE_SZ: usize = 1031;
    let mut fds = [-1i32; 2];
    sys(PIPE2, [fds.as_mut_ptr() as usize, NONBLOCK | CLOEXEC, 0, 0, 0, 0])?;
    let _ = sys(FCNTL, [fds[1] as usize, F_SETPIPE_SZ, bytes, 0, 0, 0]);
    Ok(fds)
}

/// Moves up to `len` bytes from `from` to `to`, one of them a pipe, in the
/// kernel: the bytes are not copied through this process.
pub fn splice(from: i32, to: i32, len: usize) -> Result<usize, Errno> {
    const MOVE: usize = 1;
    const NONBLOCK: usize = 2;
    sys(SPLICE, [from as usize, 0, to as usize, 0, len, MOVE | NONBLOCK])
}

/// SIGPIPE ignored: a write to a socket whose peer is gone fails with
/// EPIPE instead of ending the process (`send` says so per call; splice
/// cannot).
pub fn ignore_sigpipe() {
    // The kernel's `struct sigaction`: handler, flags, restorer, mask.
    let act: [usize; 4] = [1, 0, 0, 0];
    let _ = sys(RT_SIGACTION, [13, act.as_ptr() as usize, 0, 8, 0, 0]);
}

/// Raises the limit on open files to the hard limit: each connection
/// holds two.
pub fn raise_open_files() {
    const RLIMIT_NOFILE: usize = 7;
    let mut lim = [0u64; 2];
    if sys(PRLIMIT64, [0, RLIMIT_NOFILE, 0, lim.as_mut_ptr() as usize, 0, 0]).is_ok() && lim[0] < lim[1] {
        lim[0] = lim[1];
        let _ = sys(PRLIMIT64, [0, RLIMIT_NOFILE, lim.as_ptr() as usize, 0, 0, 0]);
    }
}
