//! The Kubernetes layer at its HTTP boundary: a scripted API server on
//! loopback answers each request from a script, records what was asked, and
//! the tests assert the exact request sequence and how answers (including
//! RBAC refusals) become devloop's errors. No cluster needed.

use devloop::config::PodSelector;
use devloop::endpoint::kubernetes::{ready_pods, KubeError};
use scripted::{cluster, scripted_server, scripted_server_with_bodies, status, Step};

#[path = "util/scripted.rs"]
mod scripted;

fn pod(name: &str, phase: &str, ready: bool, deleting: bool) -> serde_json::Value {
    let mut meta = serde_json::json!({"name": name, "namespace": "dev"});
    if deleting {
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z".into();
    }
    serde_json::json!({
        "metadata": meta,
        "spec": {"containers": [{"name": "main", "image": "x"}]},
        "status": {"phase": phase, "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}
    })
}

fn pod_list(items: Vec<serde_json::Value>) -> String {
    serde_json::json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items}).to_string()
}

/// Four pods: only `ready-a` and `ready-b` count (the others are pending,
/// not ready, or being deleted).
fn mixed_pods() -> String {
    pod_list(vec![
        pod("ready-b", "Running", true, false),
        pod("pending", "Pending", false, false),
        pod("not-ready", "Running", false, false),
        pod("terminating", "Running", true, true),
        pod("ready-a", "Running", true, false),
    ])
}

#[tokio::test]
async fn a_deployment_is_resolved_through_its_selector_and_only_ready_pods_count() {
    let dep = serde_json::json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
        "spec": {"selector": {"matchLabels": {"app": "web", "tier": "front"}}, "template": {}}
    });
    let (url, seen) = scripted_server(vec![
        Step { request: "GET /apis/apps/v1/namespaces/dev/deployments/web", status: 200, body: dep.to_string() },
        Step {
            request: "GET /api/v1/namespaces/dev/pods?&labelSelector=app%3Dweb%2Ctier%3Dfront",
            status: 200,
            body: mixed_pods(),
        },
    ])
    .await;
    let pods = ready_pods(&cluster(&url).await, &PodSelector::Deployment("web".into())).await.unwrap();
    assert_eq!(pods, vec!["ready-a", "ready-b"]);
    assert_eq!(
        *seen.lock().unwrap(),
        vec![
            "GET /apis/apps/v1/namespaces/dev/deployments/web",
            "GET /api/v1/namespaces/dev/pods?&labelSelector=app%3Dweb%2Ctier%3Dfront"
        ]
    );
}

#[tokio::test]
async fn statefulsets_labels_and_pod_names_are_each_one_lookup_away() {
    let ss = serde_json::json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "db"},
        "spec": {"selector": {"matchLabels": {"app": "db"}}, "serviceName": "db", "template": {}}
    });
    let (url, seen) = scripted_server(vec![
        Step { request: "GET /apis/apps/v1/namespaces/dev/statefulsets/db", status: 200, body: ss.to_string() },
        Step { request: "GET /api/v1/namespaces/dev/pods?&labelSelector=app%3Ddb", status: 200, body: mixed_pods() },
        Step {
            request: "GET /api/v1/namespaces/dev/pods?&labelSelector=role%3Dapi",
            status: 200,
            body: pod_list(vec![]),
        },
        Step {
            request: "GET /api/v1/namespaces/dev/pods/one",
            status: 200,
            body: pod("one", "Running", true, false).to_string(),
        },
        Step {
            request: "GET /api/v1/namespaces/dev/pods/gone",
            status: 404,
            body: status(404, "NotFound", "pods \"gone\" not found"),
        },
    ])
    .await;
    let c = cluster(&url).await;
    assert_eq!(ready_pods(&c, &PodSelector::StatefulSet("db".into())).await.unwrap(), vec!["ready-a", "ready-b"]);
    assert!(ready_pods(&c, &PodSelector::Labels("role=api".into())).await.unwrap().is_empty());
    assert_eq!(ready_pods(&c, &PodSelector::Pod("one".into())).await.unwrap(), vec!["one"]);
    // A named pod that does not exist is simply not ready (yet): devloop waits.
    assert!(ready_pods(&c, &PodSelector::Pod("gone".into())).await.unwrap().is_empty());
    assert_eq!(seen.lock().unwrap().len(), 5);
}

