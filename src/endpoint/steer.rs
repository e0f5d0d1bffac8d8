//! The intercept on Kubernetes: the Service is steered through a forwarder
//! in each of the workload's pods.
//!
//! 1. A ConfigMap holds the forwarder (`devloop-forward`: static, no libc,
//!    31 KB), so it reaches pods with no registry.
//! 2. The pod template gets a sidecar, `devloop-forward`, run from the app
//!    container's own image with the ConfigMap mounted. For each
//!    intercepted Service port it listens on a port of its own (a named
//!    container port) and hands each connection to the agent's claim port
//!    on the pod's loopback while a devloop holds the intercept there, else
//!    to the app's port. One rollout.
//! 3. Once the pods have it, the Service's `targetPort` for those ports
//!    becomes the sidecar's port *name*: a pod without the forwarder has no
//!    port of that name and is left out of the Service's endpoints, so the
//!    Service never points at a port on which nothing listens.
//!
//! Every change is recorded on the object it changes (annotation
//! [`ANNOTATION`]): the Service keeps its original targetPorts, the
//! workload what was added. They are undone Service first (its calls go
//! back to the app's port at once), then the template, then the ConfigMap:
//! on a clean exit, by `devloop down`, and by the next start that does not
//! intercept. If devloop dies at any moment, the forwarder is what keeps
//! the Service answering: the agent stops listening on its claim port when
//! devloop goes quiet for the lease, or exits with its lifeline, and new
//! connections go to the app; pods that start meanwhile get the forwarder
//! from their template and behave the same.

use super::kubernetes::{api_err, pods, Cluster, KubeError};
use super::workload::Workload;
use crate::config::{Intercept, PortRef};
use crate::events::{Kind, Reporter};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Service};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::ByteString;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::time::Duration;

/// Where each object records what devloop changed on it.
pub const ANNOTATION: &str = "devloop.dev/intercept";
/// The sidecar container, and the volume that brings it the forwarder.
pub const SIDECAR: &str = "devloop-forward";
const VOLUME: &str = "devloop-forward";
const MOUNT: &str = "/devloop-forward";
const BINARY: &str = "devloop-forward";
/// The ConfigMap's checksum of the forwarder it holds.
const SHA_ANNOTATION: &str = "devloop.dev/forwarder-sha256";
/// The forwarder's first port (on the pod's network), and the agent's
/// first claim port (on its loopback); the next ones follow, skipping
/// ports the pod's containers declare.
const LISTEN_BASE: u16 = 47080;
const CLAIM_BASE: u16 = 47180;
/// How long the forwarder's rollout may take before devloop gives up
/// steering the Service (the template keeps the forwarder, which hands
/// everything to the app; `down` removes it).
pub const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(300);

/// One intercepted Service port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Port {
    /// The Service port, and its name if it has one.
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Where the app listens in the pod: the port's original targetPort,
    /// resolved.
    pub app: u16,
    /// The forwarder's port on the pod's network, and its name.
    pub listen: u16,
    pub listen_name: String,
    /// The agent's claim port on the pod's loopback.
    pub claim: u16,
}

/// What devloop adds to a workload, recorded on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub service: String,
    pub configmap: String,
    pub ports: Vec<Port>,
}

/// What devloop changed on a Service, recorded on it: each steered port's
/// original targetPort.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceRecord {
    pub workload: String,
    pub targets: Vec<Original>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Original {
    pub port: u16,
    #[serde(rename = "targetPort")]
    pub target_port: IntOrString,
}

fn services(c: &Cluster) -> Api<Service> {
    Api::namespaced(c.client.clone(), &c.namespace)
}

fn configmaps(c: &Cluster) -> Api<ConfigMap> {
    Api::namespaced(c.client.clone(), &c.namespace)
}

fn record_of(annotations: &BTreeMap<String, String>) -> Option<Record> {
    annotations.get(ANNOTATION).and_then(|v| serde_json::from_str(v).ok())
}

fn service_record(s: &Service) -> Option<ServiceRecord> {
    s.metadata.annotations.as_ref()?.get(ANNOTATION).and_then(|v| serde_json::from_str(v).ok())
}

