//! The forwarder's entry point: no std, no libc, its own `_start`.
#![cfg_attr(all(target_os = "linux", target_arch = "x86_64"), no_std, no_main)]

#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
fn main() {
    eprintln!("devloop-forward runs on Linux (x86_64) only");
    std::process::exit(2);
}

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod linux {
    use core::fmt::Write;
    use devloop_forward::out::Out;
    use devloop_forward::relay::{self, MAX_ROUTES};
    use devloop_forward::route::{self, Route, USAGE};
    use devloop_forward::{say, sys};

    /// The process starts here: the stack holds argc, then argv.
    #[unsafe(naked)]
    #[no_mangle]
    unsafe extern "C" fn _start() -> ! {
        core::arch::naked_asm!("mov rdi, rsp", "and rsp, -16", "call {entry}", "ud2", entry = sym entry)
    }

    /// The arguments after the program's name, as text.
    unsafe fn args(sp: *const usize, into: &mut [&'static str; MAX_ROUTES + 1]) -> Result<usize, ()> {
        let argc = *sp;
        let argv = sp.add(1) as *const *const u8;
        let mut n = 0;
        for k in 1..argc {
            let p = *argv.add(k);
            let mut len = 0;
            while *p.add(len) != 0 {
                len += 1;
            }
            let s = core::str::from_utf8(core::slice::from_raw_parts(p, len)).map_err(drop)?;
            *into.get_mut(n).ok_or(())? = s;
            n += 1;
        }
        Ok(n)
    }

    unsafe extern "C" fn entry(sp: *const usize) -> ! {
        let mut argv = [""; MAX_ROUTES + 1];
        let Ok(n) = args(sp, &mut argv) else {
            say!("arguments must be text, at most {MAX_ROUTES} routes\n\n{USAGE}");
            sys::exit(2);
        };
        let argv = &argv[..n];
        if argv.is_empty() || argv.iter().any(|a| *a == "-h" || *a == "--help") {
            let mut o = Out::stderr();
            let _ = o.write_str(USAGE);
            drop(o);
            sys::exit(if argv.is_empty() { 2 } else { 0 });
        }
        let mut routes =
            [Route { listen: core::net::SocketAddr::from(([0, 0, 0, 0], 0)), app: None, claim: None }; MAX_ROUTES];
        for (i, a) in argv.iter().enumerate() {
            match route::parse(a) {
                Ok(r) => routes[i] = r,
                Err(e) => {
                    say!("{e}\n\n{USAGE}");
                    sys::exit(2);
                }
            }
        }
        let routes = &routes[..n];
        sys::raise_open_files();
        let mut fds = [-1i32; MAX_ROUTES];
        for (i, r) in routes.iter().enumerate() {
            match sys::listen(&r.listen, relay::BACKLOG) {
                Ok(fd) => fds[i] = fd,
                Err(e) => {
                    say!("cannot listen on {}: {e}", r.listen);
                    sys::exit(1);
                }
            }
        }
        {
            let mut o = Out::stdout();
            for r in routes {
                let _ = write!(o, "devloop-forward listening on {} for ", r.listen);
                let _ = match r.app {
                    Some(a) => write!(o, "{a}"),
                    None => o.write_str("no app"),
                };
                if let Some(c) = r.claim {
                    let _ = write!(o, ", to devloop's agent at {c} while it holds the intercept");
                }
                let _ = o.write_str("\n");
            }
        }
        let stop = sys::stop_signals().ok();
        sys::ignore_sigpipe();
        match relay::serve(routes, &fds[..n], stop) {
            Ok(()) => sys::exit(0),
            Err(e) => {
                say!("stopped: {e}");
                sys::exit(1);
            }
        }
    }

    #[panic_handler]
    fn panic(info: &core::panic::PanicInfo) -> ! {
        say!("internal error: {info}");
        sys::exit(101);
    }

    // What the compiler calls for copies and comparisons, which libc
    // would otherwise provide.

    #[no_mangle]
    unsafe extern "C" fn memcpy(d: *mut u8, s: *const u8, n: usize) -> *mut u8 {
        core::arch::asm!("rep movsb", inout("rcx") n => _, inout("rdi") d => _, inout("rsi") s => _, options(nostack, preserves_flags));
        d
    }

    #[no_mangle]
    unsafe extern "C" fn memmove(d: *mut u8, s: *const u8, n: usize) -> *mut u8 {
        if (d as usize) <= (s as usize) || (d as usize) >= (s as usize) + n {
            return memcpy(d, s, n);
        }
        // Overlapping, destination above: copy backwards.
        core::arch::asm!(
            "std", "rep movsb", "cld",
            inout("rcx") n => _, inout("rdi") d.add(n - 1) => _, inout("rsi") s.add(n - 1) => _,
            options(nostack),
        );
        d
    }

    #[no_mangle]
    unsafe extern "C" fn memset(d: *mut u8, c: i32, n: usize) -> *mut u8 {
        core::arch::asm!("rep stosb", inout("rcx") n => _, inout("rdi") d => _, in("al") c as u8, options(nostack, preserves_flags));
        d
    }

    #[no_mangle]
    unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
        for i in 0..n {
            // Volatile: a plain loop may be turned back into a memcmp call.
            let (x, y) = (core::ptr::read_volatile(a.add(i)), core::ptr::read_volatile(b.add(i)));
            if x != y {
                return x as i32 - y as i32;
            }
        }
        0
    }

    #[no_mangle]
    unsafe extern "C" fn strlen(s: *const u8) -> usize {
        let mut n = 0;
        while core::ptr::read_volatile(s.add(n)) != 0 {
            n += 1;
        }
        n
    }

    #[no_mangle]
    unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
        memcmp(a, b, n)
    }
}
