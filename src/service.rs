//! One service: a session for a local or exec target, or one per ready
//! pod for a Kubernetes target, followed through rollouts and
//! replacements. For a Kubernetes service that restarts the container's
//! own process, the restart wrapper on its workload is held by a guard
//! that restores it when the service is cancelled (a clean exit);
//! after a crash, `devloop down` or the next start restores it.

use crate::config::{KubeTarget, Service, Target};
use crate::endpoint::kubernetes::{self, Cluster};
use crate::endpoint::{forwarder, steer, workload, Endpoint};
use crate::events::{Kind, Reporter};
use crate::hub::{Action, Answer};
use crate::session::{run_session, Mode, Outcome, SessionSpec};
use crate::sync::{Restart, Shelf};
use crate::tasks::Tasks;
use crate::watch::Watch;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

const WATCH_HINT: &str = "check fs.inotify.max_user_instances";

/// How often the pods of a Kubernetes target are listed again.
const POD_POLL: Duration = Duration::from_secs(2);

/// What a service's sessions do: sync (not for `devloop intercept`), and
/// intercept (when the service has `intercept:` and this is not a
/// one-shot sync).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Work {
    pub sync: bool,
    pub intercept: bool,
}

/// Runs a service until it is cancelled (or, for a one-shot sync, until
/// every session has synced once). Actions for it arrive on `actions`.
pub async fn run(
    svc: Service,
    mode: Mode,
    work: Work,
    rep: Reporter,
    cancel: CancellationToken,
    actions: mpsc::Receiver<Action>,
) -> Outcome {
    if devloop_agent::fault::hit("session-panic") {
        panic!("fault injected: session-panic");
    }
    let watch = match (mode, work.sync) {
        (Mode::Watch, true) => match Watch::new() {
            Ok(w) => Some(w),
            Err(e) => {
                rep.send(Kind::Error {
                    message: format!("cannot start the file watcher: {e}"),
                    hint: Some(WATCH_HINT.into()),
                });
                return Outcome::Unreachable;
            }
        },
        _ => None,
    };
    match (&svc.target, Endpoint::of(&svc.target)) {
        (target, Some(ep)) => {
            let restart = svc.app.as_ref().filter(|a| a.spec.is_some()).map(|_| Restart::Agent);
            // The local target's intercept: its forwarder first, held by a
            // guard that stops it on a clean exit.
            let local = match (target, work.intercept) {
                (Target::Local { root }, true) => match local_intercept(&svc, root, &rep).await {
                    Ok(x) => Some(x),
                    Err(e) => {
                        rep.send(Kind::Error { message: crate::error::chain(&e), hint: e.hint() });
                        return Outcome::Unreachable;
                    }
                },
                _ => None,
            };
            let (intercept, guard) = match local {
                Some((plan, guard)) => (Some(plan), Some(guard)),
                None => (None, None),
            };
            let spec = SessionSpec { svc, mode, restart, watch, sync: work.sync, intercept, shelf: Shelf::default() };
            let outcome = run_session(spec, ep, rep, cancel, actions).await;
            if let Some(g) = guard {
                g.release();
            }
            outcome
        }
        (Target::Kubernetes(k), None) => {
            let k = k.clone();
            let watcher = watch.map(|(w, _)| w);
            follow_pods(svc, k, mode, work, rep, cancel, actions, watcher).await
        }
        (_, None) => Outcome::Unreachable,
    }
}

/// The forwarder of a local target's intercept, to be stopped.
struct ForwarderGuard {
    record: std::path::PathBuf,
    rep: Reporter,
    armed: bool,
}

impl ForwarderGuard {
    /// Undone on a clean exit: nothing devloop started keeps running.
    fn release(mut self) {
        self.armed = false;
        if forwarder::stop(&self.record) {
            self.rep
                .send(Kind::InterceptOff { reason: "devloop stopped, and with it the intercept's forwarder".into() });
        }
    }
}

