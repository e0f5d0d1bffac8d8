//! A hostile client speaking the protocol directly to the real agent binary
//! on loopback. Whatever it sends, nothing outside the sync root is written,
//! deleted or followed (invariant 1); bad sessions get a clear error and are
//! closed; the agent keeps serving other sessions.

use devloop_agent::paths::WirePath;
use devloop_agent::protocol::{Control, Frame};
use devloop_agent::transport::{self, ConnectError, Heartbeat, Incoming};
use futures_util::{SinkExt, StreamExt};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

const TOKEN: &str = "s3cret-token-for-tests";

struct Agent {
    child: Child,
    port: u16,
    /// What the agent printed on stderr so far.
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
    _dir: tempfile::TempDir,
    root: PathBuf,
    outside: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the agent on a free loopback port; `root` and a sibling
/// `outside` directory (with a file that must survive) live in one temp dir.
fn start_agent(heartbeat_ms: Option<u64>) -> Agent {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("victim"), "untouched").unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_devloop-agent"));
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--root"])
        .arg(&root)
        .env("DEVLOOP_AGENT_TOKEN", TOKEN)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(ms) = heartbeat_ms {
        cmd.env("DEVLOOP_HEARTBEAT_MS", ms.to_string());
    }
    let mut child = cmd.spawn().unwrap();
    let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let (log, pipe) = (stderr.clone(), child.stderr.take().unwrap());
    std::thread::spawn(move || {
        for l in BufReader::new(pipe).lines().map_while(Result::ok) {
            let mut log = log.lock().unwrap();
            log.push_str(&l);
            log.push('\n');
        }
    });
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    // "devloop-agent X protocol N listening on 127.0.0.1:PORT root DIR"
    let addr =
        line.split_whitespace().skip_while(|w| *w != "on").nth(1).unwrap_or_else(|| panic!("readiness line: {line}"));
    let port = addr.rsplit(':').next().unwrap().parse().unwrap();
    Agent { child, port, stderr, _dir: dir, root, outside }
}

async fn session(a: &Agent) -> (transport::Outbound, tokio::sync::mpsc::Receiver<Incoming>) {
    let tcp = TcpStream::connect(("127.0.0.1", a.port)).await.unwrap();
    let (ws, _) = transport::connect(tcp, TOKEN).await.unwrap();
    let (out, mut rx) = transport::spawn(ws, Heartbeat::from_env());
    match rx.recv().await {
        Some(Incoming::Control(Control::Hello { .. })) => {}
        other => panic!("expected hello, got {other:?}"),
    }
    (out, rx)
}

async fn next_control(rx: &mut tokio::sync::mpsc::Receiver<Incoming>) -> Control {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("agent answers in time") {
            Some(Incoming::Control(Control::Credit { .. })) => continue,
            Some(Incoming::Control(c)) => return c,
            other => panic!("expected a control message, got {other:?}"),
        }
    }
}

/// A raw tar entry with any path bytes (tar::Builder refuses hostile paths,
/// which is exactly what this client must be able to send).
fn raw_entry(out: &mut Vec<u8>, path: &[u8], kind: tar::EntryType, data: &[u8], link: Option<&[u8]>) {
    if path.len() >= 100 {
        // GNU long name: a 'L' entry whose data is the name.
        let mut name = path.to_vec();
        name.push(0);
        raw_entry(out, b"././@LongLink", tar::EntryType::GNULongName, &name, None);
    }
    let mut h = tar::Header::new_gnu();
    {
        let g = h.as_gnu_mut().unwrap();
        let n = path.len().min(99);
        g.name[..n].copy_from_slice(&path[..n]);
        if let Some(l) = link {
            g.linkname[..l.len()].copy_from_slice(l);
        }
    }
    h.set_entry_type(kind);
    h.set_mode(0o644);
    h.set_size(data.len() as u64);
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    let pad = (512 - data.len() % 512) % 512;
    out.extend(std::iter::repeat_n(0u8, pad));
}

async fn send_batch(
    out: &transport::Outbound,
    rx: &mut tokio::sync::mpsc::Receiver<Incoming>,
    id: u64,
    deletes: Vec<WirePath>,
    archive: Option<Vec<u8>>,
) -> Control {
    let mut credits = transport::Credits::default();
    let stream = archive.as_ref().map(|_| id as u32);
    out.control(Control::Batch { id, deletes, stream, commands: vec![], restart: false }).unwrap();
    if let Some(a) = archive {
        let s = credits.open(id as u32, out.clone());
        s.send(&a).await.unwrap();
        s.finish().await.unwrap();
    }
    next_control(rx).await
}