fn bad(what: impl Into<String>, message: impl Into<String>, hint: impl Into<String>) -> KubeError {
    KubeError::Workload { what: what.into(), message: message.into(), hint: hint.into() }
}

/// Resolves the intercept against the cluster: the Service (named, or
/// the one that selects the workload's pods), its ports, and where the
/// app listens for each; the forwarder's ports are chosen clear of the
/// pod's own.
pub async fn resolve(c: &Cluster, w: &Workload, container: Option<&str>, i: &Intercept) -> Result<Record, KubeError> {
    let (_, template) = w.get(c).await?;
    let labels = template.metadata.as_ref().and_then(|m| m.labels.clone()).unwrap_or_default();
    let spec = template.spec.unwrap_or_default();
    let selects = |s: &Service| {
        s.spec
            .as_ref()
            .and_then(|s| s.selector.as_ref())
            .filter(|sel| !sel.is_empty())
            .is_some_and(|sel| sel.iter().all(|(k, v)| labels.get(k) == Some(v)))
    };
    let svc = match &i.service {
        Some(name) => {
            let s =
                services(c).get(name).await.map_err(|e| api_err(format!("service/{name} in {}", c.namespace), e))?;
            if !selects(&s) {
                return Err(bad(
                    format!("service/{name}"),
                    format!("it does not select the pods of {}", w.describe()),
                    "set `intercept.service` to the Service whose selector matches the workload's pod labels",
                ));
            }
            s
        }
        None => {
            let all = services(c)
                .list(&ListParams::default())
                .await
                .map_err(|e| api_err(format!("list services in {}", c.namespace), e))?;
            let mut matching: Vec<Service> = all.items.into_iter().filter(selects).collect();
            match matching.len() {
                1 => matching.remove(0),
                0 => {
                    return Err(bad(
                        w.describe(),
                        format!("no Service in {} selects its pods", c.namespace),
                        "create the Service, or name it in `intercept.service`",
                    ))
                }
                _ => {
                    let names: Vec<String> = matching.iter().filter_map(|s| s.metadata.name.clone()).collect();
                    return Err(bad(
                        w.describe(),
                        format!("several Services select its pods: {}", names.join(", ")),
                        "name the one to intercept in `intercept.service`",
                    ));
                }
            }
        }
    };
    let svc_name = svc.metadata.name.clone().unwrap_or_default();
    let steered = service_record(&svc);
    let svc_ports = svc.spec.as_ref().and_then(|s| s.ports.clone()).unwrap_or_default();
    // The pod's declared ports: where named targetPorts point, and what
    // the forwarder's ports must not collide with.
    let declared: Vec<(Option<String>, u16, &str)> = spec
        .containers
        .iter()
        .filter(|k| k.name != SIDECAR)
        .flat_map(|k| k.ports.iter().flatten().map(move |p| (p.name.clone(), p.container_port as u16, k.name.as_str())))
        .collect();
    let mut taken: Vec<u16> = declared.iter().map(|d| d.1).collect();
    let next = |base: u16, taken: &mut Vec<u16>| {
        let mut p = base;
        while taken.contains(&p) {
            p += 1;
        }
        taken.push(p);
        p
    };
    let mut ports = Vec::new();
    for m in &i.ports {
        let found = svc_ports.iter().find(|p| match &m.service {
            PortRef::Number(n) => p.port == *n as i32,
            PortRef::Name(n) => p.name.as_deref() == Some(n.as_str()),
        });
        let Some(sp) = found else {
            let have: Vec<String> = svc_ports
                .iter()
                .map(|p| match &p.name {
                    Some(n) => format!("{} ({n})", p.port),
                    None => p.port.to_string(),
                })
                .collect();
            return Err(bad(
                format!("service/{svc_name}"),
                format!("it has no port `{}` (it has: {})", m.service, have.join(", ")),
                "fix `intercept.ports` (SERVICE_PORT:LOCAL_PORT, the Service port by number or name)",
            ));
        };
        if sp.protocol.as_deref().is_some_and(|p| p != "TCP") {
            return Err(bad(
                format!("service/{svc_name} port {}", sp.port),
                format!("it is {}; devloop intercepts TCP", sp.protocol.as_deref().unwrap_or_default()),
                "intercept a TCP port",
            ));
        }
        // A Service devloop steered already (a previous run): its
        // original targetPort is in the record.
        let original = steered
            .as_ref()
            .and_then(|r| r.targets.iter().find(|t| t.port as i32 == sp.port))
            .map(|t| t.target_port.clone())
            .or_else(|| sp.target_port.clone())
            .unwrap_or(IntOrString::Int(sp.port));
        let app = match &original {
            IntOrString::Int(n) => *n as u16,
            IntOrString::String(name) => {
                let hit = declared
                    .iter()
                    .filter(|d| d.0.as_deref() == Some(name.as_str()))
                    .min_by_key(|d| container.is_some_and(|c| c != d.2));
                match hit {
                    Some(d) => d.1,
                    None => {
                        return Err(bad(
                            format!("service/{svc_name} port {}", sp.port),
                            format!("its targetPort `{name}` is not a named port of {}'s containers", w.describe()),
                            "name the container port in the workload, or give the Service a numeric targetPort",
                        ))
                    }
                }
            }
        };
        let listen = next(LISTEN_BASE, &mut taken);
        let claim = next(CLAIM_BASE, &mut taken);
        ports.push(Port {
            port: sp.port as u16,
            name: sp.name.clone(),
            app,
            listen,
            listen_name: format!("devloop-{}", ports.len()),
            claim,
        });
    }
    Ok(Record { service: svc_name, configmap: format!("devloop-forward-{}", w.name()), ports })
}

