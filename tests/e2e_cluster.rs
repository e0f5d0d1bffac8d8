//! End-to-end checks against the real cluster named by `KUBECONFIG`
//! (`#[ignore]`d: run with `cargo test --test e2e_cluster -- --ignored`).
//! They must pass on any conformant cluster: each test makes its own
//! namespace `devloop-e2e-<random>` and deletes it; images come from
//! `DEVLOOP_E2E_IMAGE` (default `busybox:1.36`: `sh`, `httpd`, `wget`) and
//! `DEVLOOP_E2E_NOSHELL_IMAGE` (default `registry.k8s.io/pause:3.9`), pulled
//! `IfNotPresent`. What a cluster lacks is skipped with a line starting
//! `SKIP:` naming what is missing.
//!
//! This smoke test proves a cluster is real for everything the Kubernetes
//! target needs: a Deployment comes up; exec with framed stdin; port-forward;
//! log streaming; a Service routing through kube-proxy from another pod.

mod util;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use kube::api::{Api, AttachParams, DeleteParams, ListParams, LogParams, PostParams};
use kube::Client;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn image() -> String {
    std::env::var("DEVLOOP_E2E_IMAGE").unwrap_or_else(|_| "busybox:1.36".into())
}

fn noshell_image() -> String {
    std::env::var("DEVLOOP_E2E_NOSHELL_IMAGE").unwrap_or_else(|_| "registry.k8s.io/pause:3.9".into())
}

/// A client for the cluster in KUBECONFIG, or None (with a SKIP line) when
/// there is none.
async fn client() -> Option<Client> {
    if std::env::var_os("KUBECONFIG").is_none() {
        println!("SKIP: no cluster: KUBECONFIG is not set (scripts/test-cluster up prints one)");
        return None;
    }
    Some(Client::try_default().await.expect("KUBECONFIG names a cluster devloop can reach"))
}

/// The server's version, for SKIP lines: `1.20` (`v1.20.2`).
async fn server_version(client: &Client) -> String {
    match client.apiserver_version().await {
        Ok(v) => format!("{}.{} ({})", v.major, v.minor, v.git_version),
        Err(e) => format!("(version unknown: {e})"),
    }
}

/// A namespace of our own, deleted when the test ends (even on failure).
struct TestNamespace {
    name: String,
}

impl TestNamespace {
    async fn create(client: &Client) -> TestNamespace {
        let suffix: String = devloop::session::new_token()[..8].to_string();
        let name = format!("devloop-e2e-{suffix}");
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}
        }))
        .unwrap();
        Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await.unwrap();
        // The default service account is created asynchronously; pods need it.
        let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(client.clone(), &name);
        let t0 = Instant::now();
        while sas.get_opt("default").await.unwrap().is_none() {
            assert!(t0.elapsed() < Duration::from_secs(60), "no default service account in {name}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        TestNamespace { name }
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop cannot await, and the test's runtime (which drives the test's
        // client) is blocked here: delete from a thread with its own runtime
        // and its own client.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                if let Ok(client) = Client::try_default().await {
                    let namespaces = Api::<Namespace>::all(client);
                    let dp = DeleteParams::default();
                    let _ = tokio::time::timeout(Duration::from_secs(30), namespaces.delete(&name, &dp)).await;
                }
            });
        })
        .join();
    }
}

fn deployment(name: &str, image: &str, script: &str) -> Deployment {
    deployment_n(name, image, script, 1)
}

fn deployment_n(name: &str, image: &str, script: &str, replicas: i32) -> Deployment {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{
                        "name": "main", "image": image, "imagePullPolicy": "IfNotPresent",
                        "command": ["sh", "-c", script]
                    }]
                }
            }
        }
    }))
    .unwrap()
}

/// Waits for the ready pod of a one-replica `app` and returns its name.
async fn ready_pod(pods: &Api<Pod>, app: &str) -> String {
    ready_pods(pods, app, 1).await.remove(0)
}

/// Runs a command in a pod and returns its stdout; `stdin`, when given, is
/// sent and the command is expected to read exactly that many bytes (some
/// clusters' exec cannot half-close stdin, so stdin is always framed).
async fn exec(pods: &Api<Pod>, pod: &str, cmd: &[&str], stdin: Option<&[u8]>) -> String {
    exec_in(pods, pod, None, cmd, stdin).await
}

/// [`exec`] in a named container.
async fn exec_in(pods: &Api<Pod>, pod: &str, container: Option<&str>, cmd: &[&str], stdin: Option<&[u8]>) -> String {
    let mut ap = AttachParams::default().stdin(stdin.is_some()).stdout(true).stderr(false);
    if let Some(c) = container {
        ap = ap.container(c);
    }
    let mut p = pods.exec(pod, cmd.iter().map(|s| s.to_string()).collect::<Vec<_>>(), &ap).await.unwrap();
    if let Some(data) = stdin {
        let mut w = p.stdin().unwrap();
        w.write_all(data).await.unwrap();
        w.flush().await.unwrap();
    }
    let mut out = String::new();
    p.stdout().unwrap().read_to_string(&mut out).await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(10), p.join()).await;
    out
}