fn assert_outside_untouched(a: &Agent) {
    let names: Vec<_> = std::fs::read_dir(&a.outside).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("victim")], "nothing new outside the root");
    assert_eq!(std::fs::read_to_string(a.outside.join("victim")).unwrap(), "untouched");
    let parent = a.root.parent().unwrap();
    let mut top: Vec<_> =
        std::fs::read_dir(parent).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    top.sort();
    assert_eq!(top, vec!["outside", "root"], "nothing written beside the root");
}

/// An archive of hostile entries and one good file (`good.txt`); returns it
/// and the number of hostile entries.
fn hostile_archive() -> (Vec<u8>, usize) {
    use tar::EntryType as T;
    let mut ar = Vec::new();
    let long_name = "n".repeat(300);
    let long_path = vec!["d"; 2100].join("/");
    // (path, entry type, data, link target)
    type Case<'a> = (&'a [u8], T, &'a [u8], Option<&'a [u8]>);
    let hostile: Vec<Case> = vec![
        (b"../escape", T::Regular, b"x", None),
        (b"/tmp/devloop-abs-escape", T::Regular, b"x", None),
        (b"ok/../../escape2", T::Regular, b"x", None),
        (b"evil/pwned", T::Regular, b"x", None),
        (b"evil/sub/pwned", T::Regular, b"x", None),
        (b"link-out", T::Symlink, b"", Some(b"../outside/victim")),
        (b"link-abs", T::Symlink, b"", Some(b"/etc/passwd")),
        (b"hard", T::Link, b"", Some(b"../outside/victim")),
        (b"dev", T::Char, b"", None),
        (b"fifo", T::Fifo, b"", None),
        (long_name.as_bytes(), T::Regular, b"x", None),
        (long_path.as_bytes(), T::Regular, b"x", None),
        (b"good.txt", T::Regular, b"fine", None),
    ];
    for (p, k, d, l) in &hostile {
        raw_entry(&mut ar, p, *k, d, *l);
    }
    ar.extend_from_slice(&[0u8; 1024]);
    (ar, hostile.len() - 1)
}

/// The reply to the hostile archive and deletions: only good.txt landed,
/// every hostile entry and deletion is reported by path, nothing outside
/// the root changed.
fn assert_only_good_landed(a: &Agent, reply: Control, hostile: usize) {
    let Control::Applied { id: 2, written, errors, .. } = reply else { panic!("expected applied, got {reply:?}") };
    assert_eq!(written, 1, "errors: {errors:#?}");
    assert_eq!(std::fs::read_to_string(a.root.join("good.txt")).unwrap(), "fine");
    assert_eq!(errors.len(), hostile + 3, "errors: {errors:#?}");
    for e in &errors {
        assert!(!e.message.is_empty());
    }
    assert!(errors.iter().any(|e| e.path == "evil/pwned" && e.message.contains("symlink")));
    assert!(errors.iter().any(|e| e.path == "hard" && e.message.contains("hard link")));
    assert_outside_untouched(a);
    assert!(!Path::new("/tmp/devloop-abs-escape").exists());
}

/// Deletions that each try to leave the root.
fn hostile_deletes() -> Vec<WirePath> {
    vec!["../outside/victim".into(), "evil/victim".into(), "/etc/hostname".into()]
}

/// An agent whose root holds `evil`, a symlink pointing outside (as a pod
/// process could create): nothing may be written or deleted through it.
async fn agent_with_a_link_out() -> (Agent, transport::Outbound, tokio::sync::mpsc::Receiver<Incoming>) {
    let a = start_agent(None);
    std::os::unix::fs::symlink(&a.outside, a.root.join("evil")).unwrap();
    let (out, rx) = session(&a).await;
    (a, out, rx)
}

#[tokio::test]
async fn hostile_paths_and_entries_never_escape_the_root() {
    let (a, out, mut rx) = agent_with_a_link_out().await;
    let (ar, hostile) = hostile_archive();
    let reply = send_batch(&out, &mut rx, 2, hostile_deletes(), Some(ar)).await;
    assert_only_good_landed(&a, reply, hostile);
    // Deleting the link itself is allowed: it removes the link, never its
    // target.
    let reply = send_batch(&out, &mut rx, 3, vec!["evil".into()], None).await;
    assert!(matches!(reply, Control::Applied { deleted: 1, .. }), "{reply:?}");
    assert!(std::fs::symlink_metadata(a.root.join("evil")).is_err(), "the link is gone");
    assert_outside_untouched(&a);
    out.close(1000, "");
}

