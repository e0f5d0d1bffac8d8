//! Processes the agent runs: post-sync commands and the app.
//!
//! The app runs in its own process group so that a restart stops everything
//! it started (`npm start` → `node`), with SIGTERM, then SIGKILL after its
//! grace period. One manager task owns the app; sessions talk to it through
//! [`AppHandle`] and hear from it through a broadcast of control messages.

use devloop_agent::paths;
use devloop_agent::protocol::{AppSpec, AppState, CommandSpec, Control, OutputSource, StdStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{broadcast, mpsc, oneshot};

/// Longest output line passed on; the rest of a longer line is cut.
const MAX_LINE: usize = 8 << 10;

/// Builds the process for a command spec, in its working directory.
fn command(root: &Path, spec: &CommandSpec) -> Result<Command, String> {
    let dir = if spec.workdir.is_empty() {
        root.to_path_buf()
    } else {
        paths::join(root, spec.workdir.as_bytes()).map_err(|e| format!("workdir `{}`: {e}", spec.workdir))?
    };
    let mut cmd = match (&spec.shell, spec.argv.split_first()) {
        (Some(sh), _) => {
            let mut c = Command::new("sh");
            c.arg("-c").arg(sh);
            c
        }
        (None, Some((prog, args))) => {
            let mut c = Command::new(prog);
            c.args(args);
            c
        }
        (None, None) => return Err("empty command".into()),
    };
    cmd.current_dir(dir).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
    Ok(cmd)
}

/// Forwards a child's output, line by line, as `Output` messages.
fn pump<R: AsyncRead + Unpin + Send + 'static>(
    r: R,
    source: OutputSource,
    stream: StdStream,
    send: impl Fn(Control) + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut r = BufReader::new(r);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    while buf.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                        buf.pop();
                    }
                    buf.truncate(MAX_LINE);
                    let line = String::from_utf8_lossy(&buf).into_owned();
                    send(Control::Output { source: source.clone(), stream, line });
                }
            }
        }
    })
}

/// Runs post-sync commands one after another, reporting each start, output
/// line and exit through `send`. Stops at the first failure: later commands
/// usually depend on earlier ones (`npm install` before `npm run build`).
pub async fn run_commands(
    root: &Path,
    batch: u64,
    cmds: &[CommandSpec],
    send: impl Fn(Control) + Clone + Send + 'static,
) -> bool {
    for spec in cmds {
        let shown = spec.display();
        send(Control::CommandStarted { batch, command: shown.clone() });
        let t0 = Instant::now();
        let code = match command(root, spec).and_then(|mut c| c.spawn().map_err(|e| format!("cannot start: {e}"))) {
            Ok(mut child) => {
                let src = OutputSource::Command { batch, command: shown.clone() };
                let a = child.stdout.take().map(|o| pump(o, src.clone(), StdStream::Stdout, send.clone()));
                let b = child.stderr.take().map(|o| pump(o, src, StdStream::Stderr, send.clone()));
                let status = child.wait().await;
                for h in [a, b].into_iter().flatten() {
                    let _ = h.await;
                }
                status.ok().and_then(|s| s.code())
            }
            Err(e) => {
                send(Control::Output {
                    source: OutputSource::Command { batch, command: shown.clone() },
                    stream: StdStream::Stderr,
                    line: e,
                });
                Some(127)
            }
        };
        send(Control::CommandExited { batch, command: shown, code, ms: t0.elapsed().as_millis() as u64 });
        if code != Some(0) {
            return false;
        }
    }
    true
}

enum AppCmd {
    Configure(Option<AppSpec>),
    Restart,
    Exited { generation: u64, code: Option<i32> },
    Shutdown(oneshot::Sender<()>),
}

/// Talks to the app manager task.
#[derive(Clone)]
pub struct AppHandle {
    tx: mpsc::UnboundedSender<AppCmd>,
    events: broadcast::Sender<Control>,
}