impl Drop for ForwarderGuard {
    fn drop(&mut self) {
        // Only when the service ended without a clean exit: the forwarder
        // keeps sending calls to the fallback; the next start or `down`
        // stops it.
        if self.armed {
            self.rep.send(Kind::Warning {
                message:
                    "the intercept's forwarder keeps running (calls go to the fallback): run `devloop down` to stop it"
                        .into(),
            });
        }
    }
}

/// Starts (or keeps) the forwarder of a local target's intercept, and
/// returns what its agent must hold.
async fn local_intercept(
    svc: &Service,
    root: &std::path::Path,
    rep: &Reporter,
) -> Result<(crate::intercept::Plan, ForwarderGuard), crate::endpoint::TargetError> {
    use devloop_agent::protocol::{HeaderMatch, InterceptPort};
    // Validated with the config: a local target's intercept has `listen`
    // and numbered ports.
    let i = svc.intercept.as_ref().expect("an intercept");
    let ip = i.listen.unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
    let record = forwarder::record_path(root);
    let old = forwarder::read_record(&record);
    let (mut routes, mut claims, mut ports, mut local) = (Vec::new(), Vec::new(), Vec::new(), HashMap::new());
    let app = i.fallback.map(|f| f.to_string());
    for p in &i.ports {
        let crate::config::PortRef::Number(port) = p.service else { continue };
        let kept = old.as_ref().and_then(|o| o.claims.iter().find(|(s, _)| *s == port).map(|(_, c)| *c));
        let claim = match kept {
            Some(c) => c,
            None => forwarder::free_port()
                .map_err(|source| crate::endpoint::TargetError::Spawn { command: "a free port".into(), source })?,
        };
        let listen = std::net::SocketAddr::new(ip, port);
        routes.push(format!("{listen}={}+127.0.0.1:{claim}", app.as_deref().unwrap_or("-")));
        claims.push((port, claim));
        ports.push(InterceptPort { port, listen: format!("127.0.0.1:{claim}"), app: app.clone() });
        local.insert(port, p.local);
    }
    forwarder::ensure(&record, routes, claims).await?;
    let plan = crate::intercept::Plan {
        ports,
        local,
        header: i.header.clone().map(|(name, value)| HeaderMatch { name, value }),
        lease_ms: i.lease_ms,
    };
    Ok((plan, ForwarderGuard { record, rep: rep.clone(), armed: true }))
}

/// The restart wrapper devloop put on a workload, to be undone.
struct WrapperGuard {
    workload: workload::Workload,
    cluster: Cluster,
    rep: Reporter,
    armed: bool,
}

impl WrapperGuard {
    /// Invariant 5: what devloop changed in the cluster is undone when it
    /// exits.
    async fn restore(mut self) {
        self.armed = false;
        let w = &self.workload;
        match workload::restore(&self.cluster, w).await {
            Ok(Some(container)) => self.rep.send(Kind::WorkloadChanged {
                workload: w.describe(),
                change: format!(
                    "container `{container}` restored to its own command; its pods roll out \
                     (`devloop down` also removes the wrapper's old ReplicaSet)"
                ),
            }),
            Ok(None) => {}
            Err(e) => self.rep.send(Kind::Error {
                message: format!("cannot restore {}: {}", w.describe(), crate::error::chain(&e)),
                hint: Some("run `devloop down` to restore it".into()),
            }),
        }
    }
}

impl Drop for WrapperGuard {
    fn drop(&mut self) {
        // Only when the service ended without a clean exit (it panicked):
        // the cluster keeps working (the wrapper runs the app as before),
        // and the next start or `down` restores the workload.
        if self.armed {
            self.rep.send(Kind::Warning {
                message: format!(
                    "{} keeps devloop's restart wrapper: run `devloop down` to restore it",
                    self.workload.describe()
                ),
            });
        }
    }
}