/// The same hostile archive, sent the way an edit travels: the batch and
/// its archive in one message.
#[tokio::test]
async fn hostile_entries_in_a_one_message_batch_never_escape_the_root() {
    let (a, out, mut rx) = agent_with_a_link_out().await;
    let (ar, hostile) = hostile_archive();
    assert!(ar.len() <= devloop_agent::protocol::CHUNK_SIZE, "fits one message");
    let batch = Control::Batch { id: 2, deletes: hostile_deletes(), stream: None, commands: vec![], restart: false };
    out.batch_with_archive(&batch, &ar).unwrap();
    assert_only_good_landed(&a, next_control(&mut rx).await, hostile);
    out.close(1000, "");
}

/// The agent checks each parent directory once per batch; a batch that
/// makes a directory, replaces it with a symlink and then writes below that
/// name must still be refused (the check is not remembered past the swap).
#[tokio::test]
async fn a_directory_swapped_for_a_symlink_mid_batch_is_not_written_through() {
    let a = start_agent(None);
    let (out, mut rx) = session(&a).await;
    use tar::EntryType as T;
    let mut ar = Vec::new();
    raw_entry(&mut ar, b"inner", T::Directory, b"", None);
    raw_entry(&mut ar, b"other", T::Directory, b"", None);
    raw_entry(&mut ar, b"other", T::Symlink, b"", Some(b"inner"));
    raw_entry(&mut ar, b"other/pwned", T::Regular, b"through the symlink", None);
    ar.extend_from_slice(&[0u8; 1024]);
    let reply = send_batch(&out, &mut rx, 2, vec![], Some(ar)).await;
    let Control::Applied { errors, .. } = reply else { panic!("expected applied, got {reply:?}") };
    assert!(
        errors.iter().any(|e| e.path == "other/pwned" && e.message.contains("symlink")),
        "a write below a directory swapped for a symlink was not refused: {errors:#?}"
    );
    assert!(!a.root.join("inner/pwned").exists(), "written through a symlinked parent");
    assert!(std::fs::symlink_metadata(a.root.join("other")).unwrap().file_type().is_symlink());
    assert_outside_untouched(&a);
    out.close(1000, "");
}

#[tokio::test]
async fn wrong_token_is_refused_and_the_agent_keeps_serving() {
    let a = start_agent(None);
    let tcp = TcpStream::connect(("127.0.0.1", a.port)).await.unwrap();
    match transport::connect(tcp, "not-the-token").await {
        Err(ConnectError::BadToken) => {}
        Err(e) => panic!("expected BadToken, got {e}"),
        Ok(_) => panic!("a wrong token was accepted"),
    }
    // A correct session still works.
    let (out, _rx) = session(&a).await;
    out.close(1000, "");
}

#[tokio::test]
async fn wrong_protocol_version_gets_a_message_naming_both_versions() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let a = start_agent(None);
    let tcp = TcpStream::connect(("127.0.0.1", a.port)).await.unwrap();
    let mut req = "ws://x/".into_client_request().unwrap();
    req.headers_mut().insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    req.headers_mut().insert("sec-websocket-protocol", "devloop.v999".parse().unwrap());
    match tokio_tungstenite::client_async(req, tcp).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 426);
            let body = String::from_utf8(resp.body().clone().unwrap()).unwrap();
            let ours = format!("v{}", devloop_agent::protocol::PROTOCOL_VERSION);
            assert!(body.contains(&ours) && body.contains("v999"), "body: {body}");
        }
        other => panic!("expected an HTTP refusal, got {:?}", other.map(|_| ())),
    }
    let (out, _rx) = session(&a).await;
    out.close(1000, "");
}

/// Opens an authenticated raw WebSocket (no devloop framing on top).
async fn raw_ws(a: &Agent) -> tokio_tungstenite::WebSocketStream<TcpStream> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let tcp = TcpStream::connect(("127.0.0.1", a.port)).await.unwrap();
    let mut req = "ws://x/".into_client_request().unwrap();
    req.headers_mut().insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    req.headers_mut().insert(
        "sec-websocket-protocol",
        devloop_agent::protocol::subprotocol(devloop_agent::protocol::PROTOCOL_VERSION).parse().unwrap(),
    );
    // Allow sending messages larger than the agent accepts.
    let cfg = transport::ws_config().max_message_size(None).max_frame_size(None);
    tokio_tungstenite::client_async_with_config(req, tcp, Some(cfg)).await.unwrap().0
}

