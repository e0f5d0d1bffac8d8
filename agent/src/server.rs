//! Accepts sessions (stdio: exactly one; TCP: any number, each in its own
//! task) and serves each: index requests, batches, app control.
//!
//! Per session, one task takes what the connection's reader hands over
//! ([`Incoming`], in wire order); it never blocks: indexing runs on a
//! blocking thread, batches go to the apply worker, commands to the
//! session's post-sync task, and the connections of Dial streams to tasks
//! the session owns (they end with it). A stream of a kind this agent does
//! not know is refused by the reader; the session goes on.

use crate::{apply, intercept, run};
use devloop_agent::handshake;
use devloop_agent::hash_cache;
use devloop_agent::index::{self, HashCache, WalkOptions};
use devloop_agent::mux::{self, close_code, Accepted, End, Heartbeat, Incoming, Mux as Outbound, Role, Stream};
use devloop_agent::paths::{self, WirePath};
use devloop_agent::protocol::{self, CommandSpec, Control, ErrorCode, StreamHeader, PROTOCOL_VERSION};
use devloop_agent::VERSION;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

pub struct Config {
    pub root: PathBuf,
    pub token: String,
    pub stdio: bool,
    pub addr: Option<SocketAddr>,
    /// Exit when stdin reaches end of file (see `--token-stdin` in main).
    pub lifeline: bool,
    /// Where the root's hash cache is kept.
    pub cache_dir: PathBuf,
}

/// What every session shares.
struct Shared {
    root: PathBuf,
    /// The root's hash cache (see `devloop_agent::hash_cache`).
    hash_cache: PathBuf,
    token: String,
    apply: apply::Worker,
    app: run::AppHandle,
}

pub async fn run(cfg: Config) -> ExitCode {
    let shared = Arc::new(Shared {
        apply: apply::start(cfg.root.clone()),
        app: run::start_app_manager(cfg.root.clone()),
        hash_cache: hash_cache::path_for(
            &cfg.cache_dir,
            "devloop-agent-hashes-",
            cfg.root.as_os_str().as_encoded_bytes(),
        ),
        root: cfg.root,
        token: cfg.token,
    });
    let stop = shutdown_signal();
    let code = if cfg.stdio {
        eprintln!(
            "devloop-agent {VERSION} protocol {PROTOCOL_VERSION} serving on stdio root {}",
            shared.root.display()
        );
        let io = tokio::io::join(stdin(), stdout());
        tokio::select! {
            r = session(io, shared.clone(), "stdio".into()) => if r { ExitCode::SUCCESS } else { ExitCode::FAILURE },
            _ = stop => ExitCode::SUCCESS,
        }
    } else {
        // Parsing guarantees an address when not on stdio.
        let addr = cfg.addr.expect("listen address");
        let listener = match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("devloop-agent: cannot listen on {addr}: {e}");
                return ExitCode::from(2);
            }
        };
        let local = listener.local_addr().map(|a| a.to_string()).unwrap_or_else(|_| addr.to_string());
        // The readiness line: the CLI (or a port-forward) waits for it.
        println!(
            "devloop-agent {VERSION} protocol {PROTOCOL_VERSION} listening on {local} root {}",
            shared.root.display()
        );
        tokio::pin!(stop);
        let lifeline = lifeline_cut(cfg.lifeline);
        tokio::pin!(lifeline);
        loop {
            tokio::select! {
                a = listener.accept() => match a {
                    Ok((sock, peer)) => {
                        let _ = sock.set_nodelay(true);
                        tokio::spawn(session(sock, shared.clone(), peer.to_string()));
                    }
                    Err(e) => eprintln!("devloop-agent: accept failed: {e}"),
                },
                _ = &mut stop => break ExitCode::SUCCESS,
                _ = &mut lifeline => {
                    eprintln!("devloop-agent: stdin closed (devloop is gone); exiting");
                    break ExitCode::SUCCESS;
                }
            }
        }
    };
    shared.app.shutdown().await;
    code
}

