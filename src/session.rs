//! One service's life: start its agent, open a session, sync by content,
//! then follow changes; when the session is lost (agent killed, pod
//! restarted, link dropped), start again with backoff and resync by content.

use crate::client::{AgentClient, ClientError};
use crate::config::{KubeTarget, Service, Target};
use crate::events::{Kind, Reporter};
use crate::sync::{Engine, LiveEnd, SyncError};
use crate::target::kubernetes::{self, KubeError};
use crate::target::{self, workload, Endpoint, TargetError};
use crate::watch::Watch;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

const WATCH_HINT: &str = "check fs.inotify.max_user_instances";

/// How long a stopping agent gets to exit by itself before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// One-shot sync or follow changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Once,
    Watch,
}

/// How a service's run ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The target matched the source when devloop stopped (or, for
    /// `--once`, after the sync).
    InSync,
    /// Some paths failed to sync.
    PathErrors(usize),
    /// The agent could not be started or reached.
    Unreachable,
    /// Stopped by the user.
    Stopped,
    /// A task of devloop's panicked (a bug; reported as an error event).
    Panicked,
}

impl Outcome {
    /// What went wrong, for people (None when nothing did).
    pub fn describe(&self) -> Option<String> {
        match self {
            Outcome::InSync | Outcome::Stopped => None,
            Outcome::PathErrors(n) => Some(format!("{n} path(s) are not in sync (the errors above say which)")),
            Outcome::Unreachable => Some("the target could not be reached (the errors above say why)".into()),
            Outcome::Panicked => Some("devloop failed with an internal error (reported above)".into()),
        }
    }
}

/// The outcome of a joined session task; a panic is reported, with the
/// task's name and the panic's message, as an error event.
pub fn joined(rep: &Reporter, what: &str, r: Result<Outcome, tokio::task::JoinError>) -> Outcome {
    match r {
        Ok(o) => o,
        Err(e) if e.is_panic() => {
            let message = devloop_agent::index::panic_message(&*e.into_panic());
            rep.send(Kind::Error {
                message: format!("{what} panicked: {message}"),
                hint: Some("this is a bug in devloop: please report it with the lines above".into()),
            });
            Outcome::Panicked
        }
        Err(_) => Outcome::Stopped,
    }
}