/// Reads until the agent closes; returns the close code and reason.
async fn close_of(ws: &mut tokio_tungstenite::WebSocketStream<TcpStream>) -> (u16, String) {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("agent closes in time") {
            Some(Ok(Message::Close(Some(f)))) => return (f.code.into(), f.reason.to_string()),
            Some(Ok(Message::Close(None))) | None => return (0, String::new()),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return (0, e.to_string()),
        }
    }
}

/// Reads raw server frames until EOF and returns the close frame's code and
/// reason (server frames are unmasked; control frames are short).
async fn raw_close(mut tcp: TcpStream) -> (u16, String) {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let _ =
        tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut buf)).await.expect("agent closes in time");
    let mut i = 0;
    while i + 2 <= buf.len() {
        let op = buf[i] & 0x0f;
        let (len, hdr) = match buf[i + 1] & 0x7f {
            126 => (u16::from_be_bytes([buf[i + 2], buf[i + 3]]) as usize, 4),
            127 => (u64::from_be_bytes(buf[i + 2..i + 10].try_into().unwrap()) as usize, 10),
            n => (n as usize, 2),
        };
        let payload = &buf[i + hdr..(i + hdr + len).min(buf.len())];
        if op == 0x8 && payload.len() >= 2 {
            return (u16::from_be_bytes([payload[0], payload[1]]), String::from_utf8_lossy(&payload[2..]).into_owned());
        }
        i += hdr + len;
    }
    (0, format!("no close frame in {} bytes", buf.len()))
}

#[tokio::test]
async fn garbage_oversized_and_truncated_frames_close_only_that_session() {
    let a = start_agent(None);

    let mut ws = raw_ws(&a).await;
    ws.send(Message::Binary(vec![0x09, 1, 2, 3].into())).await.unwrap();
    let (code, reason) = close_of(&mut ws).await;
    assert_eq!(code, 1002);
    assert!(reason.contains("unknown frame tag"), "reason: {reason}");

    // Oversized: a binary frame header announcing more than the limit.
    {
        use tokio::io::AsyncWriteExt;
        let mut tcp = raw_ws(&a).await.into_inner();
        let mut hdr = vec![0x82, 0x80 | 127];
        hdr.extend_from_slice(&((devloop_agent::protocol::MAX_MESSAGE + 1024) as u64).to_be_bytes());
        hdr.extend_from_slice(&[1, 2, 3, 4]);
        tcp.write_all(&hdr).await.unwrap();
        let (code, reason) = raw_close(tcp).await;
        assert_eq!(code, 1009, "reason: {reason}");
        assert!(reason.contains("larger than the limit"), "reason: {reason}");
    }

    let mut ws = raw_ws(&a).await;
    ws.send(Message::Binary(
        Frame::Control(Control::Hello { agent_version: "x".into(), protocol: 1, root: "/".into(), pid: 1 })
            .encode()
            .into(),
    ))
    .await
    .unwrap();
    let (code, reason) = close_of(&mut ws).await;
    assert_eq!(code, 1002);
    assert!(reason.contains("unexpected message"), "reason: {reason}");

    // One-message batches: cut short, carrying something that is not a
    // batch, naming a stream, or with an archive too large for one message.
    let hello = Control::Hello { agent_version: "x".into(), protocol: 1, root: "/".into(), pid: 1 };
    let streamed = Control::Batch { id: 1, deletes: vec![], stream: Some(1), commands: vec![], restart: false };
    let plain = Control::Batch { id: 1, deletes: vec![], stream: None, commands: vec![], restart: false };
    let big = vec![0u8; devloop_agent::protocol::CHUNK_SIZE + 1];
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vec![3, 0, 0], "batch frame shorter"),
        (devloop_agent::protocol::encode_batch(&hello, b"x"), "only a batch without a stream"),
        (devloop_agent::protocol::encode_batch(&streamed, b"x"), "only a batch without a stream"),
        (devloop_agent::protocol::encode_batch(&plain, &big), "must be streamed"),
    ];
    for (frame, why) in cases {
        let mut ws = raw_ws(&a).await;
        ws.send(Message::Binary(frame.into())).await.unwrap();
        let (code, reason) = close_of(&mut ws).await;
        assert_eq!(code, 1002, "reason: {reason}");
        assert!(reason.contains(why), "expected {why:?} in {reason:?}");
    }
    assert!(!a.root.join("x").exists());

    // Truncated: half a frame header, then the socket closes.
    {
        use tokio::io::AsyncWriteExt;
        let ws = raw_ws(&a).await;
        let mut tcp = ws.into_inner();
        tcp.write_all(&[0x82, 0xFE, 0x10]).await.unwrap();
        tcp.shutdown().await.unwrap();
    }

    // After all that, a real session still works end to end.
    let (out, mut rx) = session(&a).await;
    let mut ar = Vec::new();
    raw_entry(&mut ar, b"after.txt", tar::EntryType::Regular, b"ok", None);
    ar.extend_from_slice(&[0u8; 1024]);
    let reply = send_batch(&out, &mut rx, 2, vec![], Some(ar)).await;
    assert!(matches!(reply, Control::Applied { written: 1, .. }), "{reply:?}");
    assert_eq!(std::fs::read_to_string(a.root.join("after.txt")).unwrap(), "ok");
    assert_outside_untouched(&a);
}

