//! The Kubernetes target: find a service's ready pods, inject the static
//! agent into the chosen container through the exec API, and speak the
//! devloop protocol through a port-forward to the agent's loopback-only
//! port (or, as the fallback, over the exec stream's stdin/stdout).
//!
//! Only what a developer normally may do in their namespace is used: get
//! and list pods, Deployments and StatefulSets, `pods/exec` and
//! `pods/portforward`. Nothing in the cluster is created or changed by this
//! module; the agent binary and its process live in the container's /tmp
//! and go with the container.
//!
//! With port-forward, the exec stream that started the agent stays open as
//! its lifeline: the agent exits when it closes (devloop stopped or died),
//! while a dropped port-forward is simply opened again.
//!
//! Exec stdin is always framed (`head -c N`): some clusters' exec cannot
//! half-close stdin, so a reader waiting for EOF would wait forever.

use super::{pod_link, Started, TargetError};
use crate::config::{KubeTarget, KubeTransport, PodSelector};
use crate::events::{Kind, Reporter};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, AttachParams, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Environment variable naming the static agent binary to inject.
pub const AGENT_STATIC_ENV: &str = "DEVLOOP_AGENT_STATIC";
/// How long one exec round trip (including the upload) may take.
const EXEC_TIMEOUT: Duration = Duration::from_secs(120);

/// Why the cluster could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("cannot load the cluster configuration")]
    Config(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("{what}: the cluster denied it (HTTP 403): {message}")]
    Forbidden { what: String, message: String },
    #[error("{what}: not found")]
    NotFound { what: String },
    #[error("{what} failed")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("{what}: {message}")]
    Unsupported { what: String, message: String },
    /// The container cannot run `sh` (a `scratch`, distroless or `pause`
    /// image): devloop uses a helper container.
    #[error("container `{container}` in pod {pod} has no shell")]
    NoShell { pod: String, container: String },
    /// devloop cannot change a workload the way it needs to.
    #[error("{what}: {message}")]
    Workload { what: String, message: String, hint: String },
    #[error("container `{container}` is not in pod {pod} (it has: {have})")]
    NoContainer { pod: String, container: String, have: String },
    #[error("pod {pod} runs on `{arch}`, and this devloop has an agent for x86_64 only")]
    Arch { pod: String, arch: String },
    #[error("the agent uploaded into {pod} does not match (sha256 {got}, expected {want})")]
    Checksum { pod: String, got: String, want: String },
    #[error("`{command}` in {pod} did not finish within {secs} s")]
    Timeout { pod: String, command: String, secs: u64 },
    #[error("no static agent binary to inject (looked in {looked})")]
    NoStaticAgent { looked: String },
    #[error("no devloop-forward binary for the intercept (looked in {looked})")]
    NoForwarder { looked: String },
}

impl KubeError {
    /// What the user can do about it.
    pub fn hint(&self) -> Option<String> {
        Some(match self {
            KubeError::Config(_) => "set KUBECONFIG (or ~/.kube/config) to a cluster, or name `context:` in the kubernetes target".into(),
            KubeError::Forbidden { .. } => "ask for the Role `devloop doctor` prints (get/list on pods, deployments and statefulsets, get and create on pods/exec and pods/portforward) in this namespace".into(),
            KubeError::NotFound { .. } => "check `namespace:` and the workload's name in the kubernetes target".into(),
            KubeError::Api { .. } => "check that the cluster is reachable (the cause is above)".into(),
            KubeError::Unsupported { .. } => "the container needs `sh` and `head`, or none at all (then devloop uses a helper container)".into(),
            KubeError::NoShell { .. } => "devloop injects through a helper container (`helper_image:`) in that case".into(),
            KubeError::Workload { hint, .. } => hint.clone(),
            KubeError::NoContainer { .. } => "set `container:` in the kubernetes target to one of the listed containers".into(),
            KubeError::Arch { .. } => format!("build an agent for that architecture and point {AGENT_STATIC_ENV} at it"),
            KubeError::Checksum { .. } => "the container's /tmp may be full or read-only; devloop will retry".into(),
            KubeError::Timeout { .. } => "the pod or the API server is slow or stuck; devloop will retry".into(),
            KubeError::NoForwarder { .. } => format!(
                "install devloop with `scripts/install` (it puts devloop-forward next to devloop), build it with `scripts/build-agent` in the source tree, or set {} to it",
                super::forwarder::FORWARD_BIN_ENV
            ),
            KubeError::NoStaticAgent { .. } => format!(
                "install devloop with `scripts/install` (it puts the static agent next to devloop), build it with `scripts/build-agent` in the source tree, or set {AGENT_STATIC_ENV} to a statically linked devloop-agent"
            ),
        })
    }
}

