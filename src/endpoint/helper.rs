//! Images with no shell (`scratch`, distroless, `pause`): the agent runs in
//! an ephemeral "helper" container added to the pod, which shares the
//! target container's process namespace (`targetContainerName`) and so
//! reaches its filesystem as `/proc/1/root/`. The helper image (default
//! busybox) provides the `sh` that injection needs.
//!
//! Ephemeral containers cannot be removed from a pod through the API:
//! `devloop down` stops the helper (its container then shows as
//! terminated) and the entry goes when the pod is replaced. A helper that
//! is still running is reused by the next start.

use super::kubernetes::{api_err, exec_output, Cluster, KubeError};
use crate::events::{Kind, Reporter};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use std::time::{Duration, Instant};

/// Helper container names: `devloop-helper-N` (names cannot be reused in a
/// pod, even after the container stopped).
const NAME_PREFIX: &str = "devloop-helper-";

/// `$0` of the helper's idle loop, how `down` finds it.
const LOOP_NAME: &str = "devloop-helper";

/// The helper idles until stopped; `sleep` in the background keeps SIGTERM
/// prompt.
const IDLE: &str = "trap 'exit 0' TERM; while :; do sleep 3600 & wait $!; done";

/// How long a new helper may take to start (its image may be pulled).
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// The sync root as the helper sees it.
pub fn root_in_helper(root: &str) -> String {
    format!("/proc/1/root{root}")
}

/// A running helper container for `container` in `pod`: an existing one,
/// or a new one started from `image`. Returns its name.
pub async fn ensure(c: &Cluster, pod: &str, container: &str, image: &str, rep: &Reporter) -> Result<String, KubeError> {
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), &c.namespace);
    let p = pods.get(pod).await.map_err(|e| api_err(format!("get pod {pod}"), e))?;
    if p.spec.as_ref().and_then(|s| s.share_process_namespace) == Some(true) {
        // Then PID 1 is the pod's pause process, not the target's: the
        // helper could not tell which root is the container's.
        return Err(KubeError::Workload {
            what: format!("container `{container}` in pod {pod}"),
            message: "it has no shell, and the pod shares one process namespace across containers".into(),
            hint: "images with no shell are synced through a helper container, which needs \
                   `shareProcessNamespace: false` (the default); or use an image with `sh`"
                .into(),
        });
    }
    let ours: Vec<(String, Option<String>)> = p
        .spec
        .iter()
        .flat_map(|s| s.ephemeral_containers.iter().flatten())
        .filter(|e| e.name.starts_with(NAME_PREFIX))
        .map(|e| (e.name.clone(), e.target_container_name.clone()))
        .collect();
    for (name, target) in &ours {
        if target.as_deref() == Some(container) && state(&p, name) == State::Running {
            return Ok(name.clone());
        }
    }
    let name = format!("{NAME_PREFIX}{}", ours.len());
    let mut helper = serde_json::json!({
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["sh", "-c", IDLE, LOOP_NAME],
        "targetContainerName": container,
        // Reading another user's /proc/PID/root takes ptrace rights; the
        // target (pause, distroless) often runs as a non-root user.
        "securityContext": {"capabilities": {"add": ["SYS_PTRACE"]}},
    });
    // Kubernetes 1.16-1.21 take an EphemeralContainers object on this
    // subresource; 1.22 and later take the Pod.
    let old_api = match c.client.apiserver_version().await {
        Ok(v) => v.major == "1" && v.minor.trim_end_matches('+').parse::<u32>().is_ok_and(|m| m < 22),
        Err(_) => false,
    };
    let what = format!("add helper container {name} to pod {pod}");
    let mut result = add(c, pod, &helper, old_api).await;
    if matches!(&result, Err(kube::Error::Api(s)) if s.code == 422 && s.message.contains("securityContext")) {
        // Before Kubernetes 1.23 an ephemeral container takes no security
        // context: it reaches targets that run as root only.
        helper.as_object_mut().map(|h| h.remove("securityContext"));
        result = add(c, pod, &helper, old_api).await;
    }
    result.map_err(|e| match e {
        kube::Error::Api(s) if s.code == 403 => KubeError::Workload {
            what: what.clone(),
            message: format!("the cluster denied it: {}", s.message),
            hint: format!(
                "the container `{container}` has no shell, so devloop needs `patch` on `pods/ephemeralcontainers` in {} \
                 (`devloop doctor` prints the Role), or use an image with `sh`",
                c.namespace
            ),
        },
        kube::Error::Api(s) if s.code == 404 => KubeError::Workload {
            what: what.clone(),
            message: "this cluster has no ephemeral containers".into(),
            hint: "ephemeral containers need Kubernetes 1.23+ (or the EphemeralContainers feature gate on 1.16-1.22); \
                   or use an image with `sh`"
                .into(),
        },
        kube::Error::Api(s) => KubeError::Workload {
            what: what.clone(),
            message: format!("the cluster refused it: {}", s.message),
            hint: format!("the container `{container}` has no shell; use an image with `sh`, or check `helper_image:`"),
        },
        e => api_err(what.clone(), e),
    })?;
    rep.send(Kind::AgentLog {
        line: format!("container `{container}` has no shell: started helper container {name} ({image}) beside it"),
    });
    let t0 = Instant::now();
    loop {
        let p = pods.get(pod).await.map_err(|e| api_err(format!("get pod {pod}"), e))?;
        match state(&p, &name) {
            State::Running => return Ok(name),
            State::Failed(why) => {
                return Err(KubeError::Workload {
                    what: format!("helper container {name} in pod {pod}"),
                    message: why,
                    hint: format!("check that `helper_image: {image}` can be pulled and has `sh`"),
                })
            }
            State::Waiting if t0.elapsed() > START_TIMEOUT => {
                return Err(KubeError::Timeout {
                    pod: pod.to_string(),
                    command: format!("start helper container {name}"),
                    secs: START_TIMEOUT.as_secs(),
                })
            }
            State::Waiting => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    }
}