/// A random session token (128 bits from the kernel).
pub fn new_token() -> String {
    use std::io::Read;
    let mut b = [0u8; 16];
    let ok = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)).is_ok();
    if !ok {
        // No /dev/urandom: fall back to time and pid, still unguessable
        // enough for a loopback-only, short-lived session.
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        b.copy_from_slice(&(t ^ (std::process::id() as u128) << 64).to_le_bytes());
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Runs a service: one session for a local or exec target, one per ready
/// pod for a Kubernetes target.
pub async fn run(svc: Service, mode: Mode, rep: Reporter, shutdown: watch::Receiver<bool>) -> Outcome {
    match (&svc.target, Endpoint::of(&svc.target)) {
        (_, Some(ep)) => run_endpoint(svc, ep, mode, rep, shutdown, None).await,
        (Target::Kubernetes(k), None) => {
            let k = k.clone();
            follow_pods(svc, k, mode, rep, shutdown).await
        }
        (_, None) => Outcome::Unreachable,
    }
}

/// How often the pods of a Kubernetes target are listed again.
const POD_POLL: Duration = Duration::from_secs(2);

/// Keeps one session per ready pod: new pods (a rollout, a scale-up, a
/// replacement) get the agent and a sync by content; sessions of pods that
/// went away are stopped.
async fn follow_pods(
    svc: Service,
    k: KubeTarget,
    mode: Mode,
    rep: Reporter,
    mut shutdown: watch::Receiver<bool>,
) -> Outcome {
    let fail = |e: kubernetes::KubeError| {
        rep.send(Kind::Error { message: crate::error::chain(&e), hint: e.hint() });
        Outcome::Unreachable
    };
    let cluster = match kubernetes::connect(&k).await {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let agent = match kubernetes::agent_image() {
        Ok(a) => Arc::new(a),
        Err(e) => return fail(e),
    };
    let wrapped = match mode {
        Mode::Watch => wrap_for_restarts(&svc, &k, &cluster, &rep).await,
        Mode::Once => None,
    };
    // One watcher for every pod's session.
    let hub = match mode {
        Mode::Watch => match Watch::new() {
            Ok((hub, _)) => Some(hub),
            Err(e) => {
                rep.send(Kind::Error {
                    message: format!("cannot start the file watcher: {e}"),
                    hint: Some(WATCH_HINT.into()),
                });
                return Outcome::Unreachable;
            }
        },
        Mode::Once => None,
    };
    // Per pod: how to stop its session, the session, and its log stream.
    let mut sessions: HashMap<String, PodSession> = HashMap::new();
    let mut waiting_said = false;
    loop {
        match kubernetes::ready_pods(&cluster, &k.pods).await {
            Ok(pods) => {
                if pods.is_empty() && !waiting_said {
                    rep.send(Kind::Warning {
                        message: format!(
                            "no ready pods for {} in namespace {}; waiting for one",
                            k.pods, cluster.namespace
                        ),
                    });
                    waiting_said = true;
                }
                for pod in &pods {
                    if sessions.contains_key(pod) {
                        continue;
                    }
                    waiting_said = false;
                    let pe = Arc::new(kubernetes::PodEndpoint {
                        cluster: cluster.clone(),
                        pod: pod.clone(),
                        container: k.container.clone(),
                        root: k.root.clone(),
                        agent: agent.clone(),
                        transport: k.transport,
                        helper_image: k.helper_image.clone(),
                        forward_refused: Default::default(),
                    });
                    let (stop, stop_rx) = watch::channel(false);
                    let prep = rep.for_part(pod);
                    let logs = (mode == Mode::Watch).then(|| kubernetes::follow_logs(pe.clone(), prep.clone()));
                    let sub = hub.as_ref().map(Watch::subscribe);
                    let task = tokio::spawn(run_endpoint(svc.clone(), Endpoint::Pod(pe), mode, prep, stop_rx, sub));
                    sessions.insert(pod.clone(), PodSession { stop, task, logs });
                }
                let gone: Vec<String> = sessions.keys().filter(|p| !pods.contains(p)).cloned().collect();
                for pod in gone {
                    if let Some(s) = sessions.remove(&pod) {
                        rep.send(Kind::Warning {
                            message: format!("pod {pod} is gone or not ready; stopped syncing it"),
                        });
                        s.end(&rep, &pod).await;
                    }
                }
            }
            Err(e) if mode == Mode::Once => return fail(e),
            Err(e) => {
                rep.send(Kind::Error { message: crate::error::chain(&e), hint: e.hint() });
            }
        }
        if mode == Mode::Once {
            if sessions.is_empty() {
                rep.send(Kind::Error {
                    message: format!("no ready pods for {} in namespace {}", k.pods, cluster.namespace),
                    hint: Some("check that the workload is running (and ready), and the target's namespace".into()),
                });
                return Outcome::Unreachable;
            }
            let mut worst = Outcome::InSync;
            for (pod, s) in sessions.drain() {
                let o = joined(&rep, &format!("the session of pod {pod}"), s.task.await);
                worst = worse(worst, o);
            }
            return worst;
        }
        tokio::select! {
            _ = tokio::time::sleep(POD_POLL) => {}
            _ = shutdown.changed() => {
                for s in sessions.values() {
                    let _ = s.stop.send(true);
                }
                for (pod, s) in sessions.drain() {
                    s.end(&rep, &pod).await;
                }
                if let Some(w) = &wrapped {
                    unwrap_on_exit(w, &cluster, &rep).await;
                }
                return Outcome::Stopped;
            }
        }
    }
}

/// Puts devloop's restart wrapper on the workload when the service
/// restarts the container's own process, or removes one a previous run
/// left when it no longer does. A failure is reported, and syncing goes on
/// (restarts then say they could not happen).
/// Returns the workload when the wrapper is in place (to be undone on exit).
async fn wrap_for_restarts(
    svc: &Service,
    k: &KubeTarget,
    cluster: &kubernetes::Cluster,
    rep: &Reporter,
) -> Option<workload::Workload> {
    let w = workload::Workload::of(&k.pods)?;
    let want = svc.app.as_ref().is_some_and(|a| a.restart && a.spec.is_none());
    let checked = match want {
        true => kubernetes::check_shell(cluster, &k.pods, k.container.as_deref()).await,
        false => Ok(()),
    };
    let done = match checked {
        Ok(()) => workload::reconcile(cluster, &w, k.container.as_deref(), want, rep).await,
        Err(e) => Err(e),
    };
    match done {
        Ok(workload::Done::Wrapped | workload::Done::Kept) => Some(w),
        Ok(_) => None,
        Err(e) => {
            rep.send(Kind::Error {
                message: format!("cannot set up restarts of {}: {}", w.describe(), crate::error::chain(&e)),
                hint: e.hint(),
            });
            None
        }
    }
}

/// Invariant 5: what devloop changed in the cluster is undone when it
/// exits. (After a crash, `devloop down` or the next start does it.)
async fn unwrap_on_exit(w: &workload::Workload, cluster: &kubernetes::Cluster, rep: &Reporter) {
    match workload::restore(cluster, w).await {
        Ok(Some(container)) => rep.send(Kind::WorkloadChanged {
            workload: w.describe(),
            change: format!(
                "container `{container}` restored to its own command; its pods roll out \
                 (`devloop down` also removes the wrapper's old ReplicaSet)"
            ),
        }),
        Ok(None) => {}
        Err(e) => rep.send(Kind::Error {
            message: format!("cannot restore {}: {}", w.describe(), crate::error::chain(&e)),
            hint: Some("run `devloop down` to restore it".into()),
        }),
    }
}

/// One followed pod.
struct PodSession {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Outcome>,
    logs: Option<tokio::task::JoinHandle<()>>,
}

impl PodSession {
    /// Stops the session (it closes its agent cleanly) and the log stream.
    async fn end(self, rep: &Reporter, pod: &str) {
        let _ = self.stop.send(true);
        joined(rep, &format!("the session of pod {pod}"), self.task.await);
        if let Some(l) = self.logs {
            l.abort();
        }
    }
}

fn worse(a: Outcome, b: Outcome) -> Outcome {
    let rank = |o: &Outcome| match o {
        Outcome::InSync | Outcome::Stopped => 0,
        Outcome::PathErrors(_) => 1,
        Outcome::Unreachable => 2,
        Outcome::Panicked => 3,
    };
    if rank(&b) > rank(&a) {
        b
    } else {
        a
    }
}

/// One session's life on one endpoint.
async fn run_endpoint(
    svc: Service,
    endpoint: Endpoint,
    mode: Mode,
    rep: Reporter,
    mut shutdown: watch::Receiver<bool>,
    subscription: Option<(Watch, tokio::sync::mpsc::Receiver<crate::watch::Change>)>,
) -> Outcome {
    if devloop_agent::fault::hit("session-panic") {
        panic!("fault injected: session-panic");
    }
    let (watcher, mut changes) = match (mode, subscription) {
        (Mode::Watch, Some((w, rx))) => (Some(w), Some(rx)),
        (Mode::Watch, None) => match Watch::new() {
            Ok((w, rx)) => (Some(w), Some(rx)),
            Err(e) => {
                rep.send(Kind::Error {
                    message: format!("cannot start the file watcher: {e}"),
                    hint: Some(WATCH_HINT.into()),
                });
                return Outcome::Unreachable;
            }
        },
        (Mode::Once, _) => (None, None),
    };
    let mut engine = Engine::new(svc, rep.clone(), watcher);
    let mut attempt: u32 = 0;
    // An agent that outlived its lost session (its port-forward dropped),
    // and its token: the next attempt reconnects to it before starting anew.
    let mut kept: Option<(target::Process, String)> = None;
    let mut via = String::new();
    loop {
        if *shutdown.borrow() {
            if let Some((p, _)) = kept.take() {
                p.stop(Duration::from_millis(500)).await;
            }
            return Outcome::Stopped;
        }
        let reopened = match kept.take() {
            Some((mut process, token)) => match process.reopen(&rep).await {
                Some(io) => Some((target::Started { io, process, via: String::new() }, token)),
                None => {
                    process.stop(Duration::from_millis(500)).await;
                    None
                }
            },
            None => None,
        };
        let (started, token) = match reopened {
            Some(r) => r,
            None => {
                let token = new_token();
                match target::start(&endpoint, &token, &rep).await {
                    Ok(s) => (s, token),
                    Err(e) => {
                        let fatal = match &e {
                            TargetError::AgentNotFound { .. } => true,
                            TargetError::Kubernetes(k) => matches!(
                                **k,
                                KubeError::NoStaticAgent { .. }
                                    | KubeError::Arch { .. }
                                    | KubeError::NoContainer { .. }
                            ),
                            _ => false,
                        };
                        rep.send(Kind::Error { message: crate::error::chain(&e), hint: e.hint() });
                        if fatal || mode == Mode::Once {
                            return Outcome::Unreachable;
                        }
                        if backoff(&rep, &mut attempt, &mut shutdown).await {
                            return Outcome::Stopped;
                        }
                        continue;
                    }
                }
            }
        };
        let process = started.process;
        if !started.via.is_empty() {
            via = started.via;
        }
        let link = match AgentClient::open(started.io, &token, rep.clone()).await {
            Ok(l) => l,
            Err(e) => {
                rep.send(Kind::Error { message: crate::error::chain(&e), hint: e.hint() });
                process.stop(Duration::from_millis(500)).await;
                if mode == Mode::Once || matches!(e, ClientError::Connect(_)) {
                    return Outcome::Unreachable;
                }
                if backoff(&rep, &mut attempt, &mut shutdown).await {
                    return Outcome::Stopped;
                }
                continue;
            }
        };
        rep.send(Kind::AgentConnected {
            agent_version: link.agent_version().to_string(),
            pid: link.pid(),
            root: link.root().to_string(),
            via: via.clone(),
        });
        let result = async {
            let errors = engine.initial_sync(&link).await?;
            link.configure_app(engine.service().app.as_ref().and_then(|a| a.spec.clone()));
            if mode == Mode::Once {
                return Ok(if errors == 0 { Outcome::InSync } else { Outcome::PathErrors(errors) });
            }
            attempt = 0;
            release_freed_memory();
            // Watch mode always has a change receiver.
            let changes = changes.as_mut().expect("watch mode");
            match engine.live(&link, changes, &mut shutdown).await? {
                LiveEnd::Shutdown => Ok(Outcome::Stopped),
                LiveEnd::Lost(r) => Err(ClientError::Lost(r).into()),
            }
        }
        .await;
        match result {
            Ok(outcome) => {
                link.close();
                drop(link);
                process.stop(STOP_GRACE).await;
                return outcome;
            }
            Err(SyncError::Scan(e)) => {
                // Nothing was sent or deleted; the agent is fine. Start over
                // (a passing cause, such as a thread that could not start,
                // clears up); in a one-shot sync the target is not in sync.
                rep.send(Kind::Error {
                    message: format!("cannot sync: {e}; nothing was sent or deleted"),
                    hint: Some("devloop tries again; if this repeats, it is a bug in devloop: please report it".into()),
                });
                link.close();
                drop(link);
                process.stop(STOP_GRACE).await;
                if mode == Mode::Once {
                    return Outcome::PathErrors(1);
                }
                if backoff(&rep, &mut attempt, &mut shutdown).await {
                    return Outcome::Stopped;
                }
            }
            Err(SyncError::Client(e)) => {
                rep.send(Kind::AgentLost { reason: crate::error::chain(&e) });
                drop(link);
                if mode == Mode::Once {
                    process.stop(Duration::from_millis(500)).await;
                    return Outcome::Unreachable;
                }
                // The agent may still be there (only the way to it broke):
                // the next attempt tries to reach it again, then resyncs by
                // content, so nothing that changed meanwhile is lost.
                kept = Some((process, token));
                if backoff(&rep, &mut attempt, &mut shutdown).await {
                    return Outcome::Stopped;
                }
            }
        }
    }
}

/// Waits before the next attempt (200 ms doubling to 5 s). Returns true
/// when shutdown was requested meanwhile.
/// Hands memory freed after a first sync back to the system. The scan,
/// hashing and archive buffers of a large tree are gone by then, but glibc
/// keeps freed heap (in each thread's arena) for reuse, and a watcher that
/// then idles for hours would hold it all that time.
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free heap pages to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}

async fn backoff(rep: &Reporter, attempt: &mut u32, shutdown: &mut watch::Receiver<bool>) -> bool {
    *attempt += 1;
    let ms = (200u64 << (*attempt - 1).min(5)).min(5000);
    rep.send(Kind::Reconnecting { attempt: *attempt, in_ms: ms });
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_millis(ms)) => *shutdown.borrow(),
        _ = shutdown.changed() => true,
    }
}