pub(crate) fn api_err(what: impl Into<String>, e: kube::Error) -> KubeError {
    let what = what.into();
    match &e {
        kube::Error::Api(s) if s.code == 403 => KubeError::Forbidden { what, message: s.message.clone() },
        kube::Error::Api(s) if s.code == 404 => KubeError::NotFound { what },
        _ => KubeError::Api { what, source: e },
    }
}

/// A client and the namespace a service lives in.
#[derive(Clone)]
pub struct Cluster {
    pub client: Client,
    pub namespace: String,
}

/// Resolves cluster access the way kubectl does: `KUBECONFIG` or
/// ~/.kube/config (with `context:` if given), else in-cluster config.
pub async fn connect(t: &KubeTarget) -> Result<Cluster, KubeError> {
    let config = match &t.context {
        Some(ctx) => {
            let opts = KubeConfigOptions { context: Some(ctx.clone()), ..Default::default() };
            let kc = Kubeconfig::read().map_err(|e| KubeError::Config(Box::new(e)))?;
            Config::from_custom_kubeconfig(kc, &opts).await.map_err(|e| KubeError::Config(Box::new(e)))?
        }
        None => Config::infer().await.map_err(|e| KubeError::Config(Box::new(e)))?,
    };
    let namespace = t.namespace.clone().unwrap_or_else(|| config.default_namespace.clone());
    let client = client_with_nodelay(config).map_err(|e| KubeError::Config(Box::new(e)))?;
    Ok(Cluster { client, namespace })
}

/// kube's client, but over sockets with TCP_NODELAY: the sync protocol
/// writes small messages and waits for small answers, and with Nagle's
/// algorithm on each round trip through the API server stalls ~40 ms on a
/// delayed ACK.
pub fn client_with_nodelay(config: Config) -> Result<Client, kube::Error> {
    use kube::client::ConfigExt;
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    let https = config.rustls_https_connector_with_connector(http)?;
    let service = tower::ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(config.auth_layer()?)
        .map_err(tower::BoxError::from)
        .service(hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(https));
    Ok(Client::new(service, config.default_namespace))
}

/// Names of the ready pods a selector finds, sorted.
pub async fn ready_pods(c: &Cluster, sel: &PodSelector) -> Result<Vec<String>, KubeError> {
    let mut names: Vec<String> =
        pods(c, sel).await?.into_iter().filter(is_ready).filter_map(|p| p.metadata.name).collect();
    names.sort();
    Ok(names)
}

/// Every pod a selector finds, in any state.
pub async fn pods(c: &Cluster, sel: &PodSelector) -> Result<Vec<Pod>, KubeError> {
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), &c.namespace);
    let labels = match sel {
        PodSelector::Pod(name) => {
            let p = pods.get_opt(name).await.map_err(|e| api_err(format!("get pod {name}"), e))?;
            return Ok(p.into_iter().collect());
        }
        PodSelector::Labels(l) => l.clone(),
        PodSelector::Deployment(d) => {
            let api: Api<Deployment> = Api::namespaced(c.client.clone(), &c.namespace);
            let dep = api.get(d).await.map_err(|e| api_err(format!("deployment/{d} in {}", c.namespace), e))?;
            match_labels(dep.spec.map(|s| s.selector), &format!("deployment/{d}"))?
        }
        PodSelector::StatefulSet(s) => {
            let api: Api<StatefulSet> = Api::namespaced(c.client.clone(), &c.namespace);
            let ss = api.get(s).await.map_err(|e| api_err(format!("statefulset/{s} in {}", c.namespace), e))?;
            match_labels(ss.spec.map(|s| s.selector), &format!("statefulset/{s}"))?
        }
    };
    let list = pods
        .list(&ListParams::default().labels(&labels))
        .await
        .map_err(|e| api_err(format!("list pods ({labels}) in {}", c.namespace), e))?;
    Ok(list.items)
}