#[tokio::test]
async fn rbac_refusals_and_missing_workloads_become_errors_that_say_what_to_do() {
    let (url, _) = scripted_server(vec![
        Step {
            request: "GET /apis/apps/v1/namespaces/dev/deployments/web",
            status: 403,
            body: status(
                403,
                "Forbidden",
                "deployments.apps \"web\" is forbidden: User \"dev\" cannot get resource \"deployments\"",
            ),
        },
        Step {
            request: "GET /apis/apps/v1/namespaces/dev/deployments/nope",
            status: 404,
            body: status(404, "NotFound", "deployments.apps \"nope\" not found"),
        },
    ])
    .await;
    let c = cluster(&url).await;
    let e = ready_pods(&c, &PodSelector::Deployment("web".into())).await.unwrap_err();
    assert!(matches!(e, KubeError::Forbidden { .. }), "{e:?}");
    assert!(e.to_string().contains("cannot get resource \"deployments\""), "{e}");
    assert!(e.hint().unwrap().contains("Role"), "{:?}", e.hint());
    let e = ready_pods(&c, &PodSelector::Deployment("nope".into())).await.unwrap_err();
    assert!(matches!(e, KubeError::NotFound { .. }), "{e:?}");
    assert!(e.to_string().contains("deployment/nope in dev"), "{e}");
    assert!(e.hint().unwrap().contains("namespace"), "{:?}", e.hint());
}

#[tokio::test]
async fn selectors_with_match_expressions_are_refused_with_a_way_out() {
    let dep = serde_json::json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
        "spec": {"selector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["web"]}]}, "template": {}}
    });
    let (url, seen) = scripted_server(vec![Step {
        request: "GET /apis/apps/v1/namespaces/dev/deployments/web",
        status: 200,
        body: dep.to_string(),
    }])
    .await;
    let e = ready_pods(&cluster(&url).await, &PodSelector::Deployment("web".into())).await.unwrap_err();
    assert!(e.to_string().contains("matchExpressions") && e.to_string().contains("selector:"), "{e}");
    assert_eq!(seen.lock().unwrap().len(), 1, "no pod listing after a refused selector");
}

/// A Deployment whose container `main` runs `[python, app.py] --port 80`,
/// with the restart wrapper's record when `recorded`.
fn app_deployment(recorded: bool, command: serde_json::Value) -> String {
    let mut meta = serde_json::json!({"name": "web", "annotations": {"team": "a"}});
    if recorded {
        meta["annotations"]["devloop.dev/restart-wrapper"] =
            r#"{"container":"main","command":["python","app.py"],"args":["--port","80"]}"#.into();
    }
    serde_json::json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta,
        "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [
                {"name": "side", "image": "x"},
                {"name": "main", "image": "y", "command": command, "args": if recorded { serde_json::Value::Null } else { serde_json::json!(["--port", "80"]) }}
            ]}}
        }
    })
    .to_string()
}

const DEP: &str = "GET /apis/apps/v1/namespaces/dev/deployments/web";
const PATCH: &str = "PATCH /apis/apps/v1/namespaces/dev/deployments/web?";