/// The agent's side of the intercept in each pod: the claim ports it
/// listens on, and the app behind each (for a personal intercept's other
/// requests).
pub fn plan(record: &Record, i: &Intercept) -> crate::intercept::Plan {
    use devloop_agent::protocol::{HeaderMatch, InterceptPort};
    let mut local = std::collections::HashMap::new();
    let mut ports = Vec::new();
    for p in &record.ports {
        let m = i.ports.iter().find(|m| match &m.service {
            PortRef::Number(n) => *n == p.port,
            PortRef::Name(n) => p.name.as_deref() == Some(n.as_str()),
        });
        if let Some(m) = m {
            local.insert(p.port, m.local);
        }
        ports.push(InterceptPort {
            port: p.port,
            listen: format!("127.0.0.1:{}", p.claim),
            app: Some(format!("127.0.0.1:{}", p.app)),
        });
    }
    crate::intercept::Plan {
        ports,
        local,
        header: i.header.clone().map(|(name, value)| HeaderMatch { name, value }),
        lease_ms: i.lease_ms,
    }
}

/// What [`apply`] did to the workload.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    /// The forwarder was added (its pods roll out).
    Added,
    /// It was there already, as wanted.
    Kept,
}

/// The forwarder's ConfigMap: created, or updated when it holds another
/// build.
pub async fn ensure_configmap(c: &Cluster, name: &str, forwarder: &[u8]) -> Result<(), KubeError> {
    let sha = hex(&Sha256::digest(forwarder));
    let api = configmaps(c);
    let existing =
        api.get_opt(name).await.map_err(|e| api_err(format!("get configmap/{name} in {}", c.namespace), e))?;
    let held = existing.as_ref().and_then(|m| m.metadata.annotations.as_ref()?.get(SHA_ANNOTATION).cloned());
    if held.as_deref() == Some(sha.as_str()) {
        return Ok(());
    }
    let mut cm: ConfigMap = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "labels": {"app.kubernetes.io/managed-by": "devloop"},
            "annotations": {SHA_ANNOTATION: sha},
        },
    }))
    .expect("a ConfigMap literal");
    cm.binary_data = Some(BTreeMap::from([(BINARY.to_string(), ByteString(forwarder.to_vec()))]));
    let what = format!("create configmap/{name} in {}", c.namespace);
    match existing {
        None => api.create(&PostParams::default(), &cm).await.map(drop).map_err(|e| api_err(what, e)),
        Some(old) => {
            cm.metadata.resource_version = old.metadata.resource_version;
            api.replace(name, &PostParams::default(), &cm).await.map(drop).map_err(|e| api_err(what, e))
        }
    }
}