/// Stdin for the session. A pipe (the usual case: a child of devloop, an
/// exec stream) is read on the runtime's own thread through epoll;
/// tokio's `stdin()` reads on a helper thread and hands each chunk over,
/// which costs every message a thread wake-up. Anything else (a tty, a
/// socket) falls back to that.
fn stdin() -> Box<dyn AsyncRead + Unpin + Send> {
    match fifo(0).map(tokio::net::unix::pipe::Receiver::from_file) {
        Some(Ok(r)) => Box::new(r),
        _ => Box::new(tokio::io::stdin()),
    }
}

/// Stdout for the session; see [`stdin`].
fn stdout() -> Box<dyn AsyncWrite + Unpin + Send> {
    match fifo(1).map(tokio::net::unix::pipe::Sender::from_file) {
        Some(Ok(w)) => Box::new(w),
        _ => Box::new(tokio::io::stdout()),
    }
}

/// Standard fd `fd` as a File, if it is a pipe. In stdio mode only the
/// session uses fds 0 and 1 (the token line was read before), and they stay
/// open for the life of the process.
fn fifo(fd: std::os::fd::RawFd) -> Option<std::fs::File> {
    use std::os::fd::FromRawFd;
    use std::os::unix::fs::FileTypeExt;
    // SAFETY: fds 0 and 1 are open; ManuallyDrop keeps this probe from
    // closing one that is not a pipe.
    let probe = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(fd) });
    let is_fifo = probe.metadata().is_ok_and(|m| m.file_type().is_fifo());
    if is_fifo {
        // A 1 MiB pipe (the default is 64 KiB, one data chunk) lets a
        // first sync move many chunks per wake-up on each side. Best
        // effort: beyond /proc/sys/fs/pipe-max-size it is refused, and the
        // pipe stays as it was.
        // SAFETY: fcntl on an open fd; no memory is passed.
        unsafe { libc::fcntl(fd, libc::F_SETPIPE_SZ, PIPE_SIZE) };
    }
    // SAFETY: as above; from here on the File owns the fd.
    is_fifo.then(|| unsafe { std::fs::File::from_raw_fd(fd) })
}

/// The size asked for the stdio pipes.
const PIPE_SIZE: libc::c_int = 1 << 20;

/// Resolves when stdin reaches end of file (or fails), if `on`; never
/// otherwise. Read on a thread of its own: the runtime has one thread, and
/// the bytes (none are expected) are discarded.
async fn lifeline_cut(on: bool) {
    if !on {
        return std::future::pending().await;
    }
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        use std::io::Read;
        let mut buf = [0u8; 256];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
        let _ = tx.send(());
    });
    let _ = rx.await;
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    // SIGHUP too: the terminal that started devloop (and this agent, on
    // the local target) was closed; the app, in a group of its own, gets
    // no SIGHUP and must be stopped here.
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt()), signal(SignalKind::hangup())) {
        (Ok(mut t), Ok(mut i), Ok(mut h)) => {
            tokio::select! { _ = t.recv() => {}, _ = i.recv() => {}, _ = h.recv() => {} }
        }
        _ => std::future::pending().await,
    }
}

/// How long a client may take to send its upgrade request.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

