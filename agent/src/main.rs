//! devloop-agent: runs inside the target (a pod, a container, a directory on
//! this machine), applies file batches under its sync root, runs post-sync
//! commands and the app process, and speaks the devloop protocol over stdio
//! or a loopback TCP port.

mod apply;
mod http;
mod intercept;
mod run;
mod server;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "\
usage: devloop-agent serve --root DIR (--stdio | --listen 127.0.0.1:PORT)
                           [--token-file PATH | --token-stdin] [--cache-dir DIR]
       devloop-agent version

--cache-dir is where the hashes of the root's settled files are kept
between sessions, so that an unchanged tree is walked, not read (default:
the temporary directory).

The session token comes from the DEVLOOP_AGENT_TOKEN environment variable,
a file (--token-file), or the first line of stdin (--token-stdin); never
from the command line, where other users could read it.

With --listen and --token-stdin, stdin is the agent's lifeline: when it
closes (the exec stream that started the agent in a pod is gone, because
devloop stopped or crashed), the agent stops its app and exits, so nothing
is left running behind a dead CLI.";

enum Listen {
    Stdio,
    Tcp(SocketAddr),
}

struct Args {
    root: PathBuf,
    listen: Listen,
    token_file: Option<PathBuf>,
    token_stdin: bool,
    cache_dir: Option<PathBuf>,
}

fn parse(mut it: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
    match it.next().as_deref() {
        Some("serve") => {}
        Some("version") | Some("--version") => return Ok(None),
        Some(other) => return Err(format!("unknown command `{other}`")),
        None => return Err("missing command".into()),
    }
    let (mut root, mut listen, mut token_file, mut token_stdin, mut cache_dir) = (None, None, None, false, None);
    while let Some(a) = it.next() {
        let mut val = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match a.as_str() {
            "--root" => root = Some(PathBuf::from(val("--root")?)),
            "--stdio" => listen = Some(Listen::Stdio),
            "--listen" => {
                let v = val("--listen")?;
                let addr: SocketAddr =
                    v.parse().map_err(|_| format!("--listen wants IP:PORT such as 127.0.0.1:7777, not `{v}`"))?;
                // Invariant 4: the control port is reachable from inside the
                // pod only; the CLI reaches it through a port-forward.
                if !addr.ip().is_loopback() {
                    return Err(format!("--listen {addr}: the agent only listens on loopback (127.0.0.1 or ::1)"));
                }
                listen = Some(Listen::Tcp(addr));
            }
            "--token-file" => token_file = Some(PathBuf::from(val("--token-file")?)),
            "--token-stdin" => token_stdin = true,
            "--cache-dir" => cache_dir = Some(PathBuf::from(val("--cache-dir")?)),
            "--token" => {
                return Err("--token is not accepted: pass the token in DEVLOOP_AGENT_TOKEN or --token-file".into())
            }
            other => return Err(format!("unknown option `{other}`")),
        }
    }
    let root = root.ok_or("--root DIR is required")?;
    let listen = listen.ok_or("one of --stdio or --listen 127.0.0.1:PORT is required")?;
    Ok(Some(Args { root, listen, token_file, token_stdin, cache_dir }))
}

fn read_token(args: &Args) -> Result<String, String> {
    let tok = if let Some(f) = &args.token_file {
        std::fs::read_to_string(f).map_err(|e| format!("cannot read --token-file {}: {e}", f.display()))?
    } else if args.token_stdin {
        let mut line = Vec::new();
        // Byte by byte and unbuffered (std's stdin buffers): the WebSocket
        // handshake follows on the same stdin and must be left unread.
        use std::io::Read;
        use std::os::fd::FromRawFd;
        // SAFETY: fd 0 is open for the whole process; ManuallyDrop keeps
        // this File from closing it.
        let mut stdin = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(0) });
        let mut b = [0u8; 1];
        while stdin.read(&mut b).map_err(|e| e.to_string())? == 1 && b[0] != b'\n' {
            line.push(b[0]);
            if line.len() > 4096 {
                return Err("--token-stdin: first line longer than 4096 bytes".into());
            }
        }
        String::from_utf8(line).map_err(|_| "--token-stdin: token is not UTF-8")?
    } else {
        std::env::var(devloop_agent::protocol::TOKEN_ENV)
            .map_err(|_| format!("no session token: set {} or pass --token-file", devloop_agent::protocol::TOKEN_ENV))?
    };
    let tok = tok.trim().to_string();
    if tok.is_empty() {
        return Err("the session token is empty".into());
    }
    Ok(tok)
}

/// Whether `p` is `/proc/<pid>/root/...` (without `..`).
fn proc_root(p: &std::path::Path) -> bool {
    let s = p.to_string_lossy();
    let Some(rest) = s.strip_prefix("/proc/") else { return false };
    let mut parts = rest.split('/');
    let pid_ok = parts.next().is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()));
    pid_ok && parts.next() == Some("root") && !s.split('/').any(|c| c == "..")
}

fn main() -> ExitCode {
    devloop_agent::fault::set_scope("agent");
    let args = match parse(std::env::args().skip(1)) {
        Ok(Some(a)) => a,
        Ok(None) => {
            println!("devloop-agent {} protocol {}", devloop_agent::VERSION, devloop_agent::protocol::PROTOCOL_VERSION);
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("devloop-agent: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let token = match read_token(&args) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("devloop-agent: {e}");
            return ExitCode::from(2);
        }
    };
    apply::init_umask();
    devloop_agent::mux::raise_open_files_limit();
    // Children (the app, post-sync commands) must not inherit the token.
    // Safe here: no other thread exists yet.
    std::env::remove_var(devloop_agent::protocol::TOKEN_ENV);
    if let Err(e) = std::fs::create_dir_all(&args.root) {
        eprintln!("devloop-agent: cannot create sync root {}: {e}", args.root.display());
        return ExitCode::from(2);
    }
    // A root under /proc/PID/root/ is another container's filesystem, seen
    // from a helper container sharing its process namespace (images with no
    // shell). The kernel resolves that link into the other mount
    // namespace; textual canonicalization would read it as "/" and land in
    // the helper's own filesystem, so such a root is used as given.
    let root = if proc_root(&args.root) { Ok(args.root.clone()) } else { std::fs::canonicalize(&args.root) };
    let root = match root {
        Ok(r) if r.is_dir() => r,
        Ok(r) => {
            eprintln!("devloop-agent: sync root {} is not a directory", r.display());
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("devloop-agent: sync root {}: {e}", args.root.display());
            return ExitCode::from(2);
        }
    };
    // One thread runs every task: the agent's async work is routing bytes
    // between tasks, which is fastest without cross-thread wakeups; applying
    // batches, indexing and hashing run on threads of their own.
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("devloop-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = rt.block_on(server::run(server::Config {
        root,
        token,
        stdio: matches!(args.listen, Listen::Stdio),
        addr: match args.listen {
            Listen::Tcp(a) => Some(a),
            Listen::Stdio => None,
        },
        lifeline: args.token_stdin && !matches!(args.listen, Listen::Stdio),
        cache_dir: args.cache_dir.unwrap_or_else(std::env::temp_dir),
    }));
    // Do not wait for blocked stdin readers: the session is over.
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    code
}