#[tokio::test]
#[ignore = "needs a cluster: KUBECONFIG (see scripts/test-cluster)"]
async fn cluster_smoke_exec_portforward_logs_and_service_routing() {
    let Some(client) = client().await else { return };
    let ns = TestNamespace::create(&client).await;
    let deps: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let svcs: Api<Service> = Api::namespaced(client.clone(), &ns.name);

    let web = "mkdir -p /tmp/www && echo hello-from-pod > /tmp/www/index.html && echo devloop-ready && exec httpd -f -v -p 8080 -h /tmp/www";
    deps.create(&PostParams::default(), &deployment("web", &image(), web)).await.unwrap();
    deps.create(&PostParams::default(), &deployment("client", &image(), "exec sleep 3600")).await.unwrap();
    let pod = ready_pod(&pods, "web").await;

    println!("step: exec with framed stdin in {pod}");
    // Exec, with stdin framed by length.
    let got = exec(&pods, &pod, &["sh", "-c", "head -c 11 > /tmp/f && cat /tmp/f"], Some(b"hello world")).await;
    assert_eq!(got, "hello world", "exec with framed stdin");

    println!("step: port-forward");
    // Port-forward to httpd.
    let mut pf = tokio::time::timeout(Duration::from_secs(30), pods.portforward(&pod, &[8080]))
        .await
        .expect("port-forward opens")
        .unwrap();
    let mut s = pf.take_stream(8080).unwrap();
    s.write_all(b"GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n").await.unwrap();
    let mut resp = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut resp))
        .await
        .expect("port-forward answers")
        .unwrap();
    let resp = String::from_utf8_lossy(&resp);
    assert!(resp.contains("200") && resp.contains("hello-from-pod"), "port-forward response: {resp}");
    drop(s);
    let _ = tokio::time::timeout(Duration::from_secs(10), pf.join()).await;
    println!("step: logs");

    // Logs stream (the readiness line, then httpd's request log).
    let logs = pods.log_stream(&pod, &LogParams { follow: true, ..Default::default() }).await.unwrap();
    let mut lines = futures_util::AsyncBufReadExt::lines(logs);
    let first = tokio::time::timeout(Duration::from_secs(20), futures_util::StreamExt::next(&mut lines))
        .await
        .expect("a log line");
    assert_eq!(first.and_then(Result::ok).as_deref(), Some("devloop-ready"));

    println!("step: service routing");
    // A Service routes through kube-proxy from another pod (by ClusterIP:
    // not every test cluster has DNS).
    let svc: Service = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}
    }))
    .unwrap();
    let svc = svcs.create(&PostParams::default(), &svc).await.unwrap();
    let ip = svc.spec.unwrap().cluster_ip.unwrap();
    let client_pod = ready_pod(&pods, "client").await;
    let t0 = Instant::now();
    loop {
        let got = exec(
            &pods,
            &client_pod,
            &[
                "sh",
                "-c",
                // `timeout` rather than wget's -T: Debian's static
                // busybox 1.35 crashes on -T.
                &format!("timeout 5 wget -q -O - http://{ip}/index.html || true"),
            ],
            None,
        )
        .await;
        if got.contains("hello-from-pod") {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "Service {ip} never routed to the pod (last: {got:?})");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // What the server supports, for the Kubernetes target's no-shell path.
    let discovery = client.list_core_api_resources("v1").await.unwrap();
    if discovery.resources.iter().any(|r| r.name == "pods/ephemeralcontainers") {
        println!("ephemeral containers: supported (no-shell image {})", noshell_image());
    } else {
        println!(
            "SKIP: ephemeral containers: Kubernetes {} has no pods/ephemeralcontainers subresource",
            server_version(&client).await
        );
    }
    drop(ns);
}

