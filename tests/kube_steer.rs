//! The intercept's steering at the Kubernetes HTTP boundary: which Service
//! and ports it resolves, what it records on each object it changes, how
//! a start after a crash finds and keeps its own changes, and how restore
//! (a clean exit, `down`, run twice) puts every object back, Service
//! first. A scripted API server checks each request in order.

use devloop::config::{Intercept, PortMap};
use devloop::endpoint::steer::{self, Applied, Record, Restored, ANNOTATION, SIDECAR};
use devloop::endpoint::workload::Workload;
use devloop::events::{Kind, Reporter};
use scripted::{cluster, scripted_server_with_bodies, status, Step};
use serde_json::{json, Value};
use sha2::Digest;

// For its request reader.
#[allow(dead_code)]
#[path = "util/fake_kube.rs"]
mod fake_kube;
#[path = "util/scripted.rs"]
mod scripted;

const DEP: &str = "GET /apis/apps/v1/namespaces/dev/deployments/web";
const PATCH_DEP: &str = "PATCH /apis/apps/v1/namespaces/dev/deployments/web?";
const SERVICES: &str = "GET /api/v1/namespaces/dev/services?";
const SVC: &str = "GET /api/v1/namespaces/dev/services/web";
const PATCH_SVC: &str = "PATCH /api/v1/namespaces/dev/services/web?";
const CM: &str = "GET /api/v1/namespaces/dev/configmaps/devloop-forward-web";
const POST_CM: &str = "POST /api/v1/namespaces/dev/configmaps?";
const DELETE_CM: &str = "DELETE /api/v1/namespaces/dev/configmaps/devloop-forward-web?";
const PODS: &str = "GET /api/v1/namespaces/dev/pods?&labelSelector=app%3Dweb";

/// The forwarder the tests "upload".
const FORWARDER: &[u8] = b"\x7fELF pretend forwarder";

fn intercept(ports: &[&str]) -> Intercept {
    Intercept {
        service: None,
        ports: ports.iter().map(|p| PortMap::parse(p).unwrap()).collect(),
        header: None,
        lease_ms: 3000,
        listen: None,
        fallback: None,
    }
}

/// The workload: container `main` declares `http` (8080) and, in the way
/// of the forwarder's first port, `metrics` (47080). With `record`, a
/// previous run's forwarder is in it.
fn deployment(record: Option<&Record>) -> String {
    let mut d = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "dev", "annotations": {"team": "a"}},
        "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web", "tier": "front"}},
                "spec": {"containers": [{"name": "main", "image": "shop/web:1", "ports": [
                    {"name": "http", "containerPort": 8080},
                    {"name": "metrics", "containerPort": 47080}
                ]}]}
            }
        }
    });
    if let Some(r) = record {
        d["metadata"]["annotations"][ANNOTATION] = serde_json::to_string(r).unwrap().into();
        d["spec"]["template"]["spec"]["containers"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": SIDECAR, "image": "shop/web:1"}));
        d["spec"]["template"]["spec"]["volumes"] =
            json!([{"name": "devloop-forward", "configMap": {"name": "devloop-forward-web"}}]);
    }
    d.to_string()
}

/// Service `web`: port 80 (`http`, to the named container port) and 9000.
/// `steered`: as devloop leaves it while intercepting.
fn web_service(steered: bool) -> Value {
    let mut s = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "dev", "resourceVersion": "41"},
        "spec": {
            "selector": {"app": "web"},
            "ports": [
                {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"},
                {"name": "admin", "port": 9000, "targetPort": 9000, "protocol": "TCP"}
            ]
        }
    });
    if steered {
        s["metadata"]["resourceVersion"] = "42".into();
        s["spec"]["ports"][0]["targetPort"] = "devloop-0".into();
        s["metadata"]["annotations"] = json!({ANNOTATION: json!({
            "workload": "deployment/web", "targets": [{"port": 80, "targetPort": "http"}]
        }).to_string()});
    }
    s
}