#[tokio::test]
async fn a_silent_peer_is_dropped_within_the_heartbeat_timeout() {
    // Agent pings every 100 ms and gives up after 500 ms of silence.
    let a = start_agent(Some(100));
    let tcp = raw_ws(&a).await.into_inner();
    // Complete the handshake, then say nothing and read nothing (a frozen
    // peer: it never answers the agent's pings).
    let t0 = std::time::Instant::now();
    let (code, reason) = raw_close(tcp).await;
    assert!(t0.elapsed() < Duration::from_secs(3), "noticed in {:?}", t0.elapsed());
    assert_eq!(code, 1001, "reason: {reason}");
    assert!(reason.contains("no heartbeat"), "reason: {reason}");
    // The agent still serves others.
    let (out, _rx) = session(&a).await;
    out.close(1000, "");
}

#[tokio::test]
async fn an_index_request_outside_the_root_is_refused_and_answered() {
    let a = start_agent(None);
    let (out, mut rx) = session(&a).await;
    out.control(Control::IndexRequest { id: 7, under: vec!["../outside".into()], prune: vec![] }).unwrap();
    match next_control(&mut rx).await {
        Control::Error { request: Some(7), fatal: false, message, .. } => {
            assert!(message.contains("../outside"), "{message}")
        }
        other => panic!("expected an error answering request 7, got {other:?}"),
    }
    // The request still ends (empty), so a client waiting on it is released.
    match next_control(&mut rx).await {
        Control::IndexPart { id: 7, entries, done: true } => assert!(entries.is_empty()),
        other => panic!("expected the final index part, got {other:?}"),
    }
    // The session goes on: a valid index of the root works.
    std::fs::write(a.root.join("f"), "x").unwrap();
    out.control(Control::IndexRequest { id: 8, under: vec![WirePath::default()], prune: vec![] }).unwrap();
    match next_control(&mut rx).await {
        Control::IndexPart { id: 8, entries, done: true } => {
            assert_eq!(entries.iter().map(|e| e.path.to_str().unwrap()).collect::<Vec<_>>(), vec!["f"])
        }
        other => panic!("expected the index, got {other:?}"),
    }
    out.close(1000, "");
}

/// The agent's peak resident memory, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmHWM in /proc/PID/status")
}