#[derive(Debug, PartialEq)]
enum State {
    Waiting,
    Running,
    Failed(String),
}

fn state(p: &Pod, name: &str) -> State {
    let st = p
        .status
        .iter()
        .flat_map(|s| s.ephemeral_container_statuses.iter().flatten())
        .find(|s| s.name == name)
        .and_then(|s| s.state.clone());
    let Some(st) = st else { return State::Waiting };
    if st.running.is_some() {
        return State::Running;
    }
    if let Some(t) = st.terminated {
        return State::Failed(format!("it exited ({})", t.reason.unwrap_or_else(|| format!("code {}", t.exit_code))));
    }
    match st.waiting.and_then(|w| w.reason) {
        Some(r) if r.contains("ImagePull") || r == "InvalidImageName" || r.contains("Err") => {
            State::Failed(format!("it cannot start: {r}"))
        }
        _ => State::Waiting,
    }
}

/// Adds the helper to the pod's ephemeral containers.
async fn add(c: &Cluster, pod: &str, helper: &serde_json::Value, old_api: bool) -> Result<String, kube::Error> {
    let body = if old_api {
        serde_json::json!({"ephemeralContainers": [helper]})
    } else {
        serde_json::json!({"spec": {"ephemeralContainers": [helper]}})
    };
    let req = kube::core::Request::new(format!("/api/v1/namespaces/{}/pods", c.namespace))
        .patch_subresource("ephemeralcontainers", pod, &PatchParams::default(), &Patch::Strategic(body))
        .map_err(kube::Error::BuildRequest)?;
    c.client.request_text(req).await
}

/// Running helper containers of a pod.
pub async fn running(c: &Cluster, pod: &str) -> Result<Vec<String>, KubeError> {
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), &c.namespace);
    let p = pods.get(pod).await.map_err(|e| api_err(format!("get pod {pod}"), e))?;
    let names: Vec<String> = p
        .spec
        .iter()
        .flat_map(|s| s.ephemeral_containers.iter().flatten())
        .filter(|e| e.name.starts_with(NAME_PREFIX))
        .map(|e| e.name.clone())
        .collect();
    Ok(names.into_iter().filter(|n| state(&p, n) == State::Running).collect())
}

/// Stops a helper: ends its idle loop, so its container terminates.
pub async fn stop(c: &Cluster, pod: &str, helper: &str) -> Result<(), KubeError> {
    let script = format!(
        "for p in /proc/[0-9]*; do case \"$(tr '\\0' ' ' < $p/cmdline 2>/dev/null)\" in \
         *' {LOOP_NAME} ') kill ${{p#/proc/}} 2>/dev/null;; esac; done; true"
    );
    exec_output(c, pod, helper, &["sh", "-c", &script], None).await.map(drop)
}