/// Puts devloop's restart wrapper on the workload when the service
/// restarts the container's own process, or removes one a previous run
/// left when it no longer does. A failure is reported, and syncing goes on
/// (restarts then say they could not happen).
async fn wrap_for_restarts(svc: &Service, k: &KubeTarget, cluster: &Cluster, rep: &Reporter) -> Option<WrapperGuard> {
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
        Ok(workload::Done::Wrapped | workload::Done::Kept) => {
            Some(WrapperGuard { workload: w, cluster: cluster.clone(), rep: rep.clone(), armed: true })
        }
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

/// The intercept's changes to a workload and its Service, to be undone.
struct SteerGuard {
    workload: workload::Workload,
    cluster: Cluster,
    rep: Reporter,
    armed: bool,
}

impl SteerGuard {
    /// Invariant 5: undone when devloop exits, the Service first.
    async fn restore(mut self) {
        self.armed = false;
        if let Err(e) = steer::restore(&self.cluster, &self.workload, &self.rep).await {
            self.rep.send(Kind::Error {
                message: format!(
                    "cannot undo the intercept on {}: {}",
                    self.workload.describe(),
                    crate::error::chain(&e)
                ),
                hint: Some(
                    "run `devloop down` to undo it (meanwhile the forwarder hands every call to the app)".into(),
                ),
            });
        }
    }
}

impl Drop for SteerGuard {
    fn drop(&mut self) {
        // Only when the service ended without a clean exit: the forwarder
        // hands every call to the app; `down` or the next start undoes it.
        if self.armed {
            self.rep.send(Kind::Warning {
                message: format!(
                    "{} keeps the intercept's forwarder (calls go to the app): run `devloop down` to remove it",
                    self.workload.describe()
                ),
            });
        }
    }
}

/// Sets up the intercept on the workload (the forwarder in its pods) and
/// returns what each pod's agent must hold; the Service is steered by
/// [`steer_when_rolled_out`] once the pods have the forwarder.
async fn steer_workload(
    svc: &Service,
    k: &KubeTarget,
    cluster: &Cluster,
    rep: &Reporter,
) -> Result<(SteerGuard, steer::Record), kubernetes::KubeError> {
    // Validated with the config: an intercept on Kubernetes names a
    // workload.
    let w = workload::Workload::of(&k.pods).expect("a workload");
    let i = svc.intercept.as_ref().expect("an intercept");
    let record = steer::resolve(cluster, &w, k.container.as_deref(), i).await?;
    let forwarder = steer::forwarder_binary()?;
    steer::apply(cluster, &w, k.container.as_deref(), &record, &forwarder, rep).await?;
    Ok((SteerGuard { workload: w, cluster: cluster.clone(), rep: rep.clone(), armed: true }, record))
}

/// Steers the Service once the workload's pods have the forwarder.
async fn steer_when_rolled_out(cluster: Cluster, w: workload::Workload, record: steer::Record, rep: Reporter) {
    let done = match steer::rolled_out(&cluster, &w, steer::ROLLOUT_TIMEOUT, &rep).await {
        Ok(()) => steer::steer_service(&cluster, &w, &record, &rep).await.map(drop),
        Err(e) => Err(e),
    };
    if let Err(e) = done {
        rep.send(Kind::Error {
            message: format!("cannot steer service/{} to devloop: {}", record.service, crate::error::chain(&e)),
            hint: e.hint(),
        });
    }
}

/// A start that does not intercept undoes what a previous run's
/// intercept left on the workload (a crash, or a config that changed).
async fn undo_left_intercept(k: &KubeTarget, cluster: &Cluster, rep: &Reporter) {
    let Some(w) = workload::Workload::of(&k.pods) else { return };
    match w.get(cluster).await {
        Ok((annotations, _)) if annotations.contains_key(steer::ANNOTATION) => {}
        _ => return,
    }
    if let Err(e) = steer::restore(cluster, &w, rep).await {
        rep.send(Kind::Error {
            message: format!("cannot undo a previous intercept on {}: {}", w.describe(), crate::error::chain(&e)),
            hint: Some("run `devloop down`".into()),
        });
    }
}

/// One followed pod: how to stop its tasks, and to reach its session.
struct Pod {
    cancel: CancellationToken,
    actions: mpsc::Sender<Action>,
}

/// Keeps one session per ready pod: new pods (a rollout, a scale-up, a
/// replacement) get the agent and a sync by content; sessions of pods that
/// went away are stopped.
#[allow(clippy::too_many_arguments)]
async fn follow_pods(
    svc: Service,
    k: KubeTarget,
    mode: Mode,
    work: Work,
    rep: Reporter,
    cancel: CancellationToken,
    mut actions: mpsc::Receiver<Action>,
    watcher: Option<Watch>,
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
    let guard = match mode {
        Mode::Watch => wrap_for_restarts(&svc, &k, &cluster, &rep).await,
        Mode::Once => None,
    };
    // The intercept: the forwarder into the pod template now, the Service
    // once the pods have it (a task of its own: sessions start meanwhile).
    let mut steering: Option<(SteerGuard, tokio::task::JoinHandle<()>)> = None;
    let mut intercept = None;
    match (mode, work.intercept) {
        (Mode::Watch, true) => match steer_workload(&svc, &k, &cluster, &rep).await {
            Ok((g, record)) => {
                intercept = svc.intercept.as_ref().map(|i| steer::plan(&record, i));
                let task =
                    tokio::spawn(steer_when_rolled_out(cluster.clone(), g.workload.clone(), record, rep.clone()));
                steering = Some((g, task));
            }
            Err(e) => {
                rep.send(Kind::Error {
                    message: format!("cannot intercept: {}", crate::error::chain(&e)),
                    hint: e.hint(),
                });
                if !work.sync {
                    return Outcome::Unreachable;
                }
            }
        },
        (Mode::Watch, false) => undo_left_intercept(&k, &cluster, &rep).await,
        (Mode::Once, _) => {}
    }
    let restart = match svc.app.as_ref() {
        Some(a) if a.spec.is_none() => Some(Restart::Command(workload::restart_command())),
        Some(_) => Some(Restart::Agent),
        None => None,
    };
    // Every pod's session and log stream, each under its pod's token.
    let mut tasks: Tasks<Outcome> = Tasks::new(cancel.child_token(), rep.clone());
    let mut pods: HashMap<String, Pod> = HashMap::new();
    // The pods' sessions share the model of the tree they hold alike.
    let shelf = Shelf::default();
    let mut waiting_said = false;
    let mut worst = Outcome::InSync;
    let mut poll = tokio::time::interval(POD_POLL);
    loop {
        tokio::select! {
            _ = poll.tick() => {}
            _ = cancel.cancelled() => break,
            Some(a) = actions.recv() => {
                fan_out(a, &pods);
                continue;
            }
            Some((_, o)) = tasks.next(), if !tasks.is_empty() => {
                worst = worst.worse(o.unwrap_or(Outcome::Panicked));
                continue;
            }
        }
        match kubernetes::ready_pods(&cluster, &k.pods).await {
            Ok(ready) => {
                if ready.is_empty() && !waiting_said {
                    rep.send(Kind::Warning {
                        message: format!(
                            "no ready pods for {} in namespace {}; waiting for one",
                            k.pods, cluster.namespace
                        ),
                    });
                    waiting_said = true;
                }
                for pod in &ready {
                    if pods.contains_key(pod) {
                        continue;
                    }
                    waiting_said = false;
                    let pe = Arc::new(kubernetes::PodEndpoint::new(cluster.clone(), pod, &k, agent.clone()));
                    let pod_cancel = tasks.token().child_token();
                    let prep = rep.for_pod(pod);
                    if mode == Mode::Watch {
                        let (pe, prep, c) = (pe.clone(), prep.clone(), pod_cancel.clone());
                        tasks.spawn(format!("the log of pod {pod}"), async move {
                            kubernetes::follow_logs(pe, prep, c).await;
                            Outcome::Stopped
                        });
                    }
                    let (atx, arx) = mpsc::channel(16);
                    let spec = SessionSpec {
                        svc: svc.clone(),
                        mode,
                        restart: restart.clone(),
                        watch: watcher.as_ref().map(Watch::subscribe),
                        sync: work.sync,
                        intercept: intercept.clone(),
                        shelf: shelf.clone(),
                    };
                    tasks.spawn(
                        format!("the session of pod {pod}"),
                        run_session(spec, Endpoint::Pod(pe), prep, pod_cancel.clone(), arx),
                    );
                    pods.insert(pod.clone(), Pod { cancel: pod_cancel, actions: atx });
                }
                let gone: Vec<String> = pods.keys().filter(|p| !ready.contains(p)).cloned().collect();
                for pod in gone {
                    if let Some(p) = pods.remove(&pod) {
                        rep.send(Kind::Warning {
                            message: format!("pod {pod} is gone or not ready; stopped syncing it"),
                        });
                        p.cancel.cancel();
                    }
                }
            }
            Err(e) if mode == Mode::Once => return fail(e),
            Err(e) => rep.send(Kind::Error { message: crate::error::chain(&e), hint: e.hint() }),
        }
        if mode == Mode::Once {
            if pods.is_empty() {
                rep.send(Kind::Error {
                    message: format!("no ready pods for {} in namespace {}", k.pods, cluster.namespace),
                    hint: Some("check that the workload is running (and ready), and the target's namespace".into()),
                });
                return Outcome::Unreachable;
            }
            while let Some((_, o)) = tasks.next().await {
                worst = worst.worse(o.unwrap_or(Outcome::Panicked));
            }
            return worst;
        }
    }
    // Stopped: the Service goes back to the app first, then every session
    // closes its agent, then the workload is put back.
    if let Some((g, task)) = steering {
        task.abort();
        let _ = task.await;
        g.restore().await;
    }
    for (_, o) in tasks.shutdown().await {
        worst = worst.worse(o.unwrap_or(Outcome::Panicked));
    }
    if let Some(g) = guard {
        g.restore().await;
    }
    match worst {
        Outcome::InSync => Outcome::Stopped,
        w => w,
    }
}

/// Hands an action to the pod it names, or to every pod, and answers with
/// what each said.
fn fan_out(a: Action, pods: &HashMap<String, Pod>) {
    let Action { pod, kind, reply } = a;
    let targets: Vec<(&String, &Pod)> = match &pod {
        Some(name) => match pods.get_key_value(name) {
            Some(p) => vec![p],
            None => {
                let known: Vec<&str> = pods.keys().map(String::as_str).collect();
                let _ = reply.send(Err(format!("no session for pod {name} (pods: {})", known.join(", "))));
                return;
            }
        },
        None => pods.iter().collect(),
    };
    if targets.is_empty() {
        let _ = reply.send(Err("no pod is being synced yet (waiting for a ready pod)".into()));
        return;
    }
    let mut answers = Vec::new();
    for (name, p) in targets {
        let (tx, rx) = oneshot::channel();
        let sent = p.actions.try_send(Action { pod: Some(name.clone()), kind: kind.clone(), reply: tx });
        answers.push((name.clone(), sent.is_ok(), rx));
    }
    tokio::spawn(async move {
        let mut lines = Vec::new();
        let mut all_ok = true;
        for (name, sent, rx) in answers {
            let a: Answer = match sent {
                true => rx.await.unwrap_or_else(|_| Err("its session ended".into())),
                false => Err("its session is busy or stopped".into()),
            };
            all_ok &= a.is_ok();
            lines.push(match a {
                Ok(m) => format!("{name}: {m}"),
                Err(m) => format!("{name}: failed: {m}"),
            });
        }
        let text = lines.join("; ");
        let _ = reply.send(if all_ok { Ok(text) } else { Err(text) });
    });
}
