//! One service: a session for a local or exec target, or one per ready
//! pod for a Kubernetes target, followed through rollouts and
//! replacements. For a Kubernetes service that restarts the container's
//! own process, the restart wrapper on its workload is held by a guard
//! that restores it when the service is cancelled (a clean exit);
//! after a crash, `devloop down` or the next start restores it.

use crate::config::{KubeTarget, Service, Target};
use crate::endpoint::kubernetes::{self, Cluster};
use crate::endpoint::{workload, Endpoint};
use crate::events::{Kind, Reporter};
use crate::hub::{Action, Answer};
use crate::session::{run_session, Mode, Outcome, SessionSpec};
use crate::sync::Restart;
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

/// Runs a service until it is cancelled (or, for a one-shot sync, until
/// every session has synced once). Actions for it arrive on `actions`.
pub async fn run(
    svc: Service,
    mode: Mode,
    rep: Reporter,
    cancel: CancellationToken,
    actions: mpsc::Receiver<Action>,
) -> Outcome {
    if devloop_agent::fault::hit("session-panic") {
        panic!("fault injected: session-panic");
    }
    let watch = match mode {
        Mode::Watch => match Watch::new() {
            Ok(w) => Some(w),
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
    match (&svc.target, Endpoint::of(&svc.target)) {
        (_, Some(ep)) => {
            let restart = svc.app.as_ref().filter(|a| a.spec.is_some()).map(|_| Restart::Agent);
            let spec = SessionSpec { svc, mode, restart, watch };
            run_session(spec, ep, rep, cancel, actions).await
        }
        (Target::Kubernetes(k), None) => {
            let k = k.clone();
            let watcher = watch.map(|(w, _)| w);
            follow_pods(svc, k, mode, rep, cancel, actions, watcher).await
        }
        (_, None) => Outcome::Unreachable,
    }
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

/// One followed pod: how to stop its tasks, and to reach its session.
struct Pod {
    cancel: CancellationToken,
    actions: mpsc::Sender<Action>,
}

/// Keeps one session per ready pod: new pods (a rollout, a scale-up, a
/// replacement) get the agent and a sync by content; sessions of pods that
/// went away are stopped.
async fn follow_pods(
    svc: Service,
    k: KubeTarget,
    mode: Mode,
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
    let restart = match svc.app.as_ref() {
        Some(a) if a.spec.is_none() => Some(Restart::Command(workload::restart_command())),
        Some(_) => Some(Restart::Agent),
        None => None,
    };
    // Every pod's session and log stream, each under its pod's token.
    let mut tasks: Tasks<Outcome> = Tasks::new(cancel.child_token(), rep.clone());
    let mut pods: HashMap<String, Pod> = HashMap::new();
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
    // Stopped: every session closes its agent, then the workload is put
    // back.
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
