//! `devloop doctor` and `devloop down`: checks that each service's target
//! can be used, and removes what devloop put into a cluster.
//!
//! What devloop leaves in a cluster: the agent binary in each container's
//! /tmp (reused by the next run), after a crash possibly an agent process,
//! for a service that restarts the container's own process the restart
//! wrapper on its workload (recorded in an annotation), after a crash of
//! an intercept the Service steered to the forwarder, the forwarder in the
//! pod template and its ConfigMap (each recorded in an annotation), and
//! the ReplicaSets those rollouts made. `down` removes them all and
//! restores the Service and the workload.

use crate::config::{Service, Target};
use crate::endpoint::kubernetes::{self, Cluster, KubeError};
use crate::endpoint::{helper, steer, workload};
use k8s_openapi::api::authorization::v1::SelfSubjectAccessReview;
use kube::api::{Api, PostParams};

/// One permission devloop needs in a service's namespace.
pub struct Need {
    pub verb: &'static str,
    pub group: &'static str,
    pub resource: &'static str,
    pub subresource: &'static str,
    pub why: &'static str,
}

/// Everything the Kubernetes target uses.
pub const NEEDS: &[Need] = &[
    Need { verb: "get", group: "", resource: "pods", subresource: "", why: "read a pod's containers" },
    Need { verb: "list", group: "", resource: "pods", subresource: "", why: "find the ready pods" },
    // Exec and port-forward go over WebSocket, an HTTP GET: clusters
    // authorize it as `get` and, since Kubernetes 1.30, also as `create`.
    Need { verb: "get", group: "", resource: "pods", subresource: "exec", why: "inject and run the agent" },
    Need { verb: "create", group: "", resource: "pods", subresource: "exec", why: "inject and run the agent" },
    Need {
        verb: "get",
        group: "",
        resource: "pods",
        subresource: "portforward",
        why: "reach the agent (else devloop falls back to exec)",
    },
    Need {
        verb: "create",
        group: "",
        resource: "pods",
        subresource: "portforward",
        why: "reach the agent (else devloop falls back to exec)",
    },
    Need { verb: "get", group: "", resource: "pods", subresource: "log", why: "stream the container's log" },
    Need { verb: "get", group: "apps", resource: "deployments", subresource: "", why: "resolve `deployment:`" },
    Need { verb: "get", group: "apps", resource: "statefulsets", subresource: "", why: "resolve `statefulset:`" },
];

/// What restarting a container's own process adds.
pub const RESTART_NEEDS: &[Need] = &[
    Need {
        verb: "patch",
        group: "apps",
        resource: "deployments",
        subresource: "",
        why: "put the restart wrapper on a Deployment",
    },
    Need {
        verb: "patch",
        group: "apps",
        resource: "statefulsets",
        subresource: "",
        why: "put the restart wrapper on a StatefulSet",
    },
    Need { verb: "list", group: "apps", resource: "replicasets", subresource: "", why: "find the wrapper's rollout" },
    Need {
        verb: "delete",
        group: "apps",
        resource: "replicasets",
        subresource: "",
        why: "remove the wrapper's rollout on `down`",
    },
];

/// What an intercept adds.
pub const INTERCEPT_NEEDS: &[Need] = &[
    Need { verb: "get", group: "", resource: "services", subresource: "", why: "read the intercepted Service" },
    Need { verb: "list", group: "", resource: "services", subresource: "", why: "find the Service of the workload" },
    Need { verb: "patch", group: "", resource: "services", subresource: "", why: "steer the Service to the forwarder" },
    Need { verb: "get", group: "", resource: "configmaps", subresource: "", why: "check the forwarder's ConfigMap" },
    Need { verb: "create", group: "", resource: "configmaps", subresource: "", why: "bring the forwarder to pods" },
    Need { verb: "update", group: "", resource: "configmaps", subresource: "", why: "update the forwarder" },
    Need { verb: "delete", group: "", resource: "configmaps", subresource: "", why: "remove the forwarder on exit" },
    Need {
        verb: "patch",
        group: "apps",
        resource: "deployments",
        subresource: "",
        why: "add the forwarder to a Deployment",
    },
    Need {
        verb: "patch",
        group: "apps",
        resource: "statefulsets",
        subresource: "",
        why: "add the forwarder to a StatefulSet",
    },
    Need { verb: "list", group: "apps", resource: "replicasets", subresource: "", why: "find the forwarder's rollout" },
    Need {
        verb: "delete",
        group: "apps",
        resource: "replicasets",
        subresource: "",
        why: "remove the forwarder's rollout on `down`",
    },
];

/// What only some pods need: images with no shell get a helper container.
pub const OPTIONAL_NEEDS: &[Need] = &[Need {
    verb: "patch",
    group: "",
    resource: "pods",
    subresource: "ephemeralcontainers",
    why: "inject into images with no shell, through a helper container",
}];

