//! The control socket: how `devloop status` and `devloop trigger` (and
//! editors' keyboard shortcuts, and scripts) reach a running `devloop
//! watch`.
//!
//! A Unix socket per configuration file, in a directory only this user
//! can enter (`$XDG_RUNTIME_DIR/devloop`, or `/tmp/devloop-UID`, mode
//! 0700); the socket itself is 0600. One request per connection, one JSON
//! line each way. A socket that no process serves (devloop was killed) is
//! stale: the next `watch` removes it and serves its own. A socket that
//! answers means another `watch` runs on the same configuration: the
//! second one is refused, and told how to reach the first.

use crate::hub::{ActionKind, Hub};
use crate::state::State;
use serde::{Deserialize, Serialize};
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

/// A request longer than this is refused (no request needs more).
const MAX_REQUEST: usize = 64 << 10;
/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a starting devloop waits for the one that holds the socket.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long `status` waits for its answer.
const STATUS_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `trigger` waits: a resync of a big tree answers when done.
const TRIGGER_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    Trigger {
        service: String,
        #[serde(default)]
        pod: Option<String>,
        #[serde(flatten)]
        action: ActionKind,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<serde_json::Value>,
}

/// What went wrong, with what to do about it.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ControlError {
    pub message: String,
    pub hint: Option<String>,
    /// Another devloop serves this configuration.
    pub running: bool,
}

fn err(message: String, hint: &str) -> ControlError {
    ControlError { message, hint: Some(hint.to_string()), running: false }
}

/// The private directory the sockets live in.
pub fn socket_dir() -> PathBuf {
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d).join("devloop"),
        None => std::env::temp_dir().join(format!("devloop-{uid}")),
    }
}

/// The socket of one configuration file: named by a hash of its absolute
/// path, so two projects never share one, and every command run from
/// anywhere on the same file finds it.
pub fn socket_path(config: &Path) -> PathBuf {
    let abs = std::fs::canonicalize(config)
        .unwrap_or_else(|_| std::env::current_dir().map(|d| d.join(config)).unwrap_or_else(|_| config.to_path_buf()));
    let h = xxhash_rust::xxh3::xxh3_64(abs.as_os_str().as_encoded_bytes());
    socket_dir().join(format!("{h:016x}.sock"))
}

/// Makes the directory, or checks that the one there is this user's and
/// closed to others (a socket in a directory others can enter could be
/// swapped for theirs).
fn private_dir(dir: &Path) -> Result<(), ControlError> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(err(
                format!("cannot make the control directory {}: {e}", dir.display()),
                "set XDG_RUNTIME_DIR to a directory you own",
            ))
        }
    }
    let md = std::fs::symlink_metadata(dir)
        .map_err(|e| err(format!("cannot read {}: {e}", dir.display()), "remove it, or set XDG_RUNTIME_DIR"))?;
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    if !md.is_dir() || md.uid() != uid || md.permissions().mode() & 0o077 != 0 {
        return Err(err(
            format!(
                "the control directory {} is not a private directory of yours (owner {}, mode {:o})",
                dir.display(),
                md.uid(),
                md.permissions().mode() & 0o7777
            ),
            "remove it (devloop makes it again, mode 0700), or set XDG_RUNTIME_DIR to a directory you own",
        ));
    }
    Ok(())
}

/// Takes the control socket of `config` for this process. Refused when
/// another devloop answers on it; a stale one is replaced.
pub async fn bind(config: &Path) -> Result<(UnixListener, PathBuf), ControlError> {
    let path = socket_path(config);
    private_dir(path.parent().expect("the socket has a directory"))?;
    if path.exists() {
        match request(&path, &Request::Status, PROBE_TIMEOUT).await {
            Ok(reply) => {
                return Err(ControlError {
                    message: format!(
                        "another devloop (pid {}) is already running on {}",
                        reply.pid.map_or("?".into(), |p| p.to_string()),
                        config.display()
                    ),
                    hint: Some(
                        "`devloop status` and `devloop trigger` talk to it; stop it (Ctrl-C in its terminal) to start another"
                            .into(),
                    ),
                    running: true,
                })
            }
            // Something took the connection and never answered: a devloop
            // that is stopped (SIGSTOP, a debugger) still holds it.
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                return Err(ControlError {
                    message: format!("a devloop holds {} but does not answer (stopped?)", path.display()),
                    hint: Some("resume or stop it (`fuser` or `ss -xp` names its process); then start again".into()),
                    running: true,
                })
            }
            // Nobody serves it: left by a devloop that was killed.
            Err(_) => {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    let listener = UnixListener::bind(&path).map_err(|e| {
        err(format!("cannot listen on {}: {e}", path.display()), "remove the file if no devloop is running")
    })?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| err(format!("cannot make {} private: {e}", path.display()), "check the directory"))?;
    Ok((listener, path))
}

/// Serves requests until cancelled, then removes the socket.
pub async fn serve(listener: UnixListener, path: PathBuf, hub: Hub, cancel: CancellationToken) {
    let ino = std::fs::metadata(&path).map(|m| m.ino()).ok();
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            a = listener.accept() => match a {
                Ok((s, _)) => { conns.spawn(answer(s, hub.clone())); }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = cancel.cancelled() => break,
        }
    }
    // Only ours: a socket another process took since is left alone.
    if ino.is_some() && std::fs::metadata(&path).map(|m| m.ino()).ok() == ino {
        let _ = std::fs::remove_file(&path);
    }
}