fn service_list(items: Vec<Value>) -> String {
    json!({"apiVersion": "v1", "kind": "ServiceList", "metadata": {}, "items": items}).to_string()
}

/// Services that do not select the workload: another app's, and one with
/// no selector (its endpoints are managed by hand).
fn others() -> Vec<Value> {
    vec![
        json!({"metadata": {"name": "other"}, "spec": {"selector": {"app": "other"}, "ports": [{"port": 80}]}}),
        json!({"metadata": {"name": "external"}, "spec": {"ports": [{"port": 80}]}}),
    ]
}

fn configmap(sha: &str) -> String {
    json!({"apiVersion": "v1", "kind": "ConfigMap",
           "metadata": {"name": "devloop-forward-web", "annotations": {"devloop.dev/forwarder-sha256": sha}}})
    .to_string()
}

fn sha(b: &[u8]) -> String {
    sha2::Sha256::digest(b).iter().map(|x| format!("{x:02x}")).collect()
}

fn reporter() -> (Reporter, tokio::sync::mpsc::UnboundedReceiver<devloop::events::Event>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    (Reporter::new("web", tx), rx)
}

fn expected_record() -> Record {
    Record {
        service: "web".into(),
        configmap: "devloop-forward-web".into(),
        ports: vec![steer::Port {
            port: 80,
            name: Some("http".into()),
            app: 8080,
            // 47080 is the app's `metrics`: the forwarder takes the next.
            listen: 47081,
            listen_name: "devloop-0".into(),
            claim: 47180,
        }],
    }
}

#[tokio::test]
async fn the_service_and_ports_are_resolved_and_bad_ones_say_what_to_do() {
    let two = {
        let mut twin = web_service(false);
        twin["metadata"]["name"] = "web-canary".into();
        service_list(vec![web_service(false), twin])
    };
    let mut unknown_target = web_service(false);
    unknown_target["spec"]["ports"][0]["targetPort"] = "grpc".into();
    let (url, seen, _) = scripted_server_with_bodies(vec![
        // The one Service whose selector the pod labels satisfy; the
        // port by name, its named targetPort resolved in the template.
        Step { request: DEP, status: 200, body: deployment(None) },
        Step { request: SERVICES, status: 200, body: service_list([others(), vec![web_service(false)]].concat()) },
        // A port the Service does not have.
        Step { request: DEP, status: 200, body: deployment(None) },
        Step { request: SERVICES, status: 200, body: service_list(vec![web_service(false)]) },
        // Two Services select the pods.
        Step { request: DEP, status: 200, body: deployment(None) },
        Step { request: SERVICES, status: 200, body: two },
        // None does.
        Step { request: DEP, status: 200, body: deployment(None) },
        Step { request: SERVICES, status: 200, body: service_list(others()) },
        // A targetPort name no container declares.
        Step { request: DEP, status: 200, body: deployment(None) },
        Step { request: SERVICES, status: 200, body: service_list(vec![unknown_target]) },
        // A Service named in the config that does not select the pods.
        Step { request: DEP, status: 200, body: deployment(None) },
        Step { request: "GET /api/v1/namespaces/dev/services/other", status: 200, body: others()[0].to_string() },
        // Services may not be listed.
        Step { request: DEP, status: 200, body: deployment(None) },
        Step {
            request: SERVICES,
            status: 403,
            body: status(403, "Forbidden", "services is forbidden: User \"dev\" cannot list resource \"services\""),
        },
    ])
    .await;
    let c = cluster(&url).await;
    let w = Workload::Deployment("web".into());
    let r = steer::resolve(&c, &w, None, &intercept(&["http:3000"])).await.unwrap();
    assert_eq!(r, expected_record());
    let plan = steer::plan(&r, &intercept(&["http:3000"]));
    assert_eq!(plan.ports[0].listen, "127.0.0.1:47180", "the agent claims on the pod's loopback");
    assert_eq!(plan.ports[0].app.as_deref(), Some("127.0.0.1:8080"));
    assert_eq!(plan.local.get(&80), Some(&3000));

    let err = |e: devloop::endpoint::kubernetes::KubeError| (e.to_string(), e.hint().unwrap_or_default());
    let (m, h) = err(steer::resolve(&c, &w, None, &intercept(&["8443:3000"])).await.unwrap_err());
    assert!(m.contains("no port `8443` (it has: 80 (http), 9000 (admin))"), "{m}");
    assert!(h.contains("intercept.ports"), "{h}");
    let (m, h) = err(steer::resolve(&c, &w, None, &intercept(&["80:3000"])).await.unwrap_err());
    assert!(m.contains("several Services select its pods: web, web-canary"), "{m}");
    assert!(h.contains("intercept.service"), "{h}");
    let (m, h) = err(steer::resolve(&c, &w, None, &intercept(&["80:3000"])).await.unwrap_err());
    assert!(m.contains("no Service in dev selects its pods"), "{m}");
    assert!(h.contains("intercept.service"), "{h}");
    let (m, _) = err(steer::resolve(&c, &w, None, &intercept(&["80:3000"])).await.unwrap_err());
    assert!(m.contains("targetPort `grpc` is not a named port"), "{m}");
    let mut named = intercept(&["80:3000"]);
    named.service = Some("other".into());
    let (m, _) = err(steer::resolve(&c, &w, None, &named).await.unwrap_err());
    assert!(m.contains("service/other") && m.contains("does not select the pods of deployment/web"), "{m}");
    let (m, h) = err(steer::resolve(&c, &w, None, &intercept(&["80:3000"])).await.unwrap_err());
    assert!(m.contains("list services in dev") && m.contains("HTTP 403"), "{m}");
    assert!(h.contains("devloop doctor"), "{h}");
    assert_eq!(seen.lock().unwrap().len(), 14, "{:?}", seen.lock().unwrap());
}