fn match_labels(
    sel: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector>,
    what: &str,
) -> Result<String, KubeError> {
    let sel = sel.unwrap_or_default();
    if sel.match_expressions.as_ref().is_some_and(|e| !e.is_empty()) {
        return Err(KubeError::Unsupported {
            what: what.into(),
            message: "its selector uses matchExpressions; give `selector:` with the pods' labels instead".into(),
        });
    }
    let labels: Vec<String> =
        sel.match_labels.unwrap_or_default().into_iter().map(|(k, v)| format!("{k}={v}")).collect();
    if labels.is_empty() {
        return Err(KubeError::Unsupported { what: what.into(), message: "it has no matchLabels".into() });
    }
    Ok(labels.join(","))
}

/// A pod devloop syncs into: running, Ready, and not being deleted.
pub fn is_ready(p: &Pod) -> bool {
    let Some(st) = &p.status else { return false };
    p.metadata.deletion_timestamp.is_none()
        && st.phase.as_deref() == Some("Running")
        && st.conditions.as_ref().is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The statically linked agent that gets injected, and its checksum.
pub struct AgentImage {
    pub bytes: Vec<u8>,
    pub sha256: String,
    pub path: PathBuf,
}

/// Finds and reads the static agent: `DEVLOOP_AGENT_STATIC`, then
/// `devloop-agent-static` next to devloop, then where `scripts/build-agent`
/// puts it in a cargo target directory, then on `PATH`.
pub fn agent_image() -> Result<AgentImage, KubeError> {
    let path = super::local::find_binary(AGENT_STATIC_ENV, "devloop-agent-static", Some("devloop-agent"))
        .map_err(|looked| KubeError::NoStaticAgent { looked })?;
    let bytes =
        std::fs::read(&path).map_err(|e| KubeError::NoStaticAgent { looked: format!("{}: {e}", path.display()) })?;
    let sha256 = hex(&Sha256::digest(&bytes));
    Ok(AgentImage { bytes, sha256, path })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// One pod to sync into.
pub struct PodEndpoint {
    pub cluster: Cluster,
    pub pod: String,
    pub container: Option<String>,
    pub root: String,
    pub agent: Arc<AgentImage>,
    pub transport: KubeTransport,
    /// The image of the helper container used when the target has no shell.
    pub helper_image: String,
    /// Set once a port-forward was refused: later starts use exec.
    pub forward_refused: AtomicBool,
}

impl PodEndpoint {
    pub fn new(cluster: Cluster, pod: &str, k: &crate::config::KubeTarget, agent: Arc<AgentImage>) -> PodEndpoint {
        PodEndpoint {
            cluster,
            pod: pod.to_string(),
            container: k.container.clone(),
            root: k.root.clone(),
            agent,
            transport: k.transport,
            helper_image: k.helper_image.clone(),
            forward_refused: Default::default(),
        }
    }

    pub fn describe(&self) -> String {
        format!("pod {}/{}", self.cluster.namespace, self.pod)
    }
}

/// Runs a command in the container; returns its stdout. `stdin` must be
/// read by the command by length (it is never closed).
pub(crate) async fn exec_output(
    c: &Cluster,
    pod: &str,
    container: &str,
    cmd: &[&str],
    stdin: Option<&[u8]>,
) -> Result<String, KubeError> {
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), &c.namespace);
    let shown = cmd.join(" ");
    let run = async {
        let ap = AttachParams::default().container(container).stdin(stdin.is_some()).stdout(true).stderr(false);
        let mut p = pods
            .exec(pod, cmd.iter().map(|s| s.to_string()).collect::<Vec<_>>(), &ap)
            .await
            .map_err(|e| api_err(format!("exec `{shown}` in pod {pod}"), e))?;
        let (input, output) = (p.stdin(), p.stdout());
        // Written while the output is read: a command that ends without
        // reading its input (a full or read-only /tmp) must not leave the
        // write waiting forever. A failed write shows up as a wrong result.
        let write = async move {
            if let (Some(data), Some(mut w)) = (stdin, input) {
                let _ = w.write_all(data).await;
                let _ = w.flush().await;
            }
        };
        let read = async move {
            let mut out = String::new();
            if let Some(mut r) = output {
                let _ = r.read_to_string(&mut out).await;
            }
            out
        };
        tokio::pin!(write, read);
        let mut written = false;
        let out = loop {
            tokio::select! {
                out = &mut read => break out,
                _ = &mut write, if !written => written = true,
            }
        };
        let _ = p.join().await;
        Ok(out)
    };
    tokio::time::timeout(EXEC_TIMEOUT, run).await.map_err(|_| KubeError::Timeout {
        pod: pod.to_string(),
        command: shown,
        secs: EXEC_TIMEOUT.as_secs(),
    })?
}