async fn answer(s: UnixStream, hub: Hub) {
    let (rd, mut wr) = s.into_split();
    let mut line = String::new();
    let mut rd = BufReader::new(tokio::io::AsyncReadExt::take(rd, MAX_REQUEST as u64));
    let read = tokio::time::timeout(REQUEST_TIMEOUT, rd.read_line(&mut line)).await;
    let reply = match read {
        Ok(Ok(n)) if n > 0 => match serde_json::from_str::<Request>(&line) {
            Ok(req) => handle(req, &hub).await,
            Err(e) => Reply {
                ok: false,
                message: Some(format!(
                    "not a request devloop knows ({e}); this devloop is {}",
                    env!("CARGO_PKG_VERSION")
                )),
                pid: None,
                state: None,
            },
        },
        _ => return,
    };
    // Plain data: serializing it cannot fail.
    let mut out = serde_json::to_vec(&reply).expect("a reply serializes");
    out.push(b'\n');
    let _ = wr.write_all(&out).await;
}

async fn handle(req: Request, hub: &Hub) -> Reply {
    let pid = Some(std::process::id());
    match req {
        Request::Status => match hub.subscribe().await {
            Some((state, _)) => Reply { ok: true, message: None, pid, state: serde_json::to_value(state).ok() },
            None => Reply { ok: false, message: Some("devloop is stopping".into()), pid, state: None },
        },
        Request::Trigger { service, pod, action } => {
            let (ok, message) = match hub.act(&service, pod.as_deref(), action).await {
                Ok(m) => (true, m),
                Err(m) => (false, m),
            };
            Reply { ok, message: Some(message), pid, state: None }
        }
    }
}

/// Sends one request to the devloop serving `path`, and reads its reply.
pub async fn request(path: &Path, req: &Request, timeout: Duration) -> io::Result<Reply> {
    let s = UnixStream::connect(path).await?;
    let (rd, mut wr) = s.into_split();
    let mut line = serde_json::to_vec(req).map_err(io::Error::other)?;
    line.push(b'\n');
    wr.write_all(&line).await?;
    let mut reply = String::new();
    let read = tokio::time::timeout(timeout, BufReader::new(rd).read_line(&mut reply)).await;
    match read {
        Ok(Ok(n)) if n > 0 => serde_json::from_str(&reply).map_err(io::Error::other),
        Ok(Err(e)) => Err(e),
        Ok(Ok(_)) => {
            Err(io::Error::new(io::ErrorKind::UnexpectedEof, "devloop closed the connection without answering"))
        }
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, format!("no answer within {timeout:?}"))),
    }
}

/// The client side: the reply, or an error that says what to do.
pub async fn ask(config: &Path, req: &Request) -> Result<Reply, ControlError> {
    let path = socket_path(config);
    let timeout = match req {
        Request::Status => STATUS_TIMEOUT,
        Request::Trigger { .. } => TRIGGER_TIMEOUT,
    };
    request(&path, req, timeout).await.map_err(|e| {
        let message = match e.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                format!("no devloop is running on {} (no answer on {})", config.display(), path.display())
            }
            _ => format!("cannot talk to devloop on {}: {e}", path.display()),
        };
        err(message, "start it with `devloop watch` (from the same devloop.yaml)")
    })
}

/// `devloop status`, for people: one line per session.
pub fn describe(state: &State, now_ms: u64) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    for (name, svc) in &state.services {
        let _ = writeln!(out, "{name}{}", svc.note.as_ref().map(|n| format!(" ({n})")).unwrap_or_default());
        for (pod, s) in &svc.sessions {
            let who = if pod.is_empty() { s.target.clone() } else { pod.clone() };
            let last = match &s.last_sync {
                Some(l) => format!(
                    "last sync {} files in {:.1} ms, {} ago",
                    l.files + l.deleted,
                    l.latency_ms,
                    crate::ui::view::ago(now_ms, l.at_ms)
                ),
                None => "no sync yet".into(),
            };
            let _ = writeln!(
                out,
                "  {who}: {}, {last}, {} pending, intercept {}, {} restarts{}",
                s.agent.label(),
                s.pending,
                s.intercept.label(),
                s.restarts,
                s.errors.back().map(|e| format!(", last error: {}", e.message)).unwrap_or_default()
            );
        }
    }
    if out.is_empty() {
        out.push_str("no service has reported yet\n");
    }
    out
}