/// The sidecar: the forwarder from the ConfigMap, in the app container's
/// image, as an unprivileged user, with one route per port.
fn sidecar(record: &Record, image: &str, ipv6: bool) -> Container {
    let (any, lo) = if ipv6 { ("[::]", "[::1]") } else { ("0.0.0.0", "127.0.0.1") };
    let args: Vec<String> =
        record.ports.iter().map(|p| format!("{any}:{}={lo}:{}+{lo}:{}", p.listen, p.app, p.claim)).collect();
    let ports: Vec<serde_json::Value> = record
        .ports
        .iter()
        .map(|p| serde_json::json!({"name": p.listen_name, "containerPort": p.listen, "protocol": "TCP"}))
        .collect();
    serde_json::from_value(serde_json::json!({
        "name": SIDECAR,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": [format!("{MOUNT}/{BINARY}")],
        "args": args,
        "ports": ports,
        "volumeMounts": [{"name": VOLUME, "mountPath": MOUNT, "readOnly": true}],
        "resources": {
            "requests": {"cpu": "5m", "memory": "8Mi"},
            "limits": {"cpu": "500m", "memory": "64Mi"}
        },
        "securityContext": {
            "runAsUser": 65534, "runAsGroup": 65534, "runAsNonRoot": true,
            "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]}
        }
    }))
    .expect("a container literal")
}

/// Puts the forwarder into the workload's pod template (with its
/// ConfigMap), or keeps it when a previous run's is there as wanted. A
/// previous run's that differs is taken out of the Service first.
pub async fn apply(
    c: &Cluster,
    w: &Workload,
    container: Option<&str>,
    record: &Record,
    forwarder: &[u8],
    rep: &Reporter,
) -> Result<Applied, KubeError> {
    let (annotations, template) = w.get(c).await?;
    let spec = template.spec.unwrap_or_default();
    let has_sidecar = spec.containers.iter().any(|k| k.name == SIDECAR);
    ensure_configmap(c, &record.configmap, forwarder).await?;
    let old = record_of(&annotations);
    if old.as_ref() == Some(record) && has_sidecar {
        return Ok(Applied::Kept);
    }
    if old.is_some() {
        // Other ports than this run's: the Service must not point at a
        // port name the new forwarder will not have.
        restore_services(c, w, rep).await?;
    }
    let app = match container {
        Some(name) => spec.containers.iter().find(|k| k.name == name),
        None => spec.containers.iter().find(|k| k.name != SIDECAR),
    };
    let Some(image) = app.and_then(|k| k.image.clone()) else {
        return Err(KubeError::NoContainer {
            pod: format!("the pod template of {}", w.describe()),
            container: container.unwrap_or("(any)").into(),
            have: spec.containers.iter().map(|k| k.name.as_str()).collect::<Vec<_>>().join(", "),
        });
    };
    let svc = services(c)
        .get(&record.service)
        .await
        .map_err(|e| api_err(format!("service/{} in {}", record.service, c.namespace), e))?;
    let ipv6 = svc
        .spec
        .as_ref()
        .and_then(|s| s.ip_families.as_ref())
        .is_some_and(|f| f.first().map(String::as_str) == Some("IPv6"));
    // The pod's own containers keep their order, the forwarder comes last:
    // tools that default to a pod's first container (`kubectl exec`,
    // `kubectl logs`) keep finding the app.
    let order: Vec<serde_json::Value> = spec
        .containers
        .iter()
        .filter(|k| k.name != SIDECAR)
        .map(|k| serde_json::json!({"name": k.name}))
        .chain([serde_json::json!({"name": SIDECAR})])
        .collect();
    let body = serde_json::json!({
        "metadata": {"annotations": {ANNOTATION: serde_json::to_string(record).unwrap_or_default()}},
        "spec": {"template": {"spec": {
            "$setElementOrder/containers": order,
            "containers": [sidecar(record, &image, ipv6)],
            "volumes": [{"name": VOLUME, "configMap": {"name": record.configmap, "defaultMode": 0o755}}]
        }}}
    });
    w.patch(c, body).await?;
    rep.send(Kind::WorkloadChanged {
        workload: w.describe(),
        change: format!(
            "added the intercept's forwarder (container `{SIDECAR}`, from configmap/{}); it hands calls to the app \
             whenever devloop is away (recorded in annotation {ANNOTATION}; `devloop down` removes it); its pods roll out",
            record.configmap
        ),
    });
    Ok(Applied::Added)
}

