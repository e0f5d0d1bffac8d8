//! Actions asked of a running devloop (resync, restart the app, run a
//! post-sync command) reach the service's session through the hub and
//! are answered; the real agent carries them out on the local target.
//! Cancelling the service stops it cleanly.

mod util;

use devloop::hub::{self, ActionKind};
use devloop::service;
use devloop::session::{Mode, Outcome};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

const T: Duration = Duration::from_secs(30);

async fn wait_for(
    rx: &mut broadcast::Receiver<Arc<devloop::events::Event>>,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let mut seen = Vec::new();
    let r = tokio::time::timeout(T, async {
        loop {
            let ev = rx.recv().await.expect("the hub is open");
            let v = serde_json::to_value(&*ev).unwrap();
            seen.push(v.to_string());
            if pred(&v) {
                return v;
            }
        }
    })
    .await;
    r.unwrap_or_else(|_| panic!("no {what} within {T:?}; saw:\n{}", seen.join("\n")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actions_reach_the_session_and_are_answered() {
    let p = util::Project::with_yaml(
        r#"services:
  svc:
    target: {local: {root: out}}
    sync:
      - from: src
    on_sync:
      - when: "*.json"
        run: "echo ran > ran.txt"
    app:
      run: "echo started; exec sleep 1000"
      grace_ms: 200
"#,
    );
    p.write("a.txt", b"source");
    let cfg = devloop::config::load(&p.dir.path().join("devloop.yaml")).unwrap();
    let hub = hub::start();
    let (_, mut rx) = hub.subscribe().await.unwrap();
    let cancel = CancellationToken::new();
    let svc = cfg.services[0].clone();
    let work = service::Work { sync: true, intercept: false };
    let run =
        tokio::spawn(service::run(svc, Mode::Watch, work, hub.reporter("svc"), cancel.clone(), hub.register("svc")));
    wait_for(&mut rx, "watching", |v| v["type"] == "watching").await;
    let first = wait_for(&mut rx, "app_started", |v| v["type"] == "app_started").await["pid"].clone();

    // A resync compares everything by content again: a change made on the
    // target behind devloop's back is put right.
    std::fs::write(p.out().join("a.txt"), "tampered").unwrap();
    let answer = hub.act("svc", None, ActionKind::Resync).await;
    assert!(answer.as_ref().is_ok_and(|m| m.contains("compared everything by content")), "{answer:?}");
    assert_eq!(std::fs::read_to_string(p.out().join("a.txt")).unwrap(), "source");
    wait_for(&mut rx, "action_done for the resync", |v| v["type"] == "action_done" && v["ok"] == true).await;

    // A restart restarts the app.
    let answer = hub.act("svc", None, ActionKind::Restart).await;
    assert!(answer.is_ok(), "{answer:?}");
    let second = wait_for(&mut rx, "the app started again", |v| v["type"] == "app_started").await["pid"].clone();
    assert_ne!(first, second);

    // A post-sync command runs now, with nothing changed.
    let answer = hub.act("svc", None, ActionKind::Run { index: 0 }).await;
    assert!(answer.as_ref().is_ok_and(|m| m.contains("echo ran")), "{answer:?}");
    let exited = wait_for(&mut rx, "command_exited", |v| v["type"] == "command_exited").await;
    assert_eq!(exited["code"], 0);
    assert!(p.out().join("ran.txt").exists());

    // Bad actions are refused with a reason, and change nothing.
    let answer = hub.act("svc", None, ActionKind::Run { index: 3 }).await;
    assert!(answer.as_ref().is_err_and(|m| m.contains("there is no [3]")), "{answer:?}");
    let answer = hub.act("nope", None, ActionKind::Resync).await;
    assert!(answer.as_ref().is_err_and(|m| m.contains("no service `nope`")), "{answer:?}");

    // Cancelled: the service stops cleanly (its agent and app with it).
    cancel.cancel();
    let outcome = tokio::time::timeout(T, run).await.expect("stops in time").unwrap();
    assert_eq!(outcome, Outcome::Stopped);
    let pid = second.as_u64().unwrap() as i32;
    let t0 = std::time::Instant::now();
    while unsafe { libc::kill(pid, 0) } == 0 {
        assert!(t0.elapsed() < T, "the app outlived its service");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
