//! The agent's intercept, driven directly over a session: what it agrees
//! to listen on, and what it refuses (with the reason, keeping the
//! session).

mod common;

use common::*;
use devloop_agent::mux::Incoming;
use devloop_agent::protocol::{Control, InterceptPort};
use std::time::Duration;

async fn answer(rx: &mut tokio::sync::mpsc::Receiver<Incoming>) -> Control {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("an answer in 10 s") {
            Some(Incoming::Control(c @ (Control::InterceptHeld { .. } | Control::InterceptFailed { .. }))) => return c,
            Some(_) => continue,
            None => panic!("the session ended"),
        }
    }
}

fn port(listen: &str) -> InterceptPort {
    InterceptPort { port: 80, listen: listen.into(), app: None }
}

#[tokio::test]
async fn the_agent_listens_on_loopback_only_and_refusals_keep_the_session() {
    let a = start_agent(None);
    let (out, mut rx) = session(&a).await;
    // The pod network is the forwarder's: the agent refuses it.
    out.control(Control::Intercept { ports: vec![port("0.0.0.0:0")], header: None, lease_ms: 3000 }).unwrap();
    match answer(&mut rx).await {
        Control::InterceptFailed { message } => assert!(message.contains("loopback only"), "{message}"),
        other => panic!("0.0.0.0 must be refused: {other:?}"),
    }
    out.control(Control::Intercept { ports: vec![port("nonsense")], header: None, lease_ms: 3000 }).unwrap();
    match answer(&mut rx).await {
        Control::InterceptFailed { message } => assert!(message.contains("not an ip:port"), "{message}"),
        other => panic!("{other:?}"),
    }
    // All or none: a taken port fails the whole intercept, and the free
    // one is not left listening.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let ports = vec![port(&free.to_string()), port(&taken.local_addr().unwrap().to_string())];
    out.control(Control::Intercept { ports, header: None, lease_ms: 3000 }).unwrap();
    match answer(&mut rx).await {
        Control::InterceptFailed { message } => assert!(message.contains("cannot listen"), "{message}"),
        other => panic!("{other:?}"),
    }
    assert!(std::net::TcpStream::connect(free).is_err(), "nothing listens on the first port after the failure");
    // The same session still takes an intercept.
    out.control(Control::Intercept { ports: vec![port(&free.to_string())], header: None, lease_ms: 3000 }).unwrap();
    match answer(&mut rx).await {
        Control::InterceptHeld { listening } => assert_eq!(listening, vec![free.to_string()]),
        other => panic!("{other:?}"),
    }
    assert!(std::net::TcpStream::connect(free).is_ok(), "held: it listens");
    out.control(Control::InterceptStop {}).unwrap();
    let t0 = std::time::Instant::now();
    while std::net::TcpStream::connect(free).is_ok() {
        assert!(t0.elapsed() < Duration::from_secs(5), "released: it stops listening");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