/// The container to use: the configured one (checked) or the first.
async fn container(c: &Cluster, pod_name: &str, configured: Option<&str>) -> Result<String, KubeError> {
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), &c.namespace);
    let pod = pods.get(pod_name).await.map_err(|e| api_err(format!("get pod {pod_name}"), e))?;
    let names: Vec<String> = pod.spec.map(|s| s.containers.into_iter().map(|c| c.name).collect()).unwrap_or_default();
    match configured {
        Some(want) if names.iter().any(|n| n == want) => Ok(want.to_string()),
        Some(want) => Err(KubeError::NoContainer {
            pod: pod_name.to_string(),
            container: want.to_string(),
            have: names.join(", "),
        }),
        // The first of the pod's own: never devloop's forwarder.
        None => names.into_iter().find(|n| n != super::steer::SIDECAR).ok_or_else(|| KubeError::NoContainer {
            pod: pod_name.to_string(),
            container: "(any)".into(),
            have: "none".into(),
        }),
    }
}

/// Makes sure the agent is in the container (uploading it when the same
/// build is not already there) and returns its path there.
async fn inject(ep: &PodEndpoint, container: &str, rep: &Reporter) -> Result<String, KubeError> {
    let remote = format!("/tmp/devloop-agent-{}", &ep.agent.sha256[..16]);
    // One round trip: the architecture, then the checksum of an agent of
    // this build if one is already there (reused when it matches).
    let probe = format!("uname -m; [ -x {remote} ] && sha256sum {remote} 2>/dev/null | cut -c1-64");
    let out = exec_output(&ep.cluster, &ep.pod, container, &["sh", "-c", &probe], None).await?;
    let mut lines = out.lines();
    let arch = lines.next().unwrap_or("").trim();
    if arch.is_empty() {
        return Err(KubeError::NoShell { pod: ep.pod.clone(), container: container.to_string() });
    }
    if arch != "x86_64" {
        return Err(KubeError::Arch { pod: ep.pod.clone(), arch: arch.into() });
    }
    if lines.next().map(str::trim) == Some(ep.agent.sha256.as_str()) {
        return Ok(remote);
    }
    let n = ep.agent.bytes.len();
    rep.send(Kind::AgentInjecting { bytes: n as u64 });
    let upload = format!(
        "head -c {n} > {remote}.part && chmod 755 {remote}.part && mv {remote}.part {remote} && sha256sum {remote} | cut -c1-64"
    );
    let got = exec_output(&ep.cluster, &ep.pod, container, &["sh", "-c", &upload], Some(&ep.agent.bytes)).await?;
    if got.trim() != ep.agent.sha256 {
        return Err(KubeError::Checksum { pod: ep.pod.clone(), got: got.trim().into(), want: ep.agent.sha256.clone() });
    }
    Ok(remote)
}

/// Checks, in one ready pod (if there is one yet), that the container can
/// run `/bin/sh`, as the restart wrapper must.
pub async fn check_shell(c: &Cluster, sel: &PodSelector, configured: Option<&str>) -> Result<(), KubeError> {
    let Some(pod) = ready_pods(c, sel).await?.into_iter().next() else { return Ok(()) };
    let container = container(c, &pod, configured).await?;
    let out = exec_output(c, &pod, &container, &["/bin/sh", "-c", "echo devloop-sh"], None).await?;
    if out.trim() == "devloop-sh" {
        return Ok(());
    }
    Err(KubeError::Workload {
        what: format!("container `{container}` (pod {pod})"),
        message: "it has no /bin/sh, which devloop's restart wrapper runs in".into(),
        hint: "restarting the container's own process needs a shell in its image; remove `app:` (files still sync \
               through a helper container), or give `run:` for a process the agent starts"
            .into(),
    })
}