/// Start, crash, start again, then clean up twice: every request in order,
/// every change recorded on its object, and put back exactly.
#[tokio::test]
async fn each_change_is_recorded_kept_after_a_crash_and_restored_service_first() {
    let record = expected_record();
    let sha = sha(FORWARDER);
    let (url, seen, bodies) = scripted_server_with_bodies(vec![
        // First start: the ConfigMap, the sidecar, then (rolled out) the
        // Service.
        Step { request: DEP, status: 200, body: deployment(None) },
        Step {
            request: CM,
            status: 404,
            body: status(404, "NotFound", "configmaps \"devloop-forward-web\" not found"),
        },
        Step { request: POST_CM, status: 201, body: configmap(&sha) },
        Step { request: SVC, status: 200, body: web_service(false).to_string() },
        Step { request: PATCH_DEP, status: 200, body: deployment(Some(&record)) },
        Step { request: SVC, status: 200, body: web_service(false).to_string() },
        Step { request: PATCH_SVC, status: 200, body: web_service(true).to_string() },
        // devloop was killed; the next start resolves the same record
        // (the Service's original targetPort comes from its annotation),
        // and changes nothing.
        Step { request: DEP, status: 200, body: deployment(Some(&record)) },
        Step { request: SERVICES, status: 200, body: service_list(vec![web_service(true)]) },
        Step { request: DEP, status: 200, body: deployment(Some(&record)) },
        Step { request: CM, status: 200, body: configmap(&sha) },
        Step { request: SVC, status: 200, body: web_service(true).to_string() },
        // Restore: the Service first, then the template, then the
        // ConfigMap.
        Step { request: SERVICES, status: 200, body: service_list(vec![web_service(true)]) },
        Step { request: PATCH_SVC, status: 200, body: web_service(false).to_string() },
        Step { request: DEP, status: 200, body: deployment(Some(&record)) },
        Step { request: PATCH_DEP, status: 200, body: deployment(None) },
        Step { request: DELETE_CM, status: 200, body: configmap(&sha) },
        // And again (`down` after the clean exit): nothing left to do.
        Step { request: SERVICES, status: 200, body: service_list(vec![web_service(false)]) },
        Step { request: DEP, status: 200, body: deployment(None) },
        Step {
            request: DELETE_CM,
            status: 404,
            body: status(404, "NotFound", "configmaps \"devloop-forward-web\" not found"),
        },
    ])
    .await;
    let c = cluster(&url).await;
    let w = Workload::Deployment("web".into());
    let (rep, mut events) = reporter();
    let body = |i: usize| -> Value { serde_json::from_str(&bodies.lock().unwrap()[i]).unwrap() };

    assert_eq!(steer::apply(&c, &w, None, &record, FORWARDER, &rep).await.unwrap(), Applied::Added);
    let cm: k8s_openapi::api::core::v1::ConfigMap = serde_json::from_value(body(2)).unwrap();
    assert_eq!(cm.binary_data.unwrap()["devloop-forward"].0, FORWARDER, "the forwarder travels in the ConfigMap");
    let patch = body(4);
    let recorded: Record =
        serde_json::from_str(patch["metadata"]["annotations"][ANNOTATION].as_str().unwrap()).unwrap();
    assert_eq!(recorded, record, "the workload records what was added");
    let side = &patch["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(side["name"], SIDECAR);
    assert_eq!(side["image"], "shop/web:1", "the forwarder runs in the app's own image");
    assert_eq!(side["command"], json!(["/devloop-forward/devloop-forward"]));
    assert_eq!(side["args"], json!(["0.0.0.0:47081=127.0.0.1:8080+127.0.0.1:47180"]));
    assert_eq!(side["ports"], json!([{"name": "devloop-0", "containerPort": 47081, "protocol": "TCP"}]));
    assert_eq!(side["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        patch["spec"]["template"]["spec"]["volumes"],
        json!([{"name": "devloop-forward", "configMap": {"name": "devloop-forward-web", "defaultMode": 493}}])
    );
    assert_eq!(
        patch["spec"]["template"]["spec"]["containers"].as_array().unwrap().len(),
        1,
        "the app's container is untouched"
    );

    assert!(steer::steer_service(&c, &w, &record, &rep).await.unwrap());
    let patch = body(6);
    assert_eq!(patch["metadata"]["resourceVersion"], "41", "the patch fails if the Service changed meanwhile");
    assert_eq!(
        patch["spec"]["ports"][0]["targetPort"], "devloop-0",
        "by name: pods without the forwarder are left out"
    );
    assert_eq!(patch["spec"]["ports"][1]["targetPort"], 9000, "ports not intercepted are kept");
    let svc_record: Value =
        serde_json::from_str(patch["metadata"]["annotations"][ANNOTATION].as_str().unwrap()).unwrap();
    assert_eq!(svc_record, json!({"workload": "deployment/web", "targets": [{"port": 80, "targetPort": "http"}]}));

    // After a crash.
    let again = steer::resolve(&c, &w, None, &intercept(&["http:3000"])).await.unwrap();
    assert_eq!(again, record, "the same ports again, from the recorded original targetPort");
    assert_eq!(steer::apply(&c, &w, None, &record, FORWARDER, &rep).await.unwrap(), Applied::Kept);
    assert!(!steer::steer_service(&c, &w, &record, &rep).await.unwrap(), "steered already: nothing to do");

    let r = steer::restore(&c, &w, &rep).await.unwrap();
    assert_eq!(r, Restored { services: vec!["web".into()], template: true, configmap: true });
    let patch = body(13);
    assert_eq!(patch["spec"]["ports"][0]["targetPort"], "http", "the original targetPort, by name as it was");
    assert_eq!(patch["metadata"]["annotations"][ANNOTATION], Value::Null);
    assert_eq!(patch["metadata"]["resourceVersion"], "42");
    assert_eq!(
        body(15),
        json!({
            "metadata": {"annotations": {ANNOTATION: null}},
            "spec": {"template": {"spec": {
                "containers": [{"name": SIDECAR, "$patch": "delete"}],
                "volumes": [{"name": "devloop-forward", "$patch": "delete"}]
            }}}
        })
    );
    assert_eq!(steer::restore(&c, &w, &rep).await.unwrap(), Restored::default(), "a second restore has nothing to do");
    assert_eq!(
        *seen.lock().unwrap(),
        vec![
            DEP, CM, POST_CM, SVC, PATCH_DEP, SVC, PATCH_SVC, DEP, SERVICES, DEP, CM, SVC, SERVICES, PATCH_SVC, DEP,
            PATCH_DEP, DELETE_CM, SERVICES, DEP, DELETE_CM
        ]
    );
    let mut changed = Vec::new();
    while let Ok(e) = events.try_recv() {
        if let Kind::WorkloadChanged { workload, .. } = e.kind {
            changed.push(workload);
        }
    }
    assert_eq!(
        changed,
        ["deployment/web", "service/web", "service/web", "deployment/web"],
        "each change is said: forwarder added, Service steered, Service restored, forwarder removed"
    );
}

fn pod(name: &str, forwarder: bool, ready: bool, deleting: bool) -> Value {
    let mut containers = vec![json!({"name": "main", "image": "shop/web:1"})];
    if forwarder {
        containers.push(json!({"name": SIDECAR, "image": "shop/web:1"}));
    }
    let mut meta = json!({"name": name, "namespace": "dev"});
    if deleting {
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z".into();
    }
    json!({
        "metadata": meta,
        "spec": {"containers": containers},
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}
    })
}

fn pods(items: Vec<Value>) -> String {
    json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items}).to_string()
}

