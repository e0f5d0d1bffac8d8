//! The restart wrapper: how devloop restarts a container's own process
//! after a sync without the container restarting (which would discard its
//! writable layer, and the synced files with it).
//!
//! devloop patches the Deployment's (or StatefulSet's) pod template so the
//! container runs its original command under a small `sh` loop, PID 1 of
//! the container, that restarts the command on SIGHUP and otherwise exits
//! with it (so crashes still restart the container, as before). The
//! original `command`/`args` are recorded in the annotation
//! [`ANNOTATION`] on the workload; `devloop down`, and the next start of a
//! devloop whose config no longer asks for restarts, put them back. A
//! start that finds the wrapper already there (a crash of the previous
//! run) keeps it instead of wrapping it twice.

use super::kubernetes::{api_err, exec_output, ready_pods, Cluster, KubeError};
use crate::config::PodSelector;
use crate::events::{Kind, Reporter};
use devloop_agent::protocol::CommandSpec;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::core::v1::PodTemplateSpec;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Where the original command is recorded.
pub const ANNOTATION: &str = "devloop.dev/restart-wrapper";

/// `$0` of the wrapper: how it is recognised in a process list.
const WRAPPER_NAME: &str = "devloop-restart";

/// Where the wrapper writes its PID (its own container's /tmp): the
/// restart command signals that process and nothing else, so a container
/// without the wrapper is never sent a SIGHUP it would die of.
const PID_FILE: &str = "/tmp/devloop-restart-wrapper.pid";

/// The wrapper. `"$@"` is the original command. Non-interactive shells
/// start background jobs with SIGINT ignored, so SIGTERM is what it sends.
const WRAPPER: &str = r#"echo $$ > /tmp/devloop-restart-wrapper.pid 2>/dev/null
restart=0; stop=0; pid=
trap 'restart=1; [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null' HUP
trap 'stop=1; [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null' TERM INT
while :; do
  "$@" &
  pid=$!
  wait "$pid"; st=$?
  while kill -0 "$pid" 2>/dev/null; do wait "$pid"; st=$?; done
  if [ "$restart" = 1 ] && [ "$stop" = 0 ]; then
    restart=0
    echo "devloop: restarting $1 after a sync" >&2
    continue
  fi
  exit "$st"
done"#;

/// The post-sync command that restarts the wrapped process.
pub fn restart_command() -> CommandSpec {
    CommandSpec {
        shell: Some(format!(
            "if {{ read pid < {PID_FILE}; }} 2>/dev/null; then kill -HUP \"$pid\"; \
             else echo 'devloop: this container has no restart wrapper (yet); not restarted' >&2; fi \
             # devloop: restart the container's process"
        )),
        argv: Vec::new(),
        workdir: String::new(),
    }
}

/// What the annotation records: the container and its original fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Original {
    pub container: String,
    pub command: Option<Vec<String>>,
    pub args: Option<Vec<String>>,
}

/// A workload devloop may patch.
#[derive(Debug, Clone)]
pub enum Workload {
    Deployment(String),
    StatefulSet(String),
}

impl Workload {
    pub fn of(sel: &PodSelector) -> Option<Workload> {
        match sel {
            PodSelector::Deployment(d) => Some(Workload::Deployment(d.clone())),
            PodSelector::StatefulSet(s) => Some(Workload::StatefulSet(s.clone())),
            _ => None,
        }
    }

    /// How its pods are found.
    pub fn pods(&self) -> PodSelector {
        match self {
            Workload::Deployment(n) => PodSelector::Deployment(n.clone()),
            Workload::StatefulSet(n) => PodSelector::StatefulSet(n.clone()),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Workload::Deployment(n) => format!("deployment/{n}"),
            Workload::StatefulSet(n) => format!("statefulset/{n}"),
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Workload::Deployment(n) | Workload::StatefulSet(n) => n,
        }
    }

    /// Its annotations and pod template.
    pub(crate) async fn get(&self, c: &Cluster) -> Result<(BTreeMap<String, String>, PodTemplateSpec), KubeError> {
        let what = format!("{} in {}", self.describe(), c.namespace);
        let (meta, template) = match self {
            Workload::Deployment(n) => {
                let d = Api::<Deployment>::namespaced(c.client.clone(), &c.namespace)
                    .get(n)
                    .await
                    .map_err(|e| api_err(what, e))?;
                (d.metadata, d.spec.map(|s| s.template))
            }
            Workload::StatefulSet(n) => {
                let s = Api::<StatefulSet>::namespaced(c.client.clone(), &c.namespace)
                    .get(n)
                    .await
                    .map_err(|e| api_err(what, e))?;
                (s.metadata, s.spec.map(|s| s.template))
            }
        };
        Ok((meta.annotations.unwrap_or_default(), template.unwrap_or_default()))
    }