impl AppHandle {
    pub fn configure(&self, spec: Option<AppSpec>) {
        let _ = self.tx.send(AppCmd::Configure(spec));
    }
    pub fn restart(&self) {
        let _ = self.tx.send(AppCmd::Restart);
    }
    /// The app's state changes and output, for one session.
    pub fn subscribe(&self) -> broadcast::Receiver<Control> {
        self.events.subscribe()
    }
    /// Stops the app (if any) and waits until it is gone.
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(AppCmd::Shutdown(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

/// The process group of an app the agent started: the leader's pid,
/// known to be a real process of ours (never 0, which would mean "my own
/// group" to kill(2), nor 1). Only [`Pgid::of`] makes one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pgid(libc::pid_t);

impl Pgid {
    /// The group of a child started with `process_group(0)` (its pid is
    /// its group id), if its pid is known and is one the agent may signal.
    pub fn of(pid: Option<u32>) -> Option<Pgid> {
        let pid = libc::pid_t::try_from(pid?).ok()?;
        (pid > 1).then_some(Pgid(pid))
    }

    /// Signals every process of the group. Callers keep the leader
    /// unreaped until their last signal (see [`launch`]): a zombie leader
    /// holds its pid, so the group id cannot have passed to anyone else.
    fn signal(self, sig: libc::c_int) {
        // SAFETY: kill(2) has no memory effects; the group id is > 1, so
        // this never means "my own group" (0) or "every process" (-1).
        unsafe { libc::kill(-self.0, sig) };
    }
}

struct Running {
    pgid: Option<Pgid>,
    generation: u64,
    /// The leader exited by itself (reported); its group may live on.
    leader_gone: bool,
    /// Fires when the leader has exited (it is then a zombie, not reaped).
    exited: oneshot::Receiver<()>,
    /// Dropped when nothing will signal the group any more: the leader
    /// is then reaped.
    _release: oneshot::Sender<()>,
}

/// Starts the manager task for the app under `root`.
pub fn start_app_manager(root: PathBuf) -> AppHandle {
    let (tx, mut rx) = mpsc::unbounded_channel::<AppCmd>();
    let (events, _) = broadcast::channel(1024);
    let handle = AppHandle { tx: tx.clone(), events: events.clone() };
    tokio::spawn(async move {
        let mut spec: Option<AppSpec> = None;
        let mut running: Option<Running> = None;
        let mut generation = 0u64;
        let emit = move |c: Control| {
            let _ = events.send(c);
        };
        while let Some(cmd) = rx.recv().await {
            match cmd {
                AppCmd::Configure(new) => {
                    if new == spec && running.as_ref().is_some_and(|r| !r.leader_gone) {
                        continue;
                    }
                    stop(running.take(), spec.as_ref(), &emit).await;
                    spec = new;
                    if let Some(s) = &spec {
                        generation += 1;
                        running = launch(&root, s, generation, tx.clone(), &emit);
                    }
                }
                AppCmd::Restart => {
                    if let Some(s) = &spec {
                        stop(running.take(), Some(s), &emit).await;
                        generation += 1;
                        running = launch(&root, s, generation, tx.clone(), &emit);
                    }
                }
                AppCmd::Exited { generation: g, code } => {
                    // Kept (its leader unreaped) until the next restart or
                    // shutdown: what the app left running in its group is
                    // stopped then, as a restart promises.
                    if let Some(r) = running.as_mut().filter(|r| r.generation == g) {
                        r.leader_gone = true;
                        emit(Control::App { state: AppState::Exited { code } });
                    }
                }
                AppCmd::Shutdown(done) => {
                    stop(running.take(), spec.as_ref(), &emit).await;
                    let _ = done.send(());
                    break;
                }
            }
        }
    });
    handle
}

fn launch(
    root: &Path,
    spec: &AppSpec,
    generation: u64,
    back: mpsc::UnboundedSender<AppCmd>,
    emit: &(impl Fn(Control) + Clone + Send + 'static),
) -> Option<Running> {
    let child: Result<Child, String> = command(root, &spec.command).and_then(|mut c| {
        c.envs(spec.env.iter().map(|(k, v)| (k, v)));
        c.spawn().map_err(|e| format!("cannot start `{}`: {e}", spec.command.display()))
    });
    let mut child = match child {
        Ok(c) => c,
        Err(message) => {
            emit(Control::App { state: AppState::FailedToStart { message } });
            return None;
        }
    };
    let pid = child.id();
    let pgid = Pgid::of(pid);
    emit(Control::App { state: AppState::Started { pid: pid.unwrap_or(0) } });
    let e1 = emit.clone();
    let e2 = emit.clone();
    let out = child.stdout.take().map(|o| pump(o, OutputSource::App, StdStream::Stdout, e1));
    let err = child.stderr.take().map(|o| pump(o, OutputSource::App, StdStream::Stderr, e2));
    let (done_tx, done_rx) = oneshot::channel();
    let (release, released) = oneshot::channel::<()>();
    tokio::spawn(async move {
        // Wait for the leader to exit without reaping it: until it is
        // reaped its pid cannot be reused, so signals to its group still
        // reach only what the app started.
        let code = match pid {
            Some(pid) => tokio::task::spawn_blocking(move || exit_code_unreaped(pid)).await.ok().flatten(),
            None => None,
        };
        for h in [out, err].into_iter().flatten() {
            // Output after the leader exits may come from the rest of the
            // group; give it a moment, then move on.
            let _ = tokio::time::timeout(Duration::from_millis(200), h).await;
        }
        let _ = done_tx.send(());
        let _ = back.send(AppCmd::Exited { generation, code });
        // Reaped once no signal to the group can follow.
        let _ = released.await;
        let _ = child.wait().await;
    });
    Some(Running { pgid, generation, leader_gone: false, exited: done_rx, _release: release })
}

/// Blocks until process `pid` (a child) has exited, and returns its exit
/// code, leaving it unreaped (`WNOWAIT`).
fn exit_code_unreaped(pid: u32) -> Option<i32> {
    loop {
        // SAFETY: siginfo_t is plain data; all-zero is a valid value.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid writes only into `info`, which outlives the call.
        let r = unsafe { libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, libc::WEXITED | libc::WNOWAIT) };
        if r == 0 {
            // SAFETY: after a successful waitid with WEXITED, si_code and
            // si_status describe the child's exit.
            let (code, status) = (info.si_code, unsafe { info.si_status() });
            return (code == libc::CLD_EXITED).then_some(status);
        }
        if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return None;
        }
    }
}

async fn stop(running: Option<Running>, spec: Option<&AppSpec>, emit: &impl Fn(Control)) {
    let Some(mut r) = running else { return };
    let grace = Duration::from_millis(spec.map_or(2000, |s| s.grace_ms));
    if let Some(pg) = r.pgid {
        pg.signal(libc::SIGTERM);
        if tokio::time::timeout(grace, &mut r.exited).await.is_err() {
            pg.signal(libc::SIGKILL);
            let _ = (&mut r.exited).await;
        }
        // Stragglers of the group that ignored SIGTERM. The leader is a
        // zombie now, not reaped: the group id is still the app's.
        pg.signal(libc::SIGKILL);
    } else {
        // No group it may signal (its pid was never known): wait for it
        // to end by itself, a while.
        let _ = tokio::time::timeout(grace, &mut r.exited).await;
    }
    let report = !r.leader_gone;
    // Dropping `r` lets the leader be reaped.
    drop(r);
    if report {
        emit(Control::App { state: AppState::Stopped });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Group 0 is the agent's own group to kill(2), and 1 is init (and
    /// -1 would be everyone): none of them is ever an app's group.
    #[test]
    fn only_a_started_process_is_a_group_to_signal() {
        assert_eq!(Pgid::of(None), None);
        assert_eq!(Pgid::of(Some(0)), None);
        assert_eq!(Pgid::of(Some(1)), None);
        assert_eq!(Pgid::of(Some(u32::MAX)), None, "does not wrap to a negative pid");
        assert_eq!(Pgid::of(Some(4242)), Some(Pgid(4242)));
    }
}