#[tokio::test]
async fn the_service_waits_until_no_pod_lacks_the_forwarder_and_a_stuck_rollout_is_an_error() {
    let (url, seen, _) = scripted_server_with_bodies(vec![
        // Mid-rollout: an old pod serves, the new one is not ready.
        Step { request: DEP, status: 200, body: deployment(None) },
        Step {
            request: PODS,
            status: 200,
            body: pods(vec![pod("old", false, true, false), pod("new", true, false, false)]),
        },
        // The old one is going; the new one is ready.
        Step { request: DEP, status: 200, body: deployment(None) },
        Step {
            request: PODS,
            status: 200,
            body: pods(vec![pod("old", false, true, true), pod("new", true, true, false)]),
        },
        // A rollout that never starts (a quota, say).
        Step { request: DEP, status: 200, body: deployment(None) },
        Step { request: PODS, status: 200, body: pods(vec![pod("old", false, true, false)]) },
        Step { request: DEP, status: 200, body: deployment(None) },
        Step { request: PODS, status: 200, body: pods(vec![pod("old", false, true, false)]) },
    ])
    .await;
    let c = cluster(&url).await;
    let w = Workload::Deployment("web".into());
    let (rep, mut events) = reporter();
    steer::rolled_out(&c, &w, std::time::Duration::from_secs(30), &rep).await.unwrap();
    assert_eq!(seen.lock().unwrap().len(), 4, "done once the pod without the forwarder is going");
    let said = events.try_recv().unwrap();
    assert!(
        matches!(&said.kind, Kind::Warning { message } if message.contains("0 pod(s) with the forwarder ready, 1 still without it")),
        "{said:?}"
    );
    let e = steer::rolled_out(&c, &w, std::time::Duration::from_millis(500), &rep).await.unwrap_err();
    assert!(e.to_string().contains("rollout did not finish"), "{e}");
    assert!(e.hint().unwrap().contains("devloop down"), "{:?}", e.hint());
}