    /// A strategic merge patch of the workload.
    pub(crate) async fn patch(&self, c: &Cluster, body: serde_json::Value) -> Result<(), KubeError> {
        let pp = PatchParams::default();
        let what = format!("patch {} in {}", self.describe(), c.namespace);
        let r = match self {
            Workload::Deployment(n) => Api::<Deployment>::namespaced(c.client.clone(), &c.namespace)
                .patch(n, &pp, &Patch::Strategic(body))
                .await
                .map(drop),
            Workload::StatefulSet(n) => Api::<StatefulSet>::namespaced(c.client.clone(), &c.namespace)
                .patch(n, &pp, &Patch::Strategic(body))
                .await
                .map(drop),
        };
        r.map_err(|e| api_err(what, e))
    }
}

/// What [`reconcile`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Done {
    /// The wrapper was put in place (the pods roll out).
    Wrapped,
    /// It was there already.
    Kept,
    /// A recorded wrapper was removed (config no longer asks for it).
    Restored,
    /// Nothing to do.
    Nothing,
}

/// Puts the restart wrapper in place on the workload's container (`want`),
/// or removes one a previous run left (`!want`).
pub async fn reconcile(
    c: &Cluster,
    w: &Workload,
    container: Option<&str>,
    want: bool,
    rep: &Reporter,
) -> Result<Done, KubeError> {
    let (annotations, template) = w.get(c).await?;
    let recorded: Option<Original> = annotations.get(ANNOTATION).and_then(|v| serde_json::from_str(v).ok());
    let spec = template.spec.unwrap_or_default();
    let chosen = match container {
        Some(name) => spec.containers.iter().find(|k| k.name == name),
        None => spec.containers.iter().find(|k| k.name != super::steer::SIDECAR),
    };
    let Some(chosen) = chosen else {
        return Err(KubeError::NoContainer {
            pod: format!("the pod template of {}", w.describe()),
            container: container.unwrap_or("(any)").into(),
            have: spec.containers.iter().map(|k| k.name.as_str()).collect::<Vec<_>>().join(", "),
        });
    };
    match (&recorded, want) {
        (Some(r), true) if r.container == chosen.name => return Ok(Done::Kept),
        (None, false) => return Ok(Done::Nothing),
        (Some(r), _) => {
            restore(c, w).await?;
            rep.send(Kind::WorkloadChanged {
                workload: w.describe(),
                change: format!(
                    "container `{}` restored to its own command (a previous run's restart wrapper); its pods roll out",
                    r.container
                ),
            });
            if !want {
                return Ok(Done::Restored);
            }
        }
        (None, true) => {}
    }
    // The command to wrap: the container's own, or, when the pod template
    // leaves it to the image, what a running pod's PID 1 was started with.
    // The kubelet expands `$(VAR)` and turns `$$` into `$` in a container's
    // command, so text that is not already in the pod template's form has
    // its `$` doubled to arrive unchanged.
    let argv: Vec<String> = match (&chosen.command, &chosen.args) {
        (Some(cmd), _) => cmd.iter().chain(chosen.args.iter().flatten()).cloned().collect(),
        (None, Some(args)) if !args.is_empty() => {
            let unescaped: Vec<String> = args.iter().map(|a| a.replace("$$", "$")).collect();
            running_argv(c, w, &chosen.name, &unescaped).await?.iter().map(|a| escape_dollars(a)).collect()
        }
        (None, _) => {
            return Err(KubeError::Workload {
                what: format!("container `{}` of {}", chosen.name, w.describe()),
                message: "its command comes from the image, which the Kubernetes API does not show, so devloop \
                          cannot wrap it"
                    .into(),
                hint: "set `command:` (the image's ENTRYPOINT and CMD) on the container in the workload".into(),
            })
        }
    };
    let original =
        Original { container: chosen.name.clone(), command: chosen.command.clone(), args: chosen.args.clone() };
    let mut command = vec!["/bin/sh".to_string(), "-c".into(), escape_dollars(WRAPPER), WRAPPER_NAME.into()];
    command.extend(argv);
    let body = serde_json::json!({
        "metadata": {"annotations": {ANNOTATION: serde_json::to_string(&original).unwrap_or_default()}},
        "spec": {"template": {"spec": {"containers": [
            {"name": chosen.name, "command": command, "args": null}
        ]}}}
    });
    w.patch(c, body).await?;
    rep.send(Kind::WorkloadChanged {
        workload: w.describe(),
        change: format!(
            "container `{}` now runs under devloop's restart wrapper so a restart keeps the synced files \
             (recorded in annotation {ANNOTATION}; `devloop down` restores it); its pods roll out",
            chosen.name
        ),
    });
    Ok(Done::Wrapped)
}

/// Text as it must be written in a container's command to reach the
/// process unchanged.
fn escape_dollars(s: &str) -> String {
    s.replace('$', "$$")
}