/// Serves one session; returns whether it ended cleanly.
async fn session<S>(io: S, shared: Arc<Shared>, peer: String) -> bool
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (io, rest) = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake::accept(io, &shared.token, VERSION)).await
    {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            eprintln!("devloop-agent: rejected session from {peer}: {e}");
            return false;
        }
        Err(_) => {
            eprintln!("devloop-agent: rejected session from {peer}: no upgrade request within {HANDSHAKE_TIMEOUT:?}");
            return false;
        }
    };
    let (out, mut rx) = mux::spawn(io, rest, Role::Server, Heartbeat::from_env());
    let _ = out.control(Control::Hello {
        agent_version: VERSION.into(),
        protocol: PROTOCOL_VERSION,
        root: shared.root.display().to_string(),
        pid: std::process::id(),
        features: vec![devloop_agent::codec::FEATURE_ZSTD.into()],
    });
    let mut app_events = shared.app.subscribe();
    let post_sync = start_post_sync(shared.clone(), out.clone());
    // Batches not yet applied or handed over, in arrival order.
    let mut queued: VecDeque<Queued> = VecDeque::new();
    // The connections this session's streams carry: they end with it.
    let mut tunnels = tokio::task::JoinSet::new();
    // The intercept this session holds, if it holds one: it ends with the
    // session, or when the CLI is not heard from within its lease.
    let mut held: Option<intercept::Held> = None;
    let mut lease_check = tokio::time::interval(Duration::from_millis(250));
    let end = loop {
        let item = tokio::select! {
            _ = lease_check.tick(), if held.is_some() => {
                let lease = held.as_ref().map_or(Duration::MAX, |h| h.lease);
                if out.silent_for() > lease {
                    let m = format!("no word from devloop within the intercept's lease of {lease:?}: releasing the intercept");
                    eprintln!("devloop-agent: {m}");
                    held = None;
                    out.close(close_code::SHUTDOWN, m.clone());
                    break End::Dead(lease);
                }
                continue;
            }
            item = rx.recv() => item,
            ev = app_events.recv() => {
                match ev {
                    Ok(c) => { let _ = out.control(c); }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        let _ = out.control(Control::Error { code: ErrorCode::Request, message: format!("{n} lines of app output dropped (client too slow)"), fatal: false, request: None });
                    }
                    Err(_) => {}
                }
                continue;
            }
            Some(_) = tunnels.join_next(), if !tunnels.is_empty() => continue,
        };
        let Some(item) = item else { break End::Eof };
        let batch = match item {
            Incoming::Ended(e) => break e,
            Incoming::Batch { control: Control::Batch { id, deletes, commands, restart }, archive } => {
                Some((id, deletes, commands, restart, Some(apply::Archive::Buffered(archive))))
            }
            Incoming::Open(Accepted {
                header: StreamHeader::Batch { id, deletes, commands, restart, encoding },
                stream,
            }) => {
                // The agent sends nothing back on it: only the reading half
                // stays (the apply thread takes it).
                let (r, _) = stream.into_split();
                let archive = apply::Archive::Stream { reader: r.blocking(), encoding };
                Some((id, deletes, commands, restart, Some(archive)))
            }
            Incoming::Open(Accepted { header: StreamHeader::Dial { host, port }, stream }) => {
                tunnels.spawn(dial(host, port, stream));
                None
            }
            Incoming::Open(Accepted { header: StreamHeader::Inbound { .. }, stream }) => {
                stream.reset("only the agent opens inbound streams");
                None
            }
            Incoming::Control(Control::Batch { id, deletes, commands, restart }) => {
                Some((id, deletes, commands, restart, None))
            }
            Incoming::Control(Control::IndexRequest { id, under, prune, packed }) => {
                tokio::spawn(send_index(
                    shared.root.clone(),
                    shared.hash_cache.clone(),
                    id,
                    under,
                    prune,
                    packed,
                    out.clone(),
                ));
                None
            }
            Incoming::Control(Control::AppConfigure { app }) => {
                shared.app.configure(app);
                None
            }
            Incoming::Control(Control::AppRestart {}) => {
                shared.app.restart();
                None
            }
            Incoming::Control(Control::Intercept { ports, header, lease_ms }) => {
                // A new intercept replaces the old: its listeners go first,
                // so the same ports can be taken again.
                held = None;
                match intercept::hold(ports, header, lease_ms, out.clone()).await {
                    Ok(h) => {
                        let _ = out.control(Control::InterceptHeld { listening: h.listening.clone() });
                        held = Some(h);
                    }
                    Err(message) => {
                        let _ = out.control(Control::InterceptFailed { message });
                    }
                }
                None
            }
            Incoming::Control(Control::InterceptStop {}) => {
                held = None;
                None
            }
            Incoming::Control(Control::EnvRequest { id }) => {
                let vars = std::env::vars().filter(|(k, _)| k != protocol::TOKEN_ENV).collect();
                let _ = out.control(Control::Env { id, vars });
                None
            }
            Incoming::Control(other) | Incoming::Batch { control: other, .. } => {
                let m = format!("unexpected message from a client: {}", kind_of(&other));
                fatal(&out, &m);
                break End::Protocol(m);
            }
        };
        let Some((id, deletes, commands, restart, archive)) = batch else { continue };
        if queued.len() >= MAX_QUEUED_BATCHES {
            let m = too_many_batches(id);
            fatal(&out, &m);
            break End::Protocol(m);
        }
        let result = queue_batch(&mut queued, deletes, archive);
        if !dispatch(&mut queued, &shared) {
            fatal(&out, "the apply worker is gone");
            break End::Io("apply worker stopped".into());
        }
        acknowledge(result, id, commands, restart, out.clone(), post_sync.clone());
    };
    // The listeners first: new callers go to the app from now on.
    drop(held);
    tunnels.abort_all();
    let clean =
        matches!(end, End::Closed { code: close_code::NORMAL, .. } | End::Closed { code: close_code::SHUTDOWN, .. });
    if !clean {
        eprintln!("devloop-agent: session {peer} ended: {end}");
    }
    clean
}