/// Waits until the workload's pods have the forwarder: none without it
/// (but those being deleted), and at least one ready. Says how it goes
/// while it waits.
pub async fn rolled_out(c: &Cluster, w: &Workload, timeout: Duration, rep: &Reporter) -> Result<(), KubeError> {
    let t0 = tokio::time::Instant::now();
    let mut said = String::new();
    loop {
        let all = pods(c, &w.pods()).await?;
        let live: Vec<_> = all.iter().filter(|p| p.metadata.deletion_timestamp.is_none()).collect();
        let with = |p: &&&k8s_openapi::api::core::v1::Pod| {
            p.spec.as_ref().is_some_and(|s| s.containers.iter().any(|k| k.name == SIDECAR))
        };
        let without = live.iter().filter(|p| !with(p)).count();
        let ready = live.iter().filter(with).filter(|p| super::kubernetes::is_ready(p)).count();
        if without == 0 && ready > 0 {
            return Ok(());
        }
        let now = format!("{ready} pod(s) with the forwarder ready, {without} still without it");
        if now != said {
            rep.send(Kind::Warning {
                message: format!("{}: rolling out the intercept's forwarder: {now}", w.describe()),
            });
            said = now;
        }
        if t0.elapsed() > timeout {
            return Err(bad(
                w.describe(),
                format!("the forwarder's rollout did not finish in {} s ({said})", timeout.as_secs()),
                "check the pods (`kubectl describe`): a quota, a pull error or a pending pod; calls still go to the \
                 app, and `devloop down` removes the forwarder",
            ));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Points the Service's intercepted ports at the forwarder (by its port
/// names), recording their original targetPorts on it. Returns whether it
/// changed anything.
pub async fn steer_service(c: &Cluster, w: &Workload, record: &Record, rep: &Reporter) -> Result<bool, KubeError> {
    let name = &record.service;
    let s = services(c).get(name).await.map_err(|e| api_err(format!("service/{name} in {}", c.namespace), e))?;
    let previous = service_record(&s);
    let mut ports = s.spec.as_ref().and_then(|s| s.ports.clone()).unwrap_or_default();
    let mut targets = Vec::new();
    let mut changed = false;
    for sp in ports.iter_mut() {
        let Some(p) = record.ports.iter().find(|p| p.port as i32 == sp.port) else { continue };
        let original = previous
            .as_ref()
            .and_then(|r| r.targets.iter().find(|t| t.port == p.port).map(|t| t.target_port.clone()))
            .or_else(|| sp.target_port.clone())
            .unwrap_or(IntOrString::Int(sp.port));
        targets.push(Original { port: p.port, target_port: original });
        let want = IntOrString::String(p.listen_name.clone());
        if sp.target_port.as_ref() != Some(&want) {
            sp.target_port = Some(want);
            changed = true;
        }
    }
    let rec = ServiceRecord { workload: w.describe(), targets };
    if !changed && previous.as_ref() == Some(&rec) {
        return Ok(false);
    }
    // A merge patch with the resourceVersion: the API server refuses it if
    // the Service changed since it was read, rather than overwrite ports.
    let body = serde_json::json!({
        "metadata": {
            "resourceVersion": s.metadata.resource_version,
            "annotations": {ANNOTATION: serde_json::to_string(&rec).unwrap_or_default()}
        },
        "spec": {"ports": ports}
    });
    services(c)
        .patch(name, &PatchParams::default(), &Patch::Merge(body))
        .await
        .map_err(|e| api_err(format!("patch service/{name} in {}", c.namespace), e))?;
    let shown: Vec<String> = record.ports.iter().map(|p| format!("{} → {}", p.port, p.listen_name)).collect();
    rep.send(Kind::WorkloadChanged {
        workload: format!("service/{name}"),
        change: format!(
            "port(s) {} now reach the intercept's forwarder in each pod (original targetPorts recorded in annotation \
             {ANNOTATION}; restored on exit and by `devloop down`)",
            shown.join(", ")
        ),
    });
    Ok(true)
}

/// Puts back the targetPorts of every Service devloop steered for this
/// workload. Returns the Services restored.
pub async fn restore_services(c: &Cluster, w: &Workload, rep: &Reporter) -> Result<Vec<String>, KubeError> {
    let all = services(c)
        .list(&ListParams::default())
        .await
        .map_err(|e| api_err(format!("list services in {}", c.namespace), e))?;
    let mut restored = Vec::new();
    for s in all.items {
        let Some(rec) = service_record(&s).filter(|r| r.workload == w.describe()) else { continue };
        let name = s.metadata.name.clone().unwrap_or_default();
        let mut ports = s.spec.as_ref().and_then(|s| s.ports.clone()).unwrap_or_default();
        for sp in ports.iter_mut() {
            if let Some(o) = rec.targets.iter().find(|t| t.port as i32 == sp.port) {
                sp.target_port = Some(o.target_port.clone());
            }
        }
        let body = serde_json::json!({
            "metadata": {"resourceVersion": s.metadata.resource_version, "annotations": {ANNOTATION: null}},
            "spec": {"ports": ports}
        });
        services(c)
            .patch(&name, &PatchParams::default(), &Patch::Merge(body))
            .await
            .map_err(|e| api_err(format!("patch service/{name} in {}", c.namespace), e))?;
        rep.send(Kind::WorkloadChanged {
            workload: format!("service/{name}"),
            change: "its ports point at the app again (devloop's intercept is off)".into(),
        });
        restored.push(name);
    }
    Ok(restored)
}

/// What [`restore`] undid.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Restored {
    pub services: Vec<String>,
    pub template: bool,
    pub configmap: bool,
}

/// Undoes the intercept's changes for the workload, Service first. Safe to
/// run again, and after a crash at any point.
pub async fn restore(c: &Cluster, w: &Workload, rep: &Reporter) -> Result<Restored, KubeError> {
    let services = restore_services(c, w, rep).await?;
    let (annotations, template) = w.get(c).await?;
    let spec = template.spec.unwrap_or_default();
    let has_sidecar = spec.containers.iter().any(|k| k.name == SIDECAR);
    let has_volume = spec.volumes.iter().flatten().any(|v| v.name == VOLUME);
    let record = record_of(&annotations);
    let template_changed = record.is_some() || has_sidecar || has_volume;
    if template_changed {
        let mut body = serde_json::json!({"metadata": {"annotations": {ANNOTATION: null}}});
        if has_sidecar || has_volume {
            body["spec"] = serde_json::json!({"template": {"spec": {}}});
            if has_sidecar {
                body["spec"]["template"]["spec"]["containers"] =
                    serde_json::json!([{"name": SIDECAR, "$patch": "delete"}]);
            }
            if has_volume {
                body["spec"]["template"]["spec"]["volumes"] = serde_json::json!([{"name": VOLUME, "$patch": "delete"}]);
            }
        }
        w.patch(c, body).await?;
        if has_sidecar {
            rep.send(Kind::WorkloadChanged {
                workload: w.describe(),
                change: format!("removed the intercept's forwarder (container `{SIDECAR}`); its pods roll out"),
            });
        }
    }
    let cm = record.map(|r| r.configmap).unwrap_or_else(|| format!("devloop-forward-{}", w.name()));
    let configmap = match configmaps(c).delete(&cm, &DeleteParams::default()).await {
        Ok(_) => true,
        Err(kube::Error::Api(s)) if s.code == 404 => false,
        Err(e) => return Err(api_err(format!("delete configmap/{cm} in {}", c.namespace), e)),
    };
    Ok(Restored { services, template: template_changed, configmap })
}

/// The forwarder to put into pods: the one devloop runs on this machine
/// too (it is static).
pub fn forwarder_binary() -> Result<Vec<u8>, KubeError> {
    let path = super::local::find_binary(super::forwarder::FORWARD_BIN_ENV, "devloop-forward", Some("devloop-forward"))
        .map_err(|looked| KubeError::NoForwarder { looked })?;
    std::fs::read(&path).map_err(|e| KubeError::NoForwarder { looked: format!("{}: {e}", path.display()) })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