/// Puts back what the annotation recorded, if anything. Returns the
/// container restored.
pub async fn restore(c: &Cluster, w: &Workload) -> Result<Option<String>, KubeError> {
    let (annotations, _) = w.get(c).await?;
    let Some(raw) = annotations.get(ANNOTATION) else { return Ok(None) };
    let original: Original = serde_json::from_str(raw).map_err(|e| KubeError::Workload {
        what: format!("annotation {ANNOTATION} on {}", w.describe()),
        message: format!("it does not parse ({e})"),
        hint: "remove the annotation and set the container's command back by hand".into(),
    })?;
    let body = serde_json::json!({
        "metadata": {"annotations": {ANNOTATION: null}},
        "spec": {"template": {"spec": {"containers": [
            {"name": original.container, "command": original.command, "args": original.args}
        ]}}}
    });
    w.patch(c, body).await?;
    Ok(Some(original.container))
}

/// How long `down` waits for devloop's ReplicaSets to be scaled down.
const ROLLBACK_WAIT: std::time::Duration = std::time::Duration::from_secs(90);

/// Whether a pod template is one devloop changed: its restart wrapper, or
/// the intercept's forwarder.
fn changed_by_devloop(p: &k8s_openapi::api::core::v1::PodSpec) -> bool {
    p.containers.iter().any(|k| {
        k.name == super::steer::SIDECAR
            || k.command.as_ref().is_some_and(|c| c.get(3).map(String::as_str) == Some(WRAPPER_NAME))
    })
}

/// Deletes the ReplicaSets of a Deployment whose pods ran what devloop
/// put into the template (the restart wrapper, the intercept's
/// forwarder), once the Deployment has scaled them to zero (after
/// [`restore`] and the intercept's restore), so its rollout history is as
/// it was. Returns how many were deleted, and how many are still scaling
/// down (left in place).
pub async fn remove_devloop_rollouts(c: &Cluster, w: &Workload) -> Result<(usize, usize), KubeError> {
    let Workload::Deployment(name) = w else { return Ok((0, 0)) };
    let rss: Api<ReplicaSet> = Api::namespaced(c.client.clone(), &c.namespace);
    let t0 = std::time::Instant::now();
    loop {
        let list = rss
            .list(&ListParams::default())
            .await
            .map_err(|e| api_err(format!("list replicasets in {}", c.namespace), e))?;
        let wrapped: Vec<ReplicaSet> = list
            .items
            .into_iter()
            .filter(|rs| {
                let owned =
                    rs.metadata.owner_references.iter().flatten().any(|o| o.kind == "Deployment" && &o.name == name);
                let containers = rs.spec.as_ref().and_then(|s| s.template.as_ref()).and_then(|t| t.spec.as_ref());
                owned && containers.is_some_and(changed_by_devloop)
            })
            .collect();
        let (idle, busy): (Vec<_>, Vec<_>) = wrapped.into_iter().partition(|rs| {
            rs.spec.as_ref().and_then(|s| s.replicas) == Some(0) && rs.status.as_ref().is_some_and(|s| s.replicas == 0)
        });
        if busy.is_empty() || t0.elapsed() > ROLLBACK_WAIT {
            let mut deleted = 0;
            for rs in &idle {
                let Some(n) = &rs.metadata.name else { continue };
                match rss.delete(n, &DeleteParams::background()).await {
                    Ok(_) => deleted += 1,
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(e) => return Err(api_err(format!("delete replicaset {n} in {}", c.namespace), e)),
                }
            }
            return Ok((deleted, busy.len()));
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// The container's full command when the pod template gives only `args`
/// (the image's ENTRYPOINT comes first): PID 1's argv in a ready pod,
/// accepted only when it ends with those args, since a process that
/// exec'd something else no longer shows how it was started.
async fn running_argv(c: &Cluster, w: &Workload, container: &str, args: &[String]) -> Result<Vec<String>, KubeError> {
    let pod = ready_pods(c, &w.pods()).await?.into_iter().next().ok_or_else(|| KubeError::Workload {
        what: w.describe(),
        message: "its container gives no `command`, and no pod is ready to read the image's entrypoint from".into(),
        hint: "set `command:` on the container in the workload, or start devloop again once a pod is ready".into(),
    })?;
    let raw = exec_output(c, &pod, container, &["cat", "/proc/1/cmdline"], None).await?;
    let argv: Vec<String> = raw.split('\0').filter(|s| !s.is_empty()).map(String::from).collect();
    if argv.ends_with(args) {
        return Ok(argv);
    }
    Err(KubeError::Workload {
        what: format!("{} (pod {pod})", w.describe()),
        message: format!(
            "cannot tell the image's entrypoint: PID 1 runs {argv:?}, which is not it followed by the container's args"
        ),
        hint: format!("set `command:` (the image's ENTRYPOINT) on container `{container}` in the workload"),
    })
}