/// How long connecting for a Dial stream may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to `host:port` from here and carries the connection over the
/// stream; a connection that cannot be made refuses the stream, saying why.
async fn dial(host: String, port: u16, stream: Stream) {
    match tokio::time::timeout(DIAL_TIMEOUT, tokio::net::TcpStream::connect((host.as_str(), port))).await {
        Ok(Ok(tcp)) => {
            mux::splice(stream, tcp).await;
        }
        Ok(Err(e)) => stream.reset(&format!("cannot connect to {host}:{port} from the agent: {e}")),
        Err(_) => {
            stream.reset(&format!("cannot connect to {host}:{port} from the agent: no answer in {DIAL_TIMEOUT:?}"))
        }
    }
}

/// Queues a batch (with its archive, if it has one); returns where its
/// outcome arrives.
fn queue_batch(
    queued: &mut VecDeque<Queued>,
    deletes: Vec<WirePath>,
    archive: Option<apply::Archive>,
) -> tokio::sync::oneshot::Receiver<apply::Outcome> {
    let (done, result) = tokio::sync::oneshot::channel();
    queued.push_back(Queued { deletes, archive, done });
    result
}

/// Answers a batch once it is applied, then runs its post-sync work.
fn acknowledge(
    result: tokio::sync::oneshot::Receiver<apply::Outcome>,
    id: u64,
    commands: Vec<CommandSpec>,
    restart: bool,
    out: Outbound,
    post_sync: mpsc::UnboundedSender<PostSync>,
) {
    tokio::spawn(async move {
        let Ok(o) = result.await else { return };
        let changed = o.written + o.deleted > 0;
        let _ = out.control(Control::Applied {
            id,
            written: o.written,
            deleted: o.deleted,
            bytes: o.bytes,
            errors: o.errors,
            apply_us: o.apply_us,
        });
        if !commands.is_empty() || (restart && changed) {
            let _ = post_sync.send(PostSync { batch: id, commands, restart: restart && changed });
        }
    });
}

/// Batches a session may have announced and not yet had applied. devloop
/// sends one at a time (it awaits each acknowledgement); a client that
/// piles up more is cut off, so what it makes the agent hold is bounded.
const MAX_QUEUED_BATCHES: usize = 16;

/// A batch waiting for its turn.
struct Queued {
    deletes: Vec<WirePath>,
    archive: Option<apply::Archive>,
    done: tokio::sync::oneshot::Sender<apply::Outcome>,
}

/// Applies or hands over queued batches, in order. A small one (its
/// archive in memory) is applied right here when nothing else is being
/// applied: a single edit then costs no hand-over to another thread.
/// Returns false if the apply thread is gone.
fn dispatch(queued: &mut VecDeque<Queued>, shared: &Shared) -> bool {
    while let Some(q) = queued.pop_front() {
        let small = !matches!(q.archive, Some(apply::Archive::Stream { .. }));
        if small && shared.apply.idle() {
            let out = apply::apply(&shared.root, q.deletes, q.archive);
            let _ = q.done.send(out);
            // Swapped-out files go once the acknowledgement is on its way
            // (a new file swaps nothing out: no task then).
            if !apply::reaper::is_empty() {
                tokio::spawn(async {
                    tokio::task::yield_now().await;
                    apply::reaper::remove_now();
                });
            }
        } else if !shared.apply.send(apply::Job { deletes: q.deletes, archive: q.archive, done: q.done }) {
            return false;
        }
    }
    true
}

fn too_many_batches(id: u64) -> String {
    format!(
        "batch {id}: more than {MAX_QUEUED_BATCHES} batches announced and not yet applied; wait for acknowledgements"
    )
}