/// The credit window binds: a client that keeps sending on a stream past
/// the credit the agent granted is cut off, with a message saying so, and
/// the agent's memory stays bounded whatever the client sends. The flooded
/// stream belongs to a batch queued behind one whose stream never ends, so
/// nothing consumes it: without the window, every byte would pile up in
/// the agent.
#[tokio::test]
async fn a_client_that_floods_past_its_window_is_cut_off_with_memory_bounded() {
    let a = start_agent(None);
    let pid = a.child.id();
    let before = peak_rss_kib(pid);
    let ws = raw_ws(&a).await;
    let (mut tx, mut rx) = ws.split();
    let reader = tokio::spawn(async move {
        while let Some(Ok(m)) = rx.next().await {
            if let Message::Close(Some(f)) = m {
                return (u16::from(f.code), f.reason.to_string());
            }
        }
        (0, String::new())
    });
    let ctl = |c: Control| Message::Binary(Frame::Control(c).encode().into());
    let chunk = vec![0xa5u8; devloop_agent::protocol::CHUNK_SIZE];
    let data = |s: u32| Message::Binary(devloop_agent::protocol::encode_data(s, &chunk).into());
    // Batch 1: garbage past the in-memory size, so the apply thread takes
    // it and waits for its end, which never comes.
    tx.send(ctl(Control::Batch { id: 1, deletes: vec![], stream: Some(1), commands: vec![], restart: false }))
        .await
        .unwrap();
    for _ in 0..24 {
        tx.send(data(1)).await.unwrap();
    }
    tx.send(ctl(Control::Batch { id: 2, deletes: vec![], stream: Some(2), commands: vec![], restart: false }))
        .await
        .unwrap();
    // 512 MiB on stream 2, never waiting for credit.
    let mut sent = 0usize;
    for _ in 0..8192 {
        if tx.send(data(2)).await.is_err() {
            break;
        }
        sent += chunk.len();
    }
    let (code, reason) = tokio::time::timeout(Duration::from_secs(20), reader).await.expect("closed in time").unwrap();
    let grown_mib = peak_rss_kib(pid).saturating_sub(before) / 1024;
    println!("sent {} MiB before the cut; agent peak grew by {grown_mib} MiB", sent >> 20);
    assert!(sent < 256 << 20, "the agent never cut the flood off");
    assert!(grown_mib < 64, "the agent held {grown_mib} MiB for a flooding client");
    // The close frame carries the reason. A client that keeps writing
    // after it may see its connection reset instead, before it reads it:
    // the agent's own log says why in any case.
    if code != 0 {
        assert_eq!(code, 1002, "reason: {reason}");
        assert!(reason.contains("must wait for credit"), "reason: {reason}");
    }
    let t0 = std::time::Instant::now();
    while !a.stderr.lock().unwrap().contains("must wait for credit") {
        assert!(t0.elapsed() < Duration::from_secs(10), "agent log: {}", a.stderr.lock().unwrap());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The agent lives on and serves others.
    let (out, _rx) = session(&a).await;
    out.close(1000, "");
}

/// Names are bytes: a name that is not UTF-8 lands as it is, and every
/// path rule holds for bytes exactly as for text.
#[tokio::test]
async fn names_that_are_not_utf8_land_and_byte_tricks_are_refused() {
    use std::os::unix::ffi::OsStrExt;
    use tar::EntryType as T;
    let (a, out, mut rx) = agent_with_a_link_out().await;
    let mut ar = Vec::new();
    let long = [0xe9u8; 256];
    // (path, entry type, link target)
    type Case<'a> = (&'a [u8], T, Option<&'a [u8]>);
    let hostile: Vec<Case> = vec![
        (b"\xff/../../escape-bytes", T::Regular, None),
        (b"/tmp/devloop-abs-\xff", T::Regular, None),
        (b"evil/\xff-pwned", T::Regular, None),
        (b"\xfelink", T::Symlink, Some(b"../outside/\xff")),
        (b"\xfealink", T::Symlink, Some(b"/etc/\xff")),
        (&long, T::Regular, None),
    ];
    for (p, k, l) in &hostile {
        raw_entry(&mut ar, p, *k, b"x", *l);
    }
    raw_entry(&mut ar, b"caf\xe9.txt", T::Regular, b"latin-1", None);
    raw_entry(&mut ar, b"d\xff", T::Directory, b"", None);
    raw_entry(&mut ar, b"d\xff/\x80", T::Regular, b"below", None);
    raw_entry(&mut ar, b"d\xff/l\xfe", T::Symlink, b"", Some(b"\x80"));
    ar.extend_from_slice(&[0u8; 1024]);
    let deletes = vec![WirePath::from(&b"\xff/../../outside/victim"[..]), WirePath::from(&b"evil/\xff"[..])];
    let reply = send_batch(&out, &mut rx, 2, deletes, Some(ar)).await;
    let Control::Applied { written, errors, .. } = reply else { panic!("expected applied, got {reply:?}") };
    assert_eq!(written, 4, "errors: {errors:#?}");
    assert_eq!(errors.len(), hostile.len() + 2, "errors: {errors:#?}");
    let p = |b: &[u8]| a.root.join(std::ffi::OsStr::from_bytes(b));
    assert_eq!(std::fs::read(p(b"caf\xe9.txt")).unwrap(), b"latin-1");
    assert_eq!(std::fs::read(p(b"d\xff/l\xfe")).unwrap(), b"below", "a link with a byte name resolves");
    assert_outside_untouched(&a);
    out.close(1000, "");
}