/// All ready pods of `app`, once there are `n` of them.
async fn ready_pods(pods: &Api<Pod>, app: &str, n: usize) -> Vec<String> {
    let t0 = Instant::now();
    loop {
        let list = pods.list(&ListParams::default().labels(&format!("app={app}"))).await.unwrap();
        let ready: Vec<String> = list
            .items
            .into_iter()
            // The same rule devloop itself uses to pick pods.
            .filter(devloop::endpoint::kubernetes::is_ready)
            .filter_map(|p| p.metadata.name)
            .collect();
        if ready.len() == n {
            return ready;
        }
        if t0.elapsed() > Duration::from_secs(120) {
            panic!("{n} ready pods of app={app} never came\n{}", why_not_ready(pods, app).await);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// What a cluster says about pods that did not become ready: each pod's
/// phase, conditions and container states, the namespace's events and the
/// node's conditions. A timeout in CI is diagnosed from its own output.
async fn why_not_ready(pods: &Api<Pod>, app: &str) -> String {
    use k8s_openapi::api::core::v1::{Event, Node};
    let mut out = String::new();
    match pods.list(&ListParams::default().labels(&format!("app={app}"))).await {
        Ok(list) if list.items.is_empty() => out.push_str("no pods at all (is kube-controller-manager running?)\n"),
        Ok(list) => {
            for p in list.items {
                let name = p.metadata.name.unwrap_or_default();
                let st = p.status.unwrap_or_default();
                out.push_str(&format!("pod {name}: phase {:?}\n", st.phase));
                for c in st.conditions.unwrap_or_default() {
                    out.push_str(&format!(
                        "  condition {}={} {} {}\n",
                        c.type_,
                        c.status,
                        c.reason.unwrap_or_default(),
                        c.message.unwrap_or_default()
                    ));
                }
                for c in st.container_statuses.unwrap_or_default() {
                    out.push_str(&format!("  container {}: {:?}\n", c.name, c.state));
                }
            }
        }
        Err(e) => out.push_str(&format!("listing pods failed: {e}\n")),
    }
    let client = pods.clone().into_client();
    let events: Api<Event> = match pods.namespace() {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    match events.list(&ListParams::default()).await {
        Ok(list) => {
            for e in list.items.iter().rev().take(30) {
                out.push_str(&format!(
                    "event {} {}/{}: {} {}\n",
                    e.type_.as_deref().unwrap_or(""),
                    e.involved_object.kind.as_deref().unwrap_or(""),
                    e.involved_object.name.as_deref().unwrap_or(""),
                    e.reason.as_deref().unwrap_or(""),
                    e.message.as_deref().unwrap_or("")
                ));
            }
        }
        Err(e) => out.push_str(&format!("listing events failed: {e}\n")),
    }
    match Api::<Node>::all(client).list(&ListParams::default()).await {
        Ok(list) => {
            for n in list.items {
                let name = n.metadata.name.unwrap_or_default();
                for c in n.status.and_then(|s| s.conditions).unwrap_or_default() {
                    out.push_str(&format!("node {name}: {}={} {}\n", c.type_, c.status, c.message.unwrap_or_default()));
                }
            }
        }
        Err(e) => out.push_str(&format!("listing nodes failed: {e}\n")),
    }
    out
}

/// What a pod holds under `root`: "path=content" lines, sorted.
async fn pod_tree(pods: &Api<Pod>, pod: &str, root: &str) -> String {
    let script =
        format!("cd {root} 2>/dev/null && find . -type f | sort | while read f; do echo \"$f=$(cat \"$f\")\"; done");
    exec(pods, pod, &["sh", "-c", &script], None).await
}

/// The same listing of the local source tree.
fn local_tree(src: &std::path::Path) -> String {
    let snap = util::snapshot(src, &|_| false);
    let mut out = String::new();
    for (path, (kind, content, _)) in snap {
        if kind == 'f' {
            out.push_str(&format!("./{path}={}\n", String::from_utf8_lossy(&content)));
        }
    }
    out
}

async fn wait_pods_match(pods: &Api<Pod>, names: &[String], root: &str, src: &std::path::Path, w: &mut util::Watching) {
    let want = local_tree(src);
    let t0 = Instant::now();
    loop {
        let mut all = true;
        let mut last = String::new();
        for p in names {
            let got = pod_tree(pods, p, root).await;
            if got != want {
                all = false;
                last = format!("{p}:\n{got}");
            }
        }
        if all {
            return;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            w.drain();
            panic!("pods never matched the source\nwant:\n{want}\nlast:\n{last}\nevents:\n{}", w.dump());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a cluster: KUBECONFIG (see scripts/test-cluster)"]
async fn kubernetes_target_syncs_every_replica_and_follows_replacement() {
    let Some(client) = client().await else { return };
    let ns = TestNamespace::create(&client).await;
    let deps: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    deps.create(
        &PostParams::default(),
        &deployment_n("web", &image(), "while true; do echo devloop-tick; sleep 1; done", 2),
    )
    .await
    .unwrap();
    let names = ready_pods(&pods, "web", 2).await;

    let root = "/tmp/app";
    let p = util::Project::with_yaml(&format!(
        "services:\n  web:\n    target:\n      kubernetes: {{namespace: {}, deployment: web, root: {root}}}\n    sync:\n      - from: src\n",
        ns.name
    ));
    p.write("a.txt", b"alpha");
    p.write("dir/b.txt", b"beta");
    p.write("old.txt", b"to be renamed");
    let mut w = tokio::task::block_in_place(|| p.watch_n(2));
    println!("step: initial sync into both replicas");
    wait_pods_match(&pods, &names, root, &p.src(), &mut w).await;

    println!("step: container logs arrive as events");
    let log = tokio::task::block_in_place(|| w.wait_first("pod_log", Duration::from_secs(30)));
    assert_eq!(log["line"], "devloop-tick", "{log}");
    assert!(log["service"].as_str().unwrap().starts_with("web/web-"), "{log}");

    println!("step: live edit, create, delete, rename");
    p.replace("a.txt", b"alpha 2");
    p.write("new/deep/c.txt", b"gamma");
    std::fs::remove_file(p.src().join("dir/b.txt")).unwrap();
    std::fs::rename(p.src().join("old.txt"), p.src().join("renamed.txt")).unwrap();
    wait_pods_match(&pods, &names, root, &p.src(), &mut w).await;

    println!("step: edit-to-applied latency in the pods");
    // Figures for the record (the benchmark measures this more
    // thoroughly): each edit is applied in both replicas.
    let mut lat = Vec::new();
    for i in 0..30 {
        p.replace("a.txt", format!("edit {i}").as_bytes());
        for _ in 0..2 {
            let v = tokio::task::block_in_place(|| w.wait_event("sync_applied", Duration::from_secs(30)));
            lat.push(v["latency_ms"].as_f64().unwrap());
        }
    }
    lat.sort_by(f64::total_cmp);
    println!(
        "  {} applies: p50 {:.2} ms, p99 {:.2} ms (via {})",
        lat.len(),
        lat[lat.len() / 2],
        lat[(lat.len() * 99 / 100).min(lat.len() - 1)],
        w.wait_first("agent_connected", Duration::from_secs(1))["via"]
    );
    p.replace("a.txt", b"alpha 2");
    wait_pods_match(&pods, &names, root, &p.src(), &mut w).await;

    println!("step: a deleted pod is replaced, re-injected and resynced");
    pods.delete(&names[0], &DeleteParams::default()).await.unwrap();
    let t0 = Instant::now();
    let names2 = loop {
        let n = ready_pods(&pods, "web", 2).await;
        if !n.contains(&names[0]) {
            break n;
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "the pod was never replaced");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    p.write("after-replacement.txt", b"delta");
    wait_pods_match(&pods, &names2, root, &p.src(), &mut w).await;
    assert_eq!(tokio::task::block_in_place(move || w.interrupt()), 0);

    println!("step: down removes the injected agents, and is safe to run twice");
    let down = || {
        let out = p.cmd(&["down"]).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (code, text) = tokio::task::block_in_place(down);
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(text.matches("removed 1 agent file").count(), 2, "{text}");
    for pod in &names2 {
        let left = exec(&pods, pod, &["sh", "-c", "ls /tmp/devloop-agent-* 2>/dev/null | wc -l"], None).await;
        assert_eq!(left.trim(), "0", "agent left in {pod}");
    }
    let (code, text) = tokio::task::block_in_place(down);
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(text.matches("nothing to remove").count(), 2, "{text}");
    drop(ns);
}

/// A kubeconfig for the same cluster as KUBECONFIG's current context, as a
/// service account (by bearer token).
fn kubeconfig_for_token(dir: &std::path::Path, token: &str, namespace: &str) -> std::path::PathBuf {
    let kc = kube::config::Kubeconfig::read().unwrap();
    let ctx_name = kc.current_context.clone().unwrap();
    let ctx = kc.contexts.iter().find(|c| c.name == ctx_name).and_then(|c| c.context.clone()).unwrap();
    let cluster = kc.clusters.iter().find(|c| c.name == ctx.cluster).and_then(|c| c.cluster.clone()).unwrap();
    let mut c = serde_json::json!({"server": cluster.server.unwrap()});
    if let Some(ca) = cluster.certificate_authority {
        c["certificate-authority"] = ca.into();
    }
    if let Some(ca) = cluster.certificate_authority_data {
        c["certificate-authority-data"] = ca.into();
    }
    if cluster.insecure_skip_tls_verify == Some(true) {
        c["insecure-skip-tls-verify"] = true.into();
    }
    let doc = serde_json::json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "c", "cluster": c}],
        "users": [{"name": "sa", "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "c", "user": "sa", "namespace": namespace}}],
        "current-context": "sa"
    });
    let path = dir.join("sa.kubeconfig");
    std::fs::write(&path, doc.to_string()).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a cluster: KUBECONFIG (see scripts/test-cluster)"]
async fn doctor_names_missing_permissions_and_the_role_it_prints_is_enough() {
    use k8s_openapi::api::core::v1::ServiceAccount;
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
    let Some(client) = client().await else { return };
    let ns = TestNamespace::create(&client).await;
    let deps: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    deps.create(&PostParams::default(), &deployment("web", &image(), "exec sleep 3600")).await.unwrap();
    ready_pod(&pods, "web").await;
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns.name);
    let sa: ServiceAccount = serde_json::from_value(serde_json::json!({"metadata": {"name": "dev"}})).unwrap();
    sas.create(&PostParams::default(), &sa).await.unwrap();
    let req = serde_json::json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": 3600}});
    let tr: serde_json::Value = sas.create_subresource("token", "dev", &PostParams::default(), &req).await.unwrap();
    let token = tr["status"]["token"].as_str().unwrap().to_string();

    let p = util::Project::with_yaml(&format!(
        "services:\n  web:\n    target:\n      kubernetes: {{namespace: {}, deployment: web, root: /tmp/app}}\n    sync:\n      - from: src\n",
        ns.name
    ));
    let kubeconfig = kubeconfig_for_token(p.dir.path(), &token, &ns.name);
    let doctor = || {
        let out = p.cmd(&["doctor"]).env("KUBECONFIG", &kubeconfig).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    println!("step: doctor as a service account with no rights");
    let (code, text) = tokio::task::block_in_place(doctor);
    assert_eq!(code, Some(1), "{text}");
    for need in ["list pods", "create pods/exec", "get deployments"] {
        assert!(text.contains(&format!("FAIL  may not {need}")), "{need}:\n{text}");
    }
    // The Role it prints, granted to that account, is all devloop needs.
    let role_yaml: String = text
        .lines()
        .skip_while(|l| !l.contains("The smallest Role"))
        .skip(1)
        .filter_map(|l| l.strip_prefix("    "))
        .map(|l| format!("{l}\n"))
        .collect();
    let role: Role =
        serde_yaml::from_str(&role_yaml).unwrap_or_else(|e| panic!("printed Role does not parse: {e}\n{role_yaml}"));
    Api::<Role>::namespaced(client.clone(), &ns.name).create(&PostParams::default(), &role).await.unwrap();
    let rb: RoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "devloop"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "devloop"},
        "subjects": [{"kind": "ServiceAccount", "name": "dev", "namespace": ns.name}]
    }))
    .unwrap();
    Api::<RoleBinding>::namespaced(client.clone(), &ns.name).create(&PostParams::default(), &rb).await.unwrap();
    println!("step: doctor after granting exactly that Role");
    let t0 = Instant::now();
    loop {
        let (code, text) = tokio::task::block_in_place(doctor);
        if code == Some(0) {
            assert!(!text.contains("FAIL"), "{text}");
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "the printed Role was not enough:\n{text}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!("step: with that Role, a sync works over port-forward, without falling back");
    p.write("hello.txt", b"from a developer's rights");
    let out = tokio::task::block_in_place(|| {
        p.cmd(&["--json", "sync", "--once"]).env("KUBECONFIG", &kubeconfig).output().unwrap()
    });
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("\"via\":\"port-forward 127.0.0.1:"), "{text}");
    assert!(!text.contains("\"type\":\"warning\""), "{text}");

    println!("step: without port-forward rights, devloop says so and syncs over exec");
    let roles = Api::<Role>::namespaced(client.clone(), &ns.name);
    let mut role = roles.get("devloop").await.unwrap();
    role.rules.as_mut().unwrap().retain(|r| !r.resources.iter().flatten().any(|x| x == "pods/portforward"));
    roles.replace("devloop", &PostParams::default(), &role).await.unwrap();
    p.write("hello.txt", b"over exec");
    let t0 = Instant::now();
    loop {
        let out = tokio::task::block_in_place(|| {
            p.cmd(&["--json", "sync", "--once"]).env("KUBECONFIG", &kubeconfig).output().unwrap()
        });
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(out.status.code(), Some(0), "{text}");
        if text.contains("\"via\":\"exec\"") {
            assert!(text.contains("using the exec stream instead"), "{text}");
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "still port-forwarding without the right:\n{text}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let pod = ready_pod(&pods, "web").await;
    assert_eq!(exec(&pods, &pod, &["cat", "/tmp/app/hello.txt"], None).await, "over exec");
    drop(ns);
}

/// Everything in a namespace a user would call its state, normalised so
/// two snapshots compare equal when nothing was changed: objects keep
/// their uid (a recreated object is a change), while what the API server
/// and controllers bump on every write (resourceVersion, generation,
/// managedFields, status, the Deployment controller's revision
/// annotations) is left out. Pods are listed by their shape, not by name:
/// restoring a workload rolls its pods out, by design (see [`pod_shape`]).
async fn namespace_state(client: &Client, ns: &str) -> serde_json::Value {
    use k8s_openapi::api::apps::v1::{ReplicaSet, StatefulSet};
    use k8s_openapi::api::core::v1::{ConfigMap, Secret, ServiceAccount};
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
    async fn all<K>(client: &Client, ns: &str) -> Vec<serde_json::Value>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + serde::Serialize
            + std::fmt::Debug,
        K::DynamicType: Default,
    {
        let api: Api<K> = Api::namespaced(client.clone(), ns);
        let mut out: Vec<serde_json::Value> = api
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|o| {
                let mut v = serde_json::to_value(o).unwrap();
                let m = v["metadata"].as_object_mut().unwrap();
                for k in ["resourceVersion", "generation", "managedFields"] {
                    m.remove(k);
                }
                if let Some(a) = m.get_mut("annotations").and_then(|a| a.as_object_mut()) {
                    a.retain(|k, _| !k.starts_with("deployment.kubernetes.io/"));
                }
                v.as_object_mut().unwrap().remove("status");
                v
            })
            .collect();
        out.sort_by_key(|v| v["metadata"]["name"].as_str().unwrap_or("").to_string());
        out
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let mut pod_shapes: Vec<String> = pods
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|p| pod_shape(serde_json::to_value(p).unwrap()).to_string())
        .collect();
    pod_shapes.sort();
    serde_json::json!({
        "deployments": all::<Deployment>(client, ns).await,
        "replicasets": all::<ReplicaSet>(client, ns).await,
        "statefulsets": all::<StatefulSet>(client, ns).await,
        "services": all::<Service>(client, ns).await,
        "configmaps": all::<ConfigMap>(client, ns).await,
        "secrets": all::<Secret>(client, ns).await,
        "serviceaccounts": all::<ServiceAccount>(client, ns).await,
        "roles": all::<Role>(client, ns).await,
        "rolebindings": all::<RoleBinding>(client, ns).await,
        "pods": pod_shapes,
    })
}

/// Fails, showing only the kinds of object that differ, unless two
/// [`namespace_state`]s are equal.
fn assert_same_state(before: &serde_json::Value, after: &serde_json::Value) {
    let kinds = before.as_object().unwrap().keys().chain(after.as_object().unwrap().keys());
    let differ: Vec<String> = kinds
        .filter(|k| before[k.as_str()] != after[k.as_str()])
        .map(|k| {
            format!(
                "{k}:\n  before: {}\n  after:  {}",
                serde_json::to_string(&before[k.as_str()]).unwrap(),
                serde_json::to_string(&after[k.as_str()]).unwrap()
            )
        })
        .collect();
    assert!(differ.is_empty(), "down must leave the namespace as it was; these differ:\n{}", differ.join("\n"));
}

/// Where every pod's service-account token is mounted.
const SA_MOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// What a pod is, as far as devloop could have changed it: its owner,
/// labels, annotations and its whole spec (containers with their image,
/// command, args, env and mounts; ephemeral containers; volumes), minus
/// what the API server and scheduler make afresh for every pod: the
/// service-account token volume and its mounts (`kube-api-access-<random>`
/// since Kubernetes 1.22) and the node it landed on.
fn pod_shape(pod: serde_json::Value) -> serde_json::Value {
    let mut spec = pod["spec"].clone();
    let mut token_volumes = std::collections::BTreeSet::new();
    for list in ["containers", "initContainers", "ephemeralContainers"] {
        for c in spec[list].as_array_mut().into_iter().flatten() {
            if let Some(mounts) = c["volumeMounts"].as_array_mut() {
                mounts.retain(|m| {
                    let token = m["mountPath"] == SA_MOUNT;
                    if token {
                        token_volumes.insert(m["name"].as_str().unwrap_or("").to_string());
                    }
                    !token
                });
            }
        }
    }
    if let Some(vols) = spec["volumes"].as_array_mut() {
        vols.retain(|v| !token_volumes.contains(v["name"].as_str().unwrap_or("")));
    }
    spec.as_object_mut().map(|m| m.remove("nodeName"));
    let meta = &pod["metadata"];
    let owners: Vec<String> = meta["ownerReferences"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|o| format!("{}/{}", o["kind"].as_str().unwrap_or(""), o["name"].as_str().unwrap_or("")))
        .collect();
    serde_json::json!({
        "owners": owners,
        "labels": meta["labels"],
        "annotations": meta["annotations"],
        "spec": spec,
    })
}

/// Waits until the Deployment `name` has rolled out: every replica updated
/// and ready, and no other pods left.
async fn rolled_out(client: &Client, ns: &str, name: &str) {
    let deps: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let t0 = Instant::now();
    loop {
        let d = deps.get(name).await.unwrap();
        let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
        let st = d.status.clone().unwrap_or_default();
        let done = d.metadata.generation == st.observed_generation
            && st.updated_replicas == Some(want)
            && st.ready_replicas == Some(want)
            && st.replicas == Some(want);
        let n = pods.list(&ListParams::default().labels(&format!("app={name}"))).await.unwrap().items.len();
        if done && n == want as usize {
            return;
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "deployment/{name} never rolled out: {st:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// How many devloop agent processes run in a pod.
async fn agents_running(pods: &Api<Pod>, pod: &str) -> usize {
    let script = "n=0; for p in /proc/[0-9]*; do case \"$(tr '\\0' ' ' < $p/cmdline 2>/dev/null)\" in \
                  /tmp/devloop-agent-*) n=$((n+1));; esac; done; echo $n";
    exec(pods, pod, &["sh", "-c", script], None).await.trim().parse().unwrap()
}

/// In a real container's filesystem (overlayfs on most nodes), as on this
/// machine: once the tree has settled, an unchanged re-sync reads no file
/// in the pod; a file changed in the pod with its size and mtime as they
/// were is still found (its ctime moved) and put right; `down` removes the
/// cache with the agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a cluster: KUBECONFIG (see scripts/test-cluster)"]
async fn an_unchanged_resync_reads_nothing_in_the_pod_and_still_finds_a_change_there() {
    let Some(client) = client().await else { return };
    let ns = TestNamespace::create(&client).await;
    let deps: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    deps.create(&PostParams::default(), &deployment("web", &image(), "while :; do sleep 1; done")).await.unwrap();
    let pod = ready_pod(&pods, "web").await;
    let root = "/tmp/app";
    let p = util::Project::with_yaml(&format!(
        "services:\n  web:\n    target:\n      kubernetes: {{namespace: {}, deployment: web, root: {root}}}\n    sync:\n      - from: src\n",
        ns.name
    ));
    let n = 1200;
    for i in 0..n {
        p.write(&format!("d{}/f{i}.txt", i % 10), format!("file {i:05}").as_bytes());
    }
    let t = Duration::from_secs(120);
    let in_sync = || tokio::task::block_in_place(|| p.in_sync(t));
    println!("step: first sync");
    assert_eq!(in_sync(), (n, 0, 0));
    // busybox keeps whole seconds when it copies an mtime (`cp -p`,
    // `touch -r`): give the file such an mtime now, so that putting it
    // back later leaves it exactly as the cache saw it.
    let f4 = format!("{root}/d4/f4.txt");
    let keep_mtime = format!("cp -p {f4} /tmp/ref4 && touch -r /tmp/ref4 {f4} && stat -c %y {f4}");
    let mtime = exec(&pods, &pod, &["sh", "-c", &keep_mtime], None).await;
    // Hashes are kept for files left alone for 2 s before a scan began.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    println!("step: re-syncs: the first reads both trees, the next neither");
    assert_eq!(in_sync(), (n, 0, 0));
    assert_eq!(in_sync(), (n, n, n));

    println!("step: a change in the pod with size and mtime as they were");
    let sneak = format!("printf 'pod! 00004' > {f4} && touch -r /tmp/ref4 {f4} && stat -c %y {f4}");
    assert_eq!(exec(&pods, &pod, &["sh", "-c", &sneak], None).await, mtime, "the mtime was put back");
    assert_eq!(in_sync(), (n, n, n - 1), "the pod read the one file that changed");
    assert_eq!(exec(&pods, &pod, &["cat", &f4], None).await, "file 00004", "put right");

    println!("step: down removes the agent and its cache");
    let caches = "ls /tmp/devloop-agent-hashes-* 2>/dev/null | wc -l";
    assert_eq!(exec(&pods, &pod, &["sh", "-c", caches], None).await.trim(), "1");
    let out = tokio::task::block_in_place(|| util::output_within(p.cmd(&["down"]), t));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let left = exec(&pods, &pod, &["sh", "-c", "ls /tmp/devloop-agent-* 2>/dev/null | wc -l"], None).await;
    assert_eq!(left.trim(), "0", "agent files left in {pod}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a cluster: KUBECONFIG (see scripts/test-cluster)"]
async fn restart_keeps_synced_files_and_down_leaves_the_namespace_as_it_was() {
    let Some(client) = client().await else { return };
    let ns = TestNamespace::create(&client).await;
    let deps: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    // The app prints the version it started with. Its command is left to
    // the image (only `args`), so devloop must read it from the pod.
    let app = "trap 'exit 0' TERM; echo \"started $(cat /tmp/app/version.txt 2>/dev/null || echo none)\"; \
               while :; do sleep 1; done";
    let dep: Deployment = serde_json::from_value(serde_json::json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "app", "annotations": {"team": "e2e"}},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "app"}},
            "template": {
                "metadata": {"labels": {"app": "app"}},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{
                        "name": "main", "image": image(), "imagePullPolicy": "IfNotPresent",
                        "args": ["sh", "-c", app]
                    }]
                }
            }
        }
    }))
    .unwrap();
    deps.create(&PostParams::default(), &dep).await.unwrap();
    rolled_out(&client, &ns.name, "app").await;
    let before = namespace_state(&client, &ns.name).await;

    let root = "/tmp/app";
    let p = util::Project::with_yaml(&format!(
        "services:\n  app:\n    target:\n      kubernetes: {{namespace: {}, deployment: app, root: {root}}}\n    sync:\n      - from: src\n    app: {{restart: true}}\n",
        ns.name
    ));
    p.write("version.txt", b"v1");
    p.write("lib/data.txt", b"kept across restarts");
    let mut w = tokio::task::block_in_place(|| p.watch());
    println!("step: the workload gets the restart wrapper, recorded in an annotation");
    let changed = w.wait_first("workload_changed", Duration::from_secs(10));
    assert_eq!(changed["workload"], "deployment/app", "{changed}");
    let d = deps.get("app").await.unwrap();
    let recorded = d.metadata.annotations.unwrap_or_default().get("devloop.dev/restart-wrapper").cloned();
    let recorded: serde_json::Value = serde_json::from_str(&recorded.expect("annotation")).unwrap();
    assert_eq!(recorded["container"], "main");
    assert_eq!(recorded["command"], serde_json::Value::Null, "the original had no command");
    assert_eq!(recorded["args"], serde_json::json!(["sh", "-c", app]));

    println!("step: after the rollout, the app restarts on the synced files");
    let started_with = |v: &str| {
        let line = format!("started {v}");
        move |e: &serde_json::Value| e["type"] == "pod_log" && e["line"] == line.as_str()
    };
    tokio::task::block_in_place(|| {
        w.wait_for("`started v1` in the pod's log", Duration::from_secs(120), started_with("v1"))
    });
    let via = w.wait_first("agent_connected", Duration::from_secs(1))["via"].as_str().unwrap().to_string();
    assert!(via.starts_with("port-forward 127.0.0.1:"), "the default transport is port-forward: {via}");

    println!("step: an edit restarts the process, not the container: the synced files stay");
    p.replace("version.txt", b"v2");
    tokio::task::block_in_place(|| {
        w.wait_for("`started v2` in the pod's log", Duration::from_secs(60), started_with("v2"))
    });
    rolled_out(&client, &ns.name, "app").await;
    let pod = ready_pod(&pods, "app").await;
    let status = pods.get(&pod).await.unwrap().status.unwrap();
    let restarts = status.container_statuses.unwrap()[0].restart_count;
    assert_eq!(restarts, 0, "the container itself must not restart");
    assert_eq!(pod_tree(&pods, &pod, root).await, local_tree(&p.src()));

    println!("step: devloop killed (-9): the agent in the pod exits with its lifeline");
    assert_eq!(agents_running(&pods, &pod).await, 1);
    w.child.kill().unwrap();
    let _ = w.child.wait();
    let t0 = Instant::now();
    while agents_running(&pods, &pod).await != 0 {
        assert!(t0.elapsed() < Duration::from_secs(20), "the agent outlived devloop by 20 s");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    println!("  agent gone {} ms after devloop", t0.elapsed().as_millis());

    println!("step: the next start keeps the crashed run's wrapper (no second rollout) and restarts still work");
    let w = tokio::task::block_in_place(|| p.watch());
    assert!(!w.seen.iter().any(|e| e["type"] == "workload_changed"), "{}", w.dump());
    let mut w = w;
    p.replace("version.txt", b"v3");
    tokio::task::block_in_place(|| w.wait_for("`started v3`", Duration::from_secs(60), started_with("v3")));

    println!("step: a clean exit (Ctrl-C) puts the workload back");
    let (code, seen) = tokio::task::block_in_place(move || {
        let mut w = w;
        unsafe { libc::kill(w.child.id() as i32, libc::SIGINT) };
        let status = w.child.wait().unwrap();
        w.drain();
        (status.code(), w.seen.clone())
    });
    assert_eq!(code, Some(0));
    let restored = seen.iter().rev().find(|e| e["type"] == "workload_changed").expect("a restore event");
    assert!(restored["change"].as_str().unwrap().contains("restored"), "{restored}");
    let d = deps.get("app").await.unwrap();
    assert!(!d.metadata.annotations.unwrap_or_default().contains_key("devloop.dev/restart-wrapper"));
    let main = &d.spec.unwrap().template.spec.unwrap().containers[0];
    assert_eq!((main.command.clone(), main.args.clone()), (None, Some(vec!["sh".into(), "-c".into(), app.into()])));
    rolled_out(&client, &ns.name, "app").await;

    println!("step: wrapped again, then devloop crashes once more");
    let mut w = tokio::task::block_in_place(|| p.watch());
    tokio::task::block_in_place(|| w.wait_for("`started v3`", Duration::from_secs(120), started_with("v3")));
    w.child.kill().unwrap();
    let _ = w.child.wait();

    println!("step: down (after that crash) restores the workload; a second down finds nothing");
    let down = || {
        let out = p.cmd(&["down"]).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (code, text) = tokio::task::block_in_place(down);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("restored container `main`"), "{text}");
    rolled_out(&client, &ns.name, "app").await;
    let (code, text) = tokio::task::block_in_place(down);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("no restart wrapper to remove"), "{text}");
    rolled_out(&client, &ns.name, "app").await;
    let after = namespace_state(&client, &ns.name).await;
    assert_same_state(&before, &after);
    drop(ns);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a cluster: KUBECONFIG (see scripts/test-cluster)"]
async fn an_image_with_no_shell_is_synced_through_a_helper_container() {
    let Some(client) = client().await else { return };
    let discovery = client.list_core_api_resources("v1").await.unwrap();
    if !discovery.resources.iter().any(|r| r.name == "pods/ephemeralcontainers") {
        println!(
            "SKIP: images with no shell: Kubernetes {} has no pods/ephemeralcontainers subresource",
            server_version(&client).await
        );
        return;
    }
    let ns = TestNamespace::create(&client).await;
    let deps: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let dep: Deployment = serde_json::from_value(serde_json::json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "quiet"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "quiet"}},
            "template": {
                "metadata": {"labels": {"app": "quiet"}},
                "spec": {"terminationGracePeriodSeconds": 1, "containers": [
                    {"name": "main", "image": noshell_image(), "imagePullPolicy": "IfNotPresent"}
                ]}
            }
        }
    }))
    .unwrap();
    deps.create(&PostParams::default(), &dep).await.unwrap();
    let pod = ready_pod(&pods, "quiet").await;

    let p = util::Project::with_yaml(&format!(
        "services:\n  quiet:\n    target:\n      kubernetes: {{namespace: {}, deployment: quiet, root: /app, helper_image: {}}}\n    sync:\n      - from: src\n",
        ns.name,
        image()
    ));
    p.write("a.txt", b"alpha");
    p.write("dir/b.txt", b"beta");
    println!("step: the agent runs in a helper container and syncs into the shell-less one");
    let w = tokio::task::block_in_place(|| p.watch());
    let said = w.seen.iter().find(|e| {
        e["type"] == "agent_log"
            && e["line"].as_str().is_some_and(|l| l.contains("has no shell: started helper container"))
    });
    let said = said.unwrap_or_else(|| panic!("no word of the helper:\n{}", w.dump()));
    assert!(said["line"].as_str().unwrap().contains("devloop-helper-0"), "{said}");
    let files = |pods: Api<Pod>, pod: String| async move {
        let script = "cd /proc/1/root/app && find . -type f | sort | while read f; do echo \"$f=$(cat \"$f\")\"; done";
        exec_in(&pods, &pod, Some("devloop-helper-0"), &["sh", "-c", script], None).await
    };
    let mut want = local_tree(&p.src());
    let t0 = Instant::now();
    while files(pods.clone(), pod.clone()).await != want {
        assert!(t0.elapsed() < Duration::from_secs(30), "never synced:\n{}", w.dump());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    println!("step: live edit and delete");
    p.replace("a.txt", b"alpha 2");
    std::fs::remove_file(p.src().join("dir/b.txt")).unwrap();
    want = local_tree(&p.src());
    let t0 = Instant::now();
    while files(pods.clone(), pod.clone()).await != want {
        assert!(t0.elapsed() < Duration::from_secs(30), "never synced the edit:\n{}", w.dump());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The container itself was never touched: it still runs, unrestarted.
    let st = pods.get(&pod).await.unwrap().status.unwrap();
    assert_eq!(st.container_statuses.unwrap()[0].restart_count, 0);
    assert_eq!(tokio::task::block_in_place(move || w.interrupt()), 0);

    println!("step: down stops the helper (the API cannot remove it from the pod)");
    let out = tokio::task::block_in_place(|| p.cmd(&["down"]).output().unwrap());
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("stopped helper container devloop-helper-0"), "{text}");
    let t0 = Instant::now();
    loop {
        let p = pods.get(&pod).await.unwrap();
        let st = p.status.unwrap().ephemeral_container_statuses.unwrap_or_default();
        if st.iter().any(|s| s.name == "devloop-helper-0" && s.state.as_ref().is_some_and(|s| s.terminated.is_some())) {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "the helper still runs: {st:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let out = tokio::task::block_in_place(|| p.cmd(&["down"]).output().unwrap());
    assert_eq!(out.status.code(), Some(0), "a second down is fine: {}", String::from_utf8_lossy(&out.stdout));

    println!("step: restarts need a shell in the image: refused before the workload is touched");
    let before = deps.get("quiet").await.unwrap();
    std::fs::write(
        p.dir.path().join("devloop.yaml"),
        format!(
            "services:\n  quiet:\n    target:\n      kubernetes: {{namespace: {}, deployment: quiet, root: /app, helper_image: {}}}\n    sync:\n      - from: src\n    app: {{}}\n",
            ns.name,
            image()
        ),
    )
    .unwrap();
    // The check comes before any session starts, so before `watching`.
    let w = tokio::task::block_in_place(|| p.watch());
    let refusal = w.seen.iter().find(|e| e["type"] == "error").cloned();
    let refusal = refusal.unwrap_or_else(|| panic!("no refusal:\n{}", w.dump()));
    assert!(refusal["message"].as_str().unwrap().contains("no /bin/sh"), "{refusal}");
    assert_eq!(tokio::task::block_in_place(move || w.interrupt()), 0);
    let after = deps.get("quiet").await.unwrap();
    assert_eq!(after.metadata.generation, before.metadata.generation, "the workload was not changed");
    drop(ns);
}

/// Waits until the agent of every ready pod of `app` holds the intercept
/// (until then, calls a pod gets go to its app, by design).
async fn intercepted_everywhere(client: &Client, ns: &str, app: &str, n: usize, w: &mut util::Watching) {
    rolled_out(client, ns, app).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    for pod in ready_pods(&pods, app, n).await {
        tokio::task::block_in_place(|| {
            if !w.seen.iter().any(|e| e["type"] == "intercept_on" && e["pod"] == pod.as_str()) {
                w.wait_for(&format!("intercept_on in {pod}"), Duration::from_secs(60), |e| {
                    e["type"] == "intercept_on" && e["pod"] == pod.as_str()
                });
            }
        });
    }
}

/// Calls `http://IP/PATH` from the client pod (with an optional header);
/// returns the body, or "" when nothing answered in 5 s.
async fn call(pods: &Api<Pod>, client_pod: &str, ip: &str, path: &str, header: Option<&str>) -> String {
    let header = header.map(|h| format!("--header '{h}' ")).unwrap_or_default();
    let script = format!("timeout 5 wget -q -O - {header}http://{ip}{path} 2>/dev/null || true");
    exec(pods, client_pod, &["sh", "-c", &script], None).await
}

/// Calls until the answer satisfies `want`; returns it and how long it
/// took. Panics with the last answer after `limit`.
async fn call_until(
    pods: &Api<Pod>,
    client_pod: &str,
    ip: &str,
    path: &str,
    header: Option<&str>,
    limit: Duration,
    want: impl Fn(&str) -> bool,
) -> (String, Duration) {
    let t0 = Instant::now();
    loop {
        let got = call(pods, client_pod, ip, path, header).await;
        if want(&got) {
            return (got, t0.elapsed());
        }
        assert!(t0.elapsed() < limit, "no wanted answer from {ip}{path} in {limit:?}; last: {got:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a cluster: KUBECONFIG (see scripts/test-cluster)"]
async fn intercept_routes_the_service_to_this_machine_survives_sigkill_and_down_leaves_nothing() {
    let Some(client) = client().await else { return };
    let ns = TestNamespace::create(&client).await;
    let deps: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let svcs: Api<Service> = Api::namespaced(client.clone(), &ns.name);
    // The app answers `app` on its named port `http`; the Service reaches
    // it by that name.
    let app = "mkdir -p /tmp/www && echo app > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www";
    let mut dep = deployment_n("web", &image(), app, 2);
    dep.spec.as_mut().unwrap().template.spec.as_mut().unwrap().containers[0].ports =
        Some(vec![serde_json::from_value(serde_json::json!({"name": "http", "containerPort": 8080})).unwrap()]);
    deps.create(&PostParams::default(), &dep).await.unwrap();
    deps.create(&PostParams::default(), &deployment("client", &image(), "exec sleep 3600")).await.unwrap();
    let svc: Service = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "annotations": {"team": "e2e"}},
        "spec": {"selector": {"app": "web"}, "ports": [{"name": "web", "port": 80, "targetPort": "http"}]}
    }))
    .unwrap();
    let ip = svcs.create(&PostParams::default(), &svc).await.unwrap().spec.unwrap().cluster_ip.unwrap();
    rolled_out(&client, &ns.name, "web").await;
    rolled_out(&client, &ns.name, "client").await;
    let client_pod = ready_pod(&pods, "client").await;
    call_until(&pods, &client_pod, &ip, "/index.html", None, Duration::from_secs(60), |a| a == "app\n").await;
    let before = namespace_state(&client, &ns.name).await;

    // The developer's process, on this machine.
    let (dev, _) = util::servers::http("dev");
    let lease_ms = 2000;
    let p = util::Project::with_yaml(&format!(
        "services:\n  web:\n    target:\n      kubernetes: {{namespace: {}, deployment: web, root: /tmp/app}}\n    sync:\n      - from: src\n    intercept: {{ports: [\"web:{dev}\"], lease_ms: {lease_ms}}}\n",
        ns.name
    ));
    p.write("a.txt", b"alpha");
    let is_dev = |a: &str| a.starts_with("dev GET /index.html");
    let is_app = |a: &str| a == "app\n";

    println!("step: the Service's calls reach this machine, from every replica");
    let mut w = tokio::task::block_in_place(|| util::Watching::spawn(p.cmd(&["--json", "watch"]), 0));
    let steered = tokio::task::block_in_place(|| {
        w.wait_for("the Service steered", Duration::from_secs(180), |e| {
            e["type"] == "workload_changed" && e["workload"] == "service/web"
        })
    });
    println!("  {}", steered["change"]);
    intercepted_everywhere(&client, &ns.name, "web", 2, &mut w).await;
    let (_, took) = call_until(&pods, &client_pod, &ip, "/index.html", None, Duration::from_secs(60), is_dev).await;
    println!("  first answer from this machine {} ms after the Service was steered", took.as_millis());
    // Every call, whichever replica kube-proxy picks.
    for _ in 0..10 {
        assert!(is_dev(&call(&pods, &client_pod, &ip, "/index.html", None).await));
    }
    let s = svcs.get("web").await.unwrap();
    let recorded = s.metadata.annotations.clone().unwrap_or_default();
    assert!(recorded["devloop.dev/intercept"].contains("\"targetPort\":\"http\""), "{recorded:?}");
    assert_eq!(recorded["team"], "e2e");
    let d = deps.get("web").await.unwrap();
    assert!(d.metadata.annotations.unwrap_or_default().contains_key("devloop.dev/intercept"));
    let w_pods = ready_pods(&pods, "web", 2).await;

    println!("step: devloop killed (-9): within the lease the app answers again");
    w.child.kill().unwrap();
    let _ = w.child.wait();
    let (_, took) = call_until(&pods, &client_pod, &ip, "/index.html", None, Duration::from_secs(30), is_app).await;
    println!("  the app answered {} ms after SIGKILL (lease {lease_ms} ms)", took.as_millis());
    assert!(took < Duration::from_millis(lease_ms + 8000), "took {took:?}");

    println!("step: an intercepted pod deleted while devloop is dead: the replacement answers as the app");
    pods.delete(&w_pods[0], &DeleteParams::default()).await.unwrap();
    let t0 = Instant::now();
    loop {
        let now = ready_pods(&pods, "web", 2).await;
        if !now.contains(&w_pods[0]) {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "the pod was never replaced");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for _ in 0..10 {
        assert!(is_app(&call(&pods, &client_pod, &ip, "/index.html", None).await), "every call answered by the app");
    }

    println!("step: devloop back: the intercept resumes, with no new rollout");
    let mut w = tokio::task::block_in_place(|| util::Watching::spawn(p.cmd(&["--json", "watch"]), 0));
    let (_, took) = call_until(&pods, &client_pod, &ip, "/index.html", None, Duration::from_secs(90), is_dev).await;
    println!("  this machine answers again {} ms after the restart", took.as_millis());
    w.drain();
    assert!(
        !w.seen.iter().any(|e| e["type"] == "workload_changed"),
        "the crashed run's forwarder and Service are kept:\n{}",
        w.dump()
    );
    // Every replica's agent holds it again before the freeze below: a
    // replica not yet held would send calls to the app before the lease
    // ran out, and the freeze would prove nothing.
    intercepted_everywhere(&client, &ns.name, "web", 2, &mut w).await;

    println!("step: devloop frozen (a closed lid: SIGSTOP): the lease runs out, the app answers; woken, it resumes");
    let pid = w.child.id() as i32;
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let (_, took) = call_until(&pods, &client_pod, &ip, "/index.html", None, Duration::from_secs(30), is_app).await;
    unsafe { libc::kill(pid, libc::SIGCONT) };
    println!("  the app answered {} ms after devloop froze (lease {lease_ms} ms)", took.as_millis());
    assert!(took >= Duration::from_millis(lease_ms * 9 / 10), "not before the lease ran out: {took:?}");
    let (_, took) = call_until(&pods, &client_pod, &ip, "/index.html", None, Duration::from_secs(60), is_dev).await;
    println!("  this machine answers again {} ms after devloop woke", took.as_millis());

    println!("step: Ctrl-C: the Service points at the app at once, the template is restored");
    assert_eq!(tokio::task::block_in_place(move || w.interrupt()), 0);
    let s = svcs.get("web").await.unwrap();
    assert!(!s.metadata.annotations.unwrap_or_default().contains_key("devloop.dev/intercept"));
    let port = &s.spec.unwrap().ports.unwrap()[0];
    assert_eq!(
        port.target_port,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("http".into()))
    );
    assert!(is_app(&call(&pods, &client_pod, &ip, "/index.html", None).await));
    rolled_out(&client, &ns.name, "web").await;

    println!("step: a personal intercept: two clients, two places");
    let mut w = tokio::task::block_in_place(|| {
        util::Watching::spawn(
            p.cmd(&["--json", "intercept", "web", "--port", &format!("80:{dev}"), "--header", "x-dev=alice"]),
            0,
        )
    });
    tokio::task::block_in_place(|| {
        w.wait_for("the Service steered", Duration::from_secs(180), |e| {
            e["type"] == "workload_changed" && e["workload"] == "service/web"
        })
    });
    intercepted_everywhere(&client, &ns.name, "web", 2, &mut w).await;
    call_until(&pods, &client_pod, &ip, "/index.html", Some("x-dev: alice"), Duration::from_secs(60), is_dev).await;
    for _ in 0..5 {
        assert!(is_dev(&call(&pods, &client_pod, &ip, "/index.html", Some("x-dev: alice")).await), "alice's calls");
        assert!(is_app(&call(&pods, &client_pod, &ip, "/index.html", Some("x-dev: bob")).await), "bob's calls");
        assert!(is_app(&call(&pods, &client_pod, &ip, "/index.html", None).await), "everyone else's calls");
    }

    println!("step: killed again, then down puts every object back; a second down finds nothing");
    w.child.kill().unwrap();
    let _ = w.child.wait();
    let down = || {
        let out = p.cmd(&["down"]).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (code, text) = tokio::task::block_in_place(down);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("service/web: its ports point at the app again"), "{text}");
    assert!(text.contains("removed the intercept's forwarder"), "{text}");
    assert!(is_app(&call(&pods, &client_pod, &ip, "/index.html", None).await));
    rolled_out(&client, &ns.name, "web").await;
    let (code, text) = tokio::task::block_in_place(down);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("no intercept to undo"), "{text}");

    println!("step: `devloop run`: a command here reaches the Service the pod's environment names, through the agent");
    let script =
        "echo \"addr=$WEB_SERVICE_HOST:$WEB_SERVICE_PORT\"; exec 3<>/dev/tcp/$WEB_SERVICE_HOST/$WEB_SERVICE_PORT; \
                  printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' >&3; cat <&3";
    let out = tokio::task::block_in_place(|| p.cmd(&["run", "web", "--", "bash", "-c", script]).output().unwrap());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("addr=127.0.0.1:"), "the local address in place of {ip}: {stdout}");
    assert!(stdout.ends_with("\r\n\r\napp\n"), "the app's answer, through the agent: {stdout}");
    let (code, text) = tokio::task::block_in_place(down);
    assert_eq!(code, Some(0), "{text}");
    let after = namespace_state(&client, &ns.name).await;
    assert_same_state(&before, &after);
    drop(ns);
}