fn fatal(out: &Outbound, message: &str) {
    let _ = out.control(Control::Error {
        code: ErrorCode::Protocol,
        message: message.to_string(),
        fatal: true,
        request: None,
    });
    out.close(close_code::PROTOCOL, message.chars().take(120).collect::<String>());
}

fn kind_of(c: &Control) -> String {
    serde_json::to_value(c)
        .ok()
        .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(String::from))
        .unwrap_or_default()
}

/// Walks and hashes the requested trees and sends the index in parts small
/// enough to interleave with other traffic.
async fn send_index(
    root: PathBuf,
    cache: PathBuf,
    id: u64,
    under: Vec<WirePath>,
    prune: Vec<WirePath>,
    packed: bool,
    out: Outbound,
) {
    let send = |c: Control| if packed { out.control_packed(c) } else { out.control(c) };
    let refuse = |message: String| {
        let _ = out.control(Control::Error { code: ErrorCode::Request, message, fatal: false, request: Some(id) });
        let _ = out.control(Control::IndexPart { id, entries: vec![], done: true, reused: 0 });
    };
    for u in under.iter().chain(prune.iter()) {
        if !u.is_empty() {
            if let Err(e) = paths::components(u.as_bytes()) {
                return refuse(format!("index of `{u}`: {e}"));
            }
        }
    }
    let walked = tokio::task::spawn_blocking(move || {
        let cache = HashCache::open(cache);
        let mut found = Vec::new();
        let mut skipped = Vec::new();
        let keep = |wire: &WirePath, is_dir: bool| !(is_dir && prune.iter().any(|p| p == wire));
        for u in &under {
            // A base that is a symlink is not followed (invariant 1).
            let base = if u.is_empty() {
                root.clone()
            } else {
                paths::join(&root, u.as_bytes()).unwrap_or_else(|_| root.clone())
            };
            if !u.is_empty() && std::fs::symlink_metadata(&base).map(|m| !m.is_dir()).unwrap_or(true) {
                continue;
            }
            index::walk_parallel(&base, u, &keep, WalkOptions { clean_stale_temps: true }, &mut found, &mut skipped)?;
        }
        let hashed = index::hash_cached(found, &mut skipped, &|_| false, &cache);
        hashed.map(|(h, stats)| {
            cache.store(&h);
            (h.into_iter().map(|(_, e)| e).collect::<Vec<_>>(), stats)
        })
    })
    .await;
    let (entries, stats) = match walked {
        Ok(Ok(e)) => e,
        // A failed walk is not an empty tree: the CLI would send everything
        // again, and believe it knew what is here.
        Ok(Err(e)) => return refuse(format!("index failed: {e}")),
        Err(e) => return refuse(format!("index failed: {e}")),
    };
    // ~256 KiB of JSON per part.
    let mut part = Vec::new();
    let mut size = 0;
    for e in entries {
        size += e.path.len() + 80;
        part.push(e);
        if size > 256 << 10 {
            let _ = send(Control::IndexPart { id, entries: std::mem::take(&mut part), done: false, reused: 0 });
            size = 0;
        }
    }
    let _ = send(Control::IndexPart { id, entries: part, done: true, reused: stats.reused });
}

struct PostSync {
    batch: u64,
    commands: Vec<CommandSpec>,
    restart: bool,
}

/// Runs post-sync work in order. Work that piles up while a command runs is
/// merged: each distinct command once, one restart.
fn start_post_sync(shared: Arc<Shared>, out: Outbound) -> mpsc::UnboundedSender<PostSync> {
    let (tx, mut rx) = mpsc::unbounded_channel::<PostSync>();
    tokio::spawn(async move {
        while let Some(mut job) = rx.recv().await {
            while let Ok(more) = rx.try_recv() {
                job.batch = more.batch;
                for c in more.commands {
                    if !job.commands.contains(&c) {
                        job.commands.push(c);
                    }
                }
                job.restart |= more.restart;
            }
            // Replaced files' temporaries are gone before a command or the
            // restarted app lists the tree.
            apply::reaper::remove_now();
            let o = out.clone();
            let ok = run::run_commands(&shared.root, job.batch, &job.commands, move |c| {
                let _ = o.control(c);
            })
            .await;
            // A failed command (say, a build) leaves the app as it is.
            if job.restart && ok {
                shared.app.restart();
            }
        }
    });
    tx
}