/// Stops any agent devloop started in the pod and removes its binaries.
/// Returns how many agent files there were. Safe to run again.
pub async fn remove_agent(c: &Cluster, pod: &str, configured: Option<&str>) -> Result<usize, KubeError> {
    let container = container(c, pod, configured).await?;
    remove_agent_in(c, pod, &container).await
}

/// [`remove_agent`] in a named container (a helper container, say).
pub async fn remove_agent_in(c: &Cluster, pod: &str, container: &str) -> Result<usize, KubeError> {
    let script = "n=0; for f in /tmp/devloop-agent-*; do [ -e \"$f\" ] && n=$((n+1)); done; \
        for p in /proc/[0-9]*; do case \"$(tr '\\0' ' ' < $p/cmdline 2>/dev/null)\" in \
        /tmp/devloop-agent-*) kill ${p#/proc/} 2>/dev/null;; esac; done; \
        rm -f /tmp/devloop-agent-*; echo $n";
    let out = exec_output(c, pod, container, &["sh", "-c", script], None).await?;
    Ok(out.trim().parse().unwrap_or(0))
}

/// Streams the container's log as events until the pod is gone or this is
/// cancelled. New lines only: the log from before devloop started is the
/// pod's business. A stream that ends (container restart, API hiccup) is
/// opened again.
pub async fn follow_logs(ep: Arc<PodEndpoint>, rep: Reporter, cancel: tokio_util::sync::CancellationToken) {
    let pods: Api<Pod> = Api::namespaced(ep.cluster.client.clone(), &ep.cluster.namespace);
    let follow = async {
        let mut since_start = true;
        loop {
            let container = match container(&ep.cluster, &ep.pod, ep.container.as_deref()).await {
                Ok(c) => c,
                Err(KubeError::NotFound { .. }) => return,
                Err(_) => {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    continue;
                }
            };
            let lp = kube::api::LogParams {
                container: Some(container),
                follow: true,
                tail_lines: since_start.then_some(0),
                since_seconds: (!since_start).then_some(5),
                ..Default::default()
            };
            if let Ok(stream) = pods.log_stream(&ep.pod, &lp).await {
                let mut lines = futures_util::AsyncBufReadExt::lines(stream);
                while let Some(Ok(line)) = futures_util::StreamExt::next(&mut lines).await {
                    rep.send(Kind::PodLog { line });
                }
            }
            since_start = false;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    };
    tokio::select! {
        _ = follow => {}
        _ = cancel.cancelled() => {}
    }
}

/// Injects and starts the agent in the pod, and connects to it the way the
/// target says: port-forward by default (falling back to the exec stream
/// when the cluster refuses port-forwards), or the exec stream.
pub async fn start(ep: &PodEndpoint, token: &str, rep: &Reporter) -> Result<Started, TargetError> {
    let wrap = |e: KubeError| TargetError::Kubernetes(Box::new(e));
    let target = container(&ep.cluster, &ep.pod, ep.container.as_deref()).await.map_err(wrap)?;
    let (container, remote, root) = match inject(ep, &target, rep).await {
        Ok(remote) => (target, remote, ep.root.clone()),
        Err(KubeError::NoShell { .. }) => {
            let helper =
                super::helper::ensure(&ep.cluster, &ep.pod, &target, &ep.helper_image, rep).await.map_err(wrap)?;
            let remote = inject(ep, &helper, rep).await.map_err(wrap)?;
            (helper, remote, super::helper::root_in_helper(&ep.root))
        }
        Err(e) => return Err(wrap(e)),
    };
    if ep.transport == KubeTransport::PortForward && !ep.forward_refused.load(Ordering::Relaxed) {
        match pod_link::start_forwarded(ep, &container, &remote, &root, token, rep).await {
            Ok(s) => return Ok(s),
            Err(pod_link::Step::Start(e)) => return Err(wrap(e)),
            Err(pod_link::Step::Forward(e)) => {
                rep.send(Kind::Warning {
                    message: format!(
                        "{}; using the exec stream instead (set `transport: exec` to skip trying)",
                        crate::error::chain(&e)
                    ),
                });
                ep.forward_refused.store(true, Ordering::Relaxed);
            }
        }
    }
    pod_link::start_stdio(ep, &container, &remote, &root, token, rep).await.map_err(wrap)
}