/// What a service needs.
pub fn needs(svc: &Service) -> Vec<&'static Need> {
    let restarts = svc.app.as_ref().is_some_and(|a| a.spec.is_none());
    let intercepts = svc.intercept.is_some();
    NEEDS
        .iter()
        .chain(RESTART_NEEDS.iter().filter(|_| restarts))
        .chain(INTERCEPT_NEEDS.iter().filter(|_| intercepts))
        .collect()
}

/// Asks the API server whether the current user may do `need` in `ns`.
pub async fn allowed(c: &Cluster, need: &Need) -> Result<bool, kube::Error> {
    let review: SelfSubjectAccessReview = serde_json::from_value(serde_json::json!({
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectAccessReview",
        "spec": {"resourceAttributes": {
            "namespace": c.namespace, "verb": need.verb, "group": need.group,
            "resource": need.resource, "subresource": need.subresource
        }}
    }))
    // A literal of known shape.
    .expect("review serializes");
    let api: Api<SelfSubjectAccessReview> = Api::all(c.client.clone());
    let r = api.create(&PostParams::default(), &review).await?;
    Ok(r.status.is_some_and(|s| s.allowed))
}

/// The smallest Role granting `needs` in `ns`: one rule per API group and
/// resource, with its verbs.
pub fn minimal_role(ns: &str, needs: &[&Need]) -> String {
    let mut rules: Vec<(&str, String, Vec<&str>)> = Vec::new();
    for n in needs {
        let res =
            if n.subresource.is_empty() { n.resource.to_string() } else { format!("{}/{}", n.resource, n.subresource) };
        match rules.iter_mut().find(|(g, r, _)| *g == n.group && *r == res) {
            Some((_, _, verbs)) if !verbs.contains(&n.verb) => verbs.push(n.verb),
            Some(_) => {}
            None => rules.push((n.group, res, vec![n.verb])),
        }
    }
    let mut out = format!(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata:\n  name: devloop\n  namespace: {ns}\nrules:\n"
    );
    for (group, res, verbs) in rules {
        out.push_str(&format!("- apiGroups: [\"{group}\"]\n  resources: [{res}]\n  verbs: [{}]\n", verbs.join(", ")));
    }
    out
}

/// Checks one service; prints a report; returns whether all is well.
pub async fn check(svc: &Service) -> bool {
    println!("{}: {}", svc.name, svc.target.describe());
    match &svc.target {
        Target::Local { .. } | Target::Exec { .. } => match crate::endpoint::local::agent_binary() {
            Ok(p) => {
                println!("  ok    agent binary {}", p.display());
                true
            }
            Err(e) => {
                println!("  FAIL  {e}");
                if let Some(h) = e.hint() {
                    println!("        hint: {h}");
                }
                false
            }
        },
        Target::Kubernetes(k) => {
            let mut ok = true;
            match kubernetes::agent_image() {
                Ok(a) => println!("  ok    static agent {} ({} bytes)", a.path.display(), a.bytes.len()),
                Err(e) => {
                    ok = false;
                    println!("  FAIL  {e}\n        hint: {}", e.hint().unwrap_or_default());
                }
            }
            let c = match kubernetes::connect(k).await {
                Ok(c) => c,
                Err(e) => {
                    println!("  FAIL  {}\n        hint: {}", crate::error::chain(&e), e.hint().unwrap_or_default());
                    return false;
                }
            };
            match c.client.apiserver_version().await {
                Ok(v) => println!("  ok    cluster reachable (Kubernetes {}.{})", v.major, v.minor),
                Err(e) => {
                    let e = KubeError::Api { what: "reach the API server".into(), source: e };
                    println!("  FAIL  {}\n        hint: {}", crate::error::chain(&e), e.hint().unwrap_or_default());
                    return false;
                }
            }
            let mut denied = false;
            let mut needs = needs(svc);
            let required = needs.len();
            needs.extend(OPTIONAL_NEEDS);
            for (i, need) in needs.iter().enumerate() {
                let what = if need.subresource.is_empty() {
                    format!("{} {}", need.verb, need.resource)
                } else {
                    format!("{} {}/{}", need.verb, need.resource, need.subresource)
                };
                // Optional rights only warn: most images have a shell.
                let (bad, optional) = if i < required { ("FAIL", false) } else { ("warn", true) };
                match allowed(&c, need).await {
                    Ok(true) => println!("  ok    may {what} in {} ({})", c.namespace, need.why),
                    Ok(false) => {
                        denied |= !optional;
                        println!("  {bad}  may not {what} in {} (needed to {})", c.namespace, need.why);
                    }
                    Err(e) => {
                        denied |= !optional;
                        println!("  {bad}  cannot check {what}: {e}");
                    }
                }
            }
            match kubernetes::ready_pods(&c, &k.pods).await {
                Ok(p) if p.is_empty() => println!("  warn  no ready pods for {} yet", k.pods),
                Ok(p) => println!("  ok    {} ready pod(s) for {}", p.len(), k.pods),
                Err(e) => {
                    ok = false;
                    println!("  FAIL  {}\n        hint: {}", crate::error::chain(&e), e.hint().unwrap_or_default());
                }
            }
            if denied {
                println!("  The smallest Role that grants what devloop needs (bind it to your user):\n");
                for line in minimal_role(&c.namespace, &needs).lines() {
                    println!("    {line}");
                }
            }
            ok && !denied
        }
    }
}