#[tokio::test]
async fn the_restart_wrapper_is_recorded_on_the_workload_and_restored_exactly() {
    use devloop::endpoint::workload::{reconcile, restore, Done, Workload, ANNOTATION};
    let original = serde_json::json!(["python", "app.py"]);
    let wrapped = serde_json::json!(["/bin/sh", "-c", "…", "devloop-restart", "python", "app.py", "--port", "80"]);
    let (url, seen, bodies) = scripted_server_with_bodies(vec![
        // First start: wrap.
        Step { request: DEP, status: 200, body: app_deployment(false, original.clone()) },
        Step { request: PATCH, status: 200, body: app_deployment(true, wrapped.clone()) },
        // A start after a crash: the record is there, nothing is wrapped twice.
        Step { request: DEP, status: 200, body: app_deployment(true, wrapped.clone()) },
        // down, twice.
        Step { request: DEP, status: 200, body: app_deployment(true, wrapped.clone()) },
        Step { request: PATCH, status: 200, body: app_deployment(false, original.clone()) },
        Step { request: DEP, status: 200, body: app_deployment(false, original.clone()) },
    ])
    .await;
    let c = cluster(&url).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let rep = devloop::events::Reporter::new("web", tx);
    let w = Workload::Deployment("web".into());

    assert_eq!(reconcile(&c, &w, Some("main"), true, &rep).await.unwrap(), Done::Wrapped);
    let patch: serde_json::Value = serde_json::from_str(&bodies.lock().unwrap()[1]).unwrap();
    let record: serde_json::Value =
        serde_json::from_str(patch["metadata"]["annotations"][ANNOTATION].as_str().unwrap()).unwrap();
    assert_eq!(
        record,
        serde_json::json!({"container": "main", "command": ["python", "app.py"], "args": ["--port", "80"]})
    );
    let container = &patch["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["name"], "main", "only the chosen container is touched: {patch}");
    assert_eq!(container["args"], serde_json::Value::Null, "args are folded into the wrapped command");
    let cmd: Vec<&str> = container["command"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(&cmd[..2], ["/bin/sh", "-c"]);
    assert_eq!(&cmd[3..], ["devloop-restart", "python", "app.py", "--port", "80"]);
    let ev = rx.try_recv().unwrap();
    assert!(
        matches!(&ev.kind, devloop::events::Kind::WorkloadChanged { workload, .. } if workload == "deployment/web")
    );

    assert_eq!(reconcile(&c, &w, Some("main"), true, &rep).await.unwrap(), Done::Kept);

    assert_eq!(restore(&c, &w).await.unwrap().as_deref(), Some("main"));
    let patch: serde_json::Value = serde_json::from_str(&bodies.lock().unwrap()[4]).unwrap();
    assert_eq!(
        patch,
        serde_json::json!({
            "metadata": {"annotations": {ANNOTATION: null}},
            "spec": {"template": {"spec": {"containers": [
                {"name": "main", "command": ["python", "app.py"], "args": ["--port", "80"]}
            ]}}}
        })
    );
    assert_eq!(restore(&c, &w).await.unwrap(), None, "a second down has nothing to restore");
    assert_eq!(*seen.lock().unwrap(), vec![DEP, PATCH, DEP, DEP, PATCH, DEP]);
}

#[tokio::test]
async fn a_start_without_restarts_removes_a_left_wrapper_and_a_refused_patch_names_the_verb() {
    use devloop::endpoint::workload::{reconcile, Done, Workload};
    let wrapped = serde_json::json!(["/bin/sh", "-c", "…", "devloop-restart", "python", "app.py", "--port", "80"]);
    let (url, seen) = scripted_server(vec![
        Step { request: DEP, status: 200, body: app_deployment(true, wrapped.clone()) },
        Step { request: DEP, status: 200, body: app_deployment(true, wrapped.clone()) },
        Step { request: PATCH, status: 200, body: app_deployment(false, serde_json::json!(["python", "app.py"])) },
        Step { request: DEP, status: 200, body: app_deployment(false, serde_json::json!(["python", "app.py"])) },
        Step {
            request: PATCH,
            status: 403,
            body: status(
                403,
                "Forbidden",
                "deployments.apps \"web\" is forbidden: User \"dev\" cannot patch resource \"deployments\"",
            ),
        },
    ])
    .await;
    let c = cluster(&url).await;
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let rep = devloop::events::Reporter::new("web", tx);
    let w = Workload::Deployment("web".into());
    assert_eq!(reconcile(&c, &w, None, false, &rep).await.unwrap(), Done::Restored);
    let e = reconcile(&c, &w, Some("main"), true, &rep).await.unwrap_err();
    assert!(matches!(e, KubeError::Forbidden { .. }), "{e:?}");
    assert!(e.to_string().contains("patch deployment/web") && e.to_string().contains("cannot patch"), "{e}");
    assert!(e.hint().unwrap().contains("devloop doctor"), "{:?}", e.hint());
    assert_eq!(*seen.lock().unwrap(), vec![DEP, DEP, PATCH, DEP, PATCH]);
}

#[path = "util/fake_kube.rs"]
mod fake_kube;
mod util;

/// The agent the fake kubelet "uploads" and runs on this machine.
fn local_agent() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_BIN_EXE_devloop")).with_file_name("devloop-agent")
}

fn pod_project() -> util::Project {
    util::Project::with_yaml(
        "services:\n  web:\n    target:\n      kubernetes: {pod: web, root: /app}\n    sync:\n      - from: src\n",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injection_is_a_probe_a_verified_upload_then_the_agent_behind_a_port_forward() {
    let pod_fs = tempfile::tempdir().unwrap();
    let fake = fake_kube::FakeKube::start(pod_fs.path()).await;
    let p = pod_project();
    p.write("a.txt", b"alpha");
    let kubeconfig = fake.kubeconfig(p.dir.path());
    let agent = std::fs::read(local_agent()).unwrap();
    let sync = || {
        let out = p
            .cmd(&["--json", "sync", "--once"])
            .env("KUBECONFIG", &kubeconfig)
            .env("DEVLOOP_AGENT_STATIC", local_agent())
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let t0 = std::time::Instant::now();
    let (code, text) = tokio::task::block_in_place(sync);
    let fresh_ms = t0.elapsed().as_millis();
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(std::fs::read(fake.file("web", "/app/a.txt")).unwrap(), b"alpha");

    let reqs = fake.requests();
    let shape: Vec<String> = reqs
        .iter()
        .map(|r| {
            let words: Vec<&str> = r.split_whitespace().collect();
            match words.as_slice() {
                ["EXEC", "sh", "-c", "uname", ..] => "probe".into(),
                ["EXEC", "sh", "-c", "head", "-c", n, ..] => format!("upload {n}"),
                // The hash cache beside the agent, where `down` clears it.
                ["EXEC", agent, "serve", "--listen", "127.0.0.1:0", "--token-stdin", "--root", "/app", "--cache-dir", "/tmp"]
                    if agent.starts_with("/tmp/devloop-agent-") =>
                {
                    "start".into()
                }
                ["PORTFORWARD", _] => "forward".into(),
                _ => r.clone(),
            }
        })
        .collect();
    let get = "GET /api/v1/namespaces/dev/pods/web".to_string();
    let upload = format!("upload {}", agent.len());
    assert_eq!(shape, [&get, &get, "probe", &upload, "start", "forward"], "{reqs:#?}");
    // Up: the binary once, then the session token (32 hex digits and a newline).
    let up = fake.stdin_bytes.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(up, agent.len() as u64 + 33);

    // The agent is still there: the next start only probes it.
    let t0 = std::time::Instant::now();
    let (code, text) = tokio::task::block_in_place(sync);
    let reuse_ms = t0.elapsed().as_millis();
    assert_eq!(code, Some(0), "{text}");
    let again = &fake.requests()[reqs.len()..];
    assert_eq!(again.iter().filter(|r| r.starts_with("EXEC sh -c head")).count(), 0, "{again:#?}");
    assert_eq!(again.len(), 5, "get, get, probe, start, forward: {again:#?}");
    println!(
        "injection at the HTTP boundary: fresh {} requests, {up} bytes up ({:.3}x the {}-byte agent), {fresh_ms} ms; \
         reuse {} requests, {reuse_ms} ms",
        reqs.len(),
        up as f64 / agent.len() as f64,
        agent.len(),
        again.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_port_forward_is_reopened_to_the_same_agent_and_no_change_is_lost_or_sent_twice() {
    let pod_fs = tempfile::tempdir().unwrap();
    let fake = fake_kube::FakeKube::start(pod_fs.path()).await;
    let p = pod_project();
    p.write("a.txt", b"alpha");
    let kubeconfig = fake.kubeconfig(p.dir.path());
    let mut w = tokio::task::block_in_place(|| {
        let mut child = p.cmd(&["--json", "watch"]);
        child.env("KUBECONFIG", &kubeconfig).env("DEVLOOP_AGENT_STATIC", local_agent());
        util::Watching::spawn(child, 1)
    });
    let first = w.wait_first("agent_connected", std::time::Duration::from_secs(1));
    p.replace("a.txt", b"alpha 2");
    w.wait_event("sync_applied", std::time::Duration::from_secs(10));

    fake.cut_port_forwards();
    // Edits while the way to the agent is down.
    p.write("b.txt", b"beta");
    let lost = w.wait_event("agent_lost", std::time::Duration::from_secs(10));
    let again = w.wait_event("agent_connected", std::time::Duration::from_secs(10));
    assert_eq!(again["pid"], first["pid"], "the same agent, reached again: {lost}");
    assert_eq!(again["via"], first["via"]);
    let resync = w.wait_event("sync_started", std::time::Duration::from_secs(10));
    w.wait_event("in_sync", std::time::Duration::from_secs(10));
    assert_eq!(resync["files"], 1, "only b.txt travels again: {resync}");
    assert_eq!(std::fs::read(fake.file("web", "/app/a.txt")).unwrap(), b"alpha 2");
    assert_eq!(std::fs::read(fake.file("web", "/app/b.txt")).unwrap(), b"beta");
    let reqs = fake.requests();
    assert_eq!(reqs.iter().filter(|r| r.contains(" serve ")).count(), 1, "no second agent: {reqs:#?}");
    assert_eq!(reqs.iter().filter(|r| r.starts_with("PORTFORWARD")).count(), 2, "{reqs:#?}");
    assert_eq!(tokio::task::block_in_place(move || w.interrupt()), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_pod_gets_the_agent_and_the_tree_and_the_old_one_is_let_go() {
    let pod_fs = tempfile::tempdir().unwrap();
    let fake = fake_kube::FakeKube::start(pod_fs.path()).await;
    fake.set_pods(&["web-1"]);
    let p = util::Project::with_yaml(
        "services:\n  web:\n    target:\n      kubernetes: {selector: app=web, root: /app}\n    sync:\n      - from: src\n",
    );
    p.write("a.txt", b"alpha");
    p.write("d/b.txt", b"beta");
    let kubeconfig = fake.kubeconfig(p.dir.path());
    let mut w = tokio::task::block_in_place(|| {
        let mut child = p.cmd(&["--json", "watch"]);
        child.env("KUBECONFIG", &kubeconfig).env("DEVLOOP_AGENT_STATIC", local_agent());
        util::Watching::spawn(child, 1)
    });
    assert_eq!(std::fs::read(fake.file("web-1", "/app/d/b.txt")).unwrap(), b"beta");

    // A rollout: web-1 goes, web-2 comes; an edit lands meanwhile.
    fake.set_pods(&["web-2"]);
    p.replace("a.txt", b"alpha 2");
    let gone = w.wait_event("warning", std::time::Duration::from_secs(10));
    assert!(gone["message"].as_str().unwrap().contains("pod web-1 is gone"), "{gone}");
    let next = w.wait_event("agent_connected", std::time::Duration::from_secs(10));
    assert_eq!(next["service"], "web/web-2");
    w.wait_event("in_sync", std::time::Duration::from_secs(10));
    assert_eq!(std::fs::read(fake.file("web-2", "/app/a.txt")).unwrap(), b"alpha 2");
    assert_eq!(std::fs::read(fake.file("web-2", "/app/d/b.txt")).unwrap(), b"beta");
    // The new pod got its own upload; the list is what devloop follows.
    let reqs = fake.requests();
    assert_eq!(reqs.iter().filter(|r| r.starts_with("EXEC sh -c head")).count(), 2, "{reqs:#?}");
    assert!(reqs.iter().filter(|r| r.starts_with("GET /api/v1/namespaces/dev/pods?")).count() >= 2, "{reqs:#?}");
    assert_eq!(tokio::task::block_in_place(move || w.interrupt()), 0);
}

/// inotify watches held by a process.
fn inotify_watches(pid: u32) -> usize {
    let mut n = 0;
    for fd in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).unwrap().flatten() {
        if let Ok(info) = std::fs::read_to_string(fd.path()) {
            n += info.lines().filter(|l| l.starts_with("inotify wd:")).count();
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_one_set_of_watches_and_each_gets_every_edit() {
    let pod_fs = tempfile::tempdir().unwrap();
    let fake = fake_kube::FakeKube::start(pod_fs.path()).await;
    fake.set_pods(&["web-1", "web-2", "web-3"]);
    let p = util::Project::with_yaml(
        "services:\n  web:\n    target:\n      kubernetes: {selector: app=web, root: /app}\n    sync:\n      - from: src\n",
    );
    p.write("a.txt", b"alpha");
    p.write("d/e/b.txt", b"beta");
    let kubeconfig = fake.kubeconfig(p.dir.path());
    let w = tokio::task::block_in_place(|| {
        let mut child = p.cmd(&["--json", "watch"]);
        child.env("KUBECONFIG", &kubeconfig).env("DEVLOOP_AGENT_STATIC", local_agent());
        util::Watching::spawn(child, 3)
    });
    // src, src/d, src/d/e: three directories, watched once for three pods.
    assert_eq!(inotify_watches(w.child.id()), 3);
    p.replace("d/e/b.txt", b"beta 2");
    let t0 = std::time::Instant::now();
    for pod in ["web-1", "web-2", "web-3"] {
        while std::fs::read(fake.file(pod, "/app/d/e/b.txt")).unwrap() != b"beta 2" {
            assert!(t0.elapsed() < std::time::Duration::from_secs(10), "{pod} never got the edit");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    assert_eq!(tokio::task::block_in_place(move || w.interrupt()), 0);
}

#[tokio::test]
async fn a_shell_less_container_in_a_shared_process_namespace_is_refused_with_the_reason() {
    let mut p = pod("web", "Running", true, false);
    p["spec"]["shareProcessNamespace"] = true.into();
    let (url, seen) = scripted_server(vec![Step {
        request: "GET /api/v1/namespaces/dev/pods/web",
        status: 200,
        body: p.to_string(),
    }])
    .await;
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let rep = devloop::events::Reporter::new("web", tx);
    let e =
        devloop::endpoint::helper::ensure(&cluster(&url).await, "web", "main", "busybox:1.36", &rep).await.unwrap_err();
    assert!(e.to_string().contains("shares one process namespace"), "{e}");
    assert!(e.hint().unwrap().contains("shareProcessNamespace: false"), "{:?}", e.hint());
    assert_eq!(seen.lock().unwrap().len(), 1, "nothing is patched");
}
