//! `devloop doctor` and `devloop down`: checks that each service's target
//! can be used, and removes what devloop put into a cluster.
//!
//! Today devloop changes no Kubernetes object: what it leaves behind is the
//! agent binary in each container's /tmp (reused by the next run) and, after
//! a crash, possibly an agent process. `down` removes both.

use crate::config::{Service, Target};
use crate::target::kubernetes::{self, Cluster, KubeError};
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
    Need { verb: "create", group: "", resource: "pods", subresource: "exec", why: "inject and run the agent" },
    Need { verb: "get", group: "", resource: "pods", subresource: "log", why: "stream the container's log" },
    Need { verb: "get", group: "apps", resource: "deployments", subresource: "", why: "resolve `deployment:`" },
    Need { verb: "get", group: "apps", resource: "statefulsets", subresource: "", why: "resolve `statefulset:`" },
];

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

/// The smallest Role granting [`NEEDS`] in `ns`.
pub fn minimal_role(ns: &str) -> String {
    format!(
        "apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: devloop
  namespace: {ns}
rules:
- apiGroups: [\"\"]
  resources: [pods]
  verbs: [get, list]
- apiGroups: [\"\"]
  resources: [pods/exec]
  verbs: [create]
- apiGroups: [\"\"]
  resources: [pods/log]
  verbs: [get]
- apiGroups: [apps]
  resources: [deployments, statefulsets]
  verbs: [get]
"
    )
}

/// Checks one service; prints a report; returns whether all is well.
pub async fn check(svc: &Service) -> bool {
    println!("{}: {}", svc.name, svc.target.describe());
    match &svc.target {
        Target::Local { .. } | Target::Exec { .. } => match crate::target::local::agent_binary() {
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
                    println!(
                        "  FAIL  {}\n        hint: {}",
                        crate::session::error_chain(&e),
                        e.hint().unwrap_or_default()
                    );
                    return false;
                }
            };
            match c.client.apiserver_version().await {
                Ok(v) => println!("  ok    cluster reachable (Kubernetes {}.{})", v.major, v.minor),
                Err(e) => {
                    let e = KubeError::Api { what: "reach the API server".into(), source: e };
                    println!(
                        "  FAIL  {}\n        hint: {}",
                        crate::session::error_chain(&e),
                        e.hint().unwrap_or_default()
                    );
                    return false;
                }
            }
            let mut denied = false;
            for need in NEEDS {
                let what = if need.subresource.is_empty() {
                    format!("{} {}", need.verb, need.resource)
                } else {
                    format!("{} {}/{}", need.verb, need.resource, need.subresource)
                };
                match allowed(&c, need).await {
                    Ok(true) => println!("  ok    may {what} in {} ({})", c.namespace, need.why),
                    Ok(false) => {
                        denied = true;
                        println!("  FAIL  may not {what} in {} (needed to {})", c.namespace, need.why);
                    }
                    Err(e) => {
                        denied = true;
                        println!("  FAIL  cannot check {what}: {e}");
                    }
                }
            }
            match kubernetes::ready_pods(&c, &k.pods).await {
                Ok(p) if p.is_empty() => println!("  warn  no ready pods for {} yet", k.pods),
                Ok(p) => println!("  ok    {} ready pod(s) for {}", p.len(), k.pods),
                Err(e) => {
                    ok = false;
                    println!(
                        "  FAIL  {}\n        hint: {}",
                        crate::session::error_chain(&e),
                        e.hint().unwrap_or_default()
                    );
                }
            }
            if denied {
                println!("  The smallest Role that grants what devloop needs (bind it to your user):\n");
                for line in minimal_role(&c.namespace).lines() {
                    println!("    {line}");
                }
            }
            ok && !denied
        }
    }
}

/// Removes what devloop put into the service's pods. Safe to run twice.
pub async fn down(svc: &Service) -> bool {
    let Target::Kubernetes(k) = &svc.target else {
        println!("{}: nothing to undo on {}", svc.name, svc.target.describe());
        return true;
    };
    let c = match kubernetes::connect(k).await {
        Ok(c) => c,
        Err(e) => {
            println!("{}: {}\n  hint: {}", svc.name, crate::session::error_chain(&e), e.hint().unwrap_or_default());
            return false;
        }
    };
    let pods = match kubernetes::ready_pods(&c, &k.pods).await {
        Ok(p) => p,
        Err(e) => {
            println!("{}: {}\n  hint: {}", svc.name, crate::session::error_chain(&e), e.hint().unwrap_or_default());
            return false;
        }
    };
    let mut ok = true;
    for pod in pods {
        match kubernetes::remove_agent(&c, &pod, k.container.as_deref()).await {
            Ok(0) => println!("{}: {pod}: nothing to remove", svc.name),
            Ok(n) => println!("{}: {pod}: removed {n} agent file(s) and stopped any agent", svc.name),
            Err(e) => {
                ok = false;
                println!(
                    "{}: {pod}: {}\n  hint: {}",
                    svc.name,
                    crate::session::error_chain(&e),
                    e.hint().unwrap_or_default()
                );
            }
        }
    }
    ok
}