/// Removes what devloop put into the service's pods. Safe to run twice.
pub async fn down(svc: &Service) -> bool {
    let k = match &svc.target {
        Target::Kubernetes(k) => k,
        Target::Local { root } => {
            // An intercept's forwarder that a killed devloop left running.
            let record = crate::endpoint::forwarder::record_path(root);
            if crate::endpoint::forwarder::stop(&record) {
                println!("{}: stopped the intercept's forwarder", svc.name);
            } else {
                println!("{}: nothing to undo on {}", svc.name, svc.target.describe());
            }
            return true;
        }
        Target::Exec { .. } => {
            println!("{}: nothing to undo on {}", svc.name, svc.target.describe());
            return true;
        }
    };
    let c = match kubernetes::connect(k).await {
        Ok(c) => c,
        Err(e) => {
            println!("{}: {}\n  hint: {}", svc.name, crate::error::chain(&e), e.hint().unwrap_or_default());
            return false;
        }
    };
    let pods = match kubernetes::ready_pods(&c, &k.pods).await {
        Ok(p) => p,
        Err(e) => {
            println!("{}: {}\n  hint: {}", svc.name, crate::error::chain(&e), e.hint().unwrap_or_default());
            return false;
        }
    };
    let mut ok = true;
    let fail = |what: &str, e: KubeError| {
        println!("{}: {what}: {}\n  hint: {}", svc.name, crate::error::chain(&e), e.hint().unwrap_or_default());
    };
    for pod in pods {
        match kubernetes::remove_agent(&c, &pod, k.container.as_deref()).await {
            Ok(0) => println!("{}: {pod}: nothing to remove", svc.name),
            Ok(n) => println!("{}: {pod}: removed {n} agent file(s) and stopped any agent", svc.name),
            Err(e) => {
                ok = false;
                fail(&pod, e);
            }
        }
        // Helper containers of images with no shell: the API cannot remove
        // them from the pod, so they are stopped.
        match helper::running(&c, &pod).await {
            Ok(helpers) => {
                for h in helpers {
                    let removed = kubernetes::remove_agent_in(&c, &pod, &h).await;
                    match helper::stop(&c, &pod, &h).await.and(removed) {
                        Ok(n) => println!(
                            "{}: {pod}: removed {n} agent file(s) and stopped helper container {h} \
                             (ephemeral containers stay listed in the pod, stopped, until it is replaced)",
                            svc.name
                        ),
                        Err(e) => {
                            ok = false;
                            fail(&format!("{pod}: {h}"), e);
                        }
                    }
                }
            }
            Err(e) => {
                ok = false;
                fail(&pod, e);
            }
        }
    }
    // The workload last: restoring it rolls its pods out. The intercept's
    // Service first: its calls go back to the app's port at once.
    if let Some(w) = workload::Workload::of(&k.pods) {
        let name = w.describe();
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let quiet = crate::events::Reporter::new(&svc.name, tx);
        match steer::restore(&c, &w, &quiet).await {
            Ok(r) => {
                for s in &r.services {
                    println!("{}: service/{s}: its ports point at the app again (intercept undone)", svc.name);
                }
                if r.template {
                    println!("{}: {name}: removed the intercept's forwarder", svc.name);
                }
                if r.configmap {
                    println!("{}: deleted the forwarder's ConfigMap", svc.name);
                }
                if r == steer::Restored::default() && svc.intercept.is_some() {
                    println!("{}: {name}: no intercept to undo", svc.name);
                }
            }
            Err(e) => {
                ok = false;
                fail(&name, e);
            }
        }
        match workload::restore(&c, &w).await {
            Ok(Some(container)) => println!(
                "{}: {name}: restored container `{container}` to its own command (removed the restart wrapper)",
                svc.name
            ),
            Ok(None) => println!("{}: {name}: no restart wrapper to remove", svc.name),
            Err(e) => {
                ok = false;
                fail(&name, e);
            }
        }
        match workload::remove_devloop_rollouts(&c, &w).await {
            Ok((0, 0)) => {}
            Ok((n, 0)) => println!("{}: {name}: deleted {n} ReplicaSet(s) of devloop's rollouts", svc.name),
            Ok((n, busy)) => println!(
                "{}: {name}: deleted {n} ReplicaSet(s) of devloop's rollouts; {busy} still scaling down \
                 (run `devloop down` again when the rollout is done)",
                svc.name
            ),
            Err(e) => {
                ok = false;
                fail(&name, e);
            }
        }
    }
    ok
}
