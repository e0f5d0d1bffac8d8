//! A hostile client speaking the protocol directly to the real agent binary
//! on loopback. Whatever it sends, nothing outside the sync root is written,
//! deleted or followed (invariant 1); bad sessions get a clear error and are
//! closed; the agent keeps serving other sessions.

use devloop_agent::handshake::{self, ConnectError};
use devloop_agent::mux::{Incoming, Mux};
use devloop_agent::paths::WirePath;
use devloop_agent::protocol::{Control, Encoding, Frame, StreamHeader};
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod common;

use common::*;

async fn next_control(rx: &mut tokio::sync::mpsc::Receiver<Incoming>) -> Control {
    match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("agent answers in time") {
        Some(Incoming::Control(c)) => c,
        other => panic!("expected a control message, got {other:?}"),
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

/// Sends a batch: its archive (if any) as a stream, as a large batch
/// travels; returns the agent's answer.
async fn send_batch(
    out: &Mux,
    rx: &mut tokio::sync::mpsc::Receiver<Incoming>,
    id: u64,
    deletes: Vec<WirePath>,
    archive: Option<Vec<u8>>,
) -> Control {
    send_stream(out, rx, id, deletes, archive, None).await
}

/// [`send_batch`], with the stream's bytes (`archive`, as given: already
/// encoded) announced as `encoding`.
async fn send_stream(
    out: &Mux,
    rx: &mut tokio::sync::mpsc::Receiver<Incoming>,
    id: u64,
    deletes: Vec<WirePath>,
    archive: Option<Vec<u8>>,
    encoding: Option<Encoding>,
) -> Control {
    match archive {
        None => out.control(Control::Batch { id, deletes, commands: vec![], restart: false }).unwrap(),
        Some(a) => {
            let header = StreamHeader::Batch { id, deletes, commands: vec![], restart: false, encoding };
            let mut s = out.open(&header, devloop_agent::protocol::STREAM_WINDOW).unwrap();
            s.write_all(&a).await.unwrap();
            s.shutdown().await.unwrap();
        }
    }
    next_control(rx).await
}

/// An archive in zstd blocks, as the CLI sends it over a network.
fn zstd_blocks(archive: &[u8]) -> Vec<u8> {
    let mut w = devloop_agent::codec::CompressWriter::new(Vec::new()).unwrap();
    std::io::Write::write_all(&mut w, archive).unwrap();
    w.finish().unwrap().0
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
async fn agent_with_a_link_out() -> (Agent, Mux, tokio::sync::mpsc::Receiver<Incoming>) {
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

/// The same hostile archive in zstd blocks: decompressed, it meets the same
/// checks. Then blocks that are not what they claim (garbage, a block that
/// would expand past its limit, a stream cut mid-block) fail their batch
/// with a message, and the session goes on to apply the next one.
#[tokio::test]
async fn compressed_streams_meet_the_same_rules_and_bad_blocks_fail_only_their_batch() {
    let (a, out, mut rx) = agent_with_a_link_out().await;
    let (ar, hostile) = hostile_archive();
    let packed = zstd_blocks(&ar);
    assert!(packed.len() < ar.len(), "the archive travelled compressed ({} -> {})", ar.len(), packed.len());
    let reply = send_stream(&out, &mut rx, 2, hostile_deletes(), Some(packed), Some(Encoding::Zstd)).await;
    assert_only_good_landed(&a, reply, hostile);

    let bomb = {
        let frame = zstd::bulk::compress(&vec![0u8; 4 << 20], 1).unwrap();
        let mut w = ((1u32 << 31) | frame.len() as u32).to_be_bytes().to_vec();
        w.extend_from_slice(&frame);
        w
    };
    let mut good = Vec::new();
    raw_entry(&mut good, b"after.txt", tar::EntryType::Regular, b"still here", None);
    good.extend_from_slice(&[0; 1024]);
    let cut = zstd_blocks(&good)[..20].to_vec();
    let garbage: Vec<u8> = [((1u32 << 31) | 5000).to_be_bytes().to_vec(), vec![0x5a; 5000]].concat();
    for (id, bad) in [(3, garbage), (4, bomb), (5, cut)] {
        let reply = send_stream(&out, &mut rx, id, vec![], Some(bad), Some(Encoding::Zstd)).await;
        let Control::Applied { written: 0, errors, .. } = &reply else { panic!("batch {id}: {reply:?}") };
        assert!(!errors.is_empty() && errors.iter().all(|e| !e.message.is_empty()), "batch {id}: {errors:?}");
    }
    let reply = send_stream(&out, &mut rx, 6, vec![], Some(zstd_blocks(&good)), Some(Encoding::Zstd)).await;
    assert!(matches!(reply, Control::Applied { id: 6, written: 1, .. }), "{reply:?}");
    assert_eq!(std::fs::read_to_string(a.root.join("after.txt")).unwrap(), "still here");
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
    let batch = Control::Batch { id: 2, deletes: hostile_deletes(), commands: vec![], restart: false };
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
    match handshake::connect(tcp, "not-the-token").await {
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
    let a = start_agent(None);
    let mut tcp = TcpStream::connect(("127.0.0.1", a.port)).await.unwrap();
    // An older devloop's upgrade request (it spoke WebSocket).
    let req = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: devloop.v999\r\n\
         Authorization: Bearer {TOKEN}\r\n\r\n"
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_string(&mut answer)).await.unwrap().unwrap();
    assert!(answer.starts_with("HTTP/1.1 426"), "{answer}");
    let ours = format!("v{}", devloop_agent::protocol::PROTOCOL_VERSION);
    assert!(answer.contains(&ours) && answer.contains("v999"), "answer: {answer}");
    let (out, _rx) = session(&a).await;
    out.close(1000, "");
}

/// Opens an authenticated raw connection (the handshake done, no framing
/// on top: the test writes frames by hand).
async fn raw_conn(a: &Agent) -> TcpStream {
    let tcp = TcpStream::connect(("127.0.0.1", a.port)).await.unwrap();
    let (tcp, rest, _) = handshake::connect(tcp, TOKEN).await.unwrap();
    assert!(rest.is_empty() || rest.len() < 4096);
    tcp
}

/// Reads frames until the agent closes; returns the CLOSE frame's code
/// and reason (or 0 and what happened instead).
async fn close_of(tcp: &mut TcpStream) -> (u16, String) {
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut chunk = vec![0u8; 64 << 10];
        loop {
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    });
    read.await.expect("agent closes in time");
    let mut i = 0;
    while i + 4 <= buf.len() {
        let len = u32::from_be_bytes(buf[i..i + 4].try_into().unwrap()) as usize;
        if i + 4 + len > buf.len() {
            break;
        }
        if let Ok(Frame::Close { code, reason }) = Frame::decode(&buf[i + 4..i + 4 + len]) {
            return (code, reason);
        }
        i += 4 + len;
    }
    (0, format!("no close frame in {} bytes", buf.len()))
}

/// One raw frame: its length, then the given tag and payload.
fn raw_frame(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

#[tokio::test]
async fn garbage_oversized_and_truncated_frames_close_only_that_session() {
    let a = start_agent(None);
    let expect = |code: u16, why: &'static str| {
        move |(c, reason): (u16, String)| {
            assert_eq!(c, code, "reason: {reason}");
            assert!(reason.contains(why), "expected {why:?} in {reason:?}");
        }
    };

    let mut tcp = raw_conn(&a).await;
    tcp.write_all(&raw_frame(&[0x42, 1, 2, 3])).await.unwrap();
    expect(1002, "unknown frame tag")(close_of(&mut tcp).await);

    // Oversized: a frame header announcing more than the limit.
    let mut tcp = raw_conn(&a).await;
    tcp.write_all(&((devloop_agent::protocol::MAX_MESSAGE + 1024) as u32).to_be_bytes()).await.unwrap();
    tcp.write_all(&[1, 2, 3, 4]).await.unwrap();
    expect(1009, "larger than the limit")(close_of(&mut tcp).await);

    let mut tcp = raw_conn(&a).await;
    let hello = Control::Hello { agent_version: "x".into(), protocol: 1, root: "/".into(), pid: 1, features: vec![] };
    tcp.write_all(&Frame::Control(hello.clone()).encode()).await.unwrap();
    expect(1002, "unexpected message")(close_of(&mut tcp).await);

    // One-frame batches: cut short, carrying something that is not a
    // batch, or with an archive too large for one frame.
    let plain = Control::Batch { id: 1, deletes: vec![], commands: vec![], restart: false };
    let big = vec![0u8; devloop_agent::protocol::CHUNK_SIZE + 1];
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (raw_frame(&[3, 0, 0]), "batch frame shorter"),
        (devloop_agent::protocol::encode_batch(&hello, b"x"), "only a batch may come with an archive"),
        (devloop_agent::protocol::encode_batch(&plain, &big), "must be a stream"),
        // Streams: data on one never opened; an id of the agent's side;
        // the same id opened twice.
        (devloop_agent::protocol::encode_data(41, b"x"), "never opened"),
        (Frame::Open { stream: 2, window: 1024, header: b"{}".to_vec() }.encode(), "by the wrong side"),
    ];
    for (frame, why) in cases {
        let mut tcp = raw_conn(&a).await;
        tcp.write_all(&frame).await.unwrap();
        expect(1002, why)(close_of(&mut tcp).await);
    }
    let mut tcp = raw_conn(&a).await;
    let dial = StreamHeader::Dial { host: "127.0.0.1".into(), port: 1 }.encode();
    tcp.write_all(&Frame::Open { stream: 5, window: 1024, header: dial.clone() }.encode()).await.unwrap();
    tcp.write_all(&Frame::Open { stream: 5, window: 1024, header: dial }.encode()).await.unwrap();
    expect(1002, "opened twice")(close_of(&mut tcp).await);
    assert!(!a.root.join("x").exists());

    // Truncated: half a frame, then the socket closes.
    {
        let mut tcp = raw_conn(&a).await;
        tcp.write_all(&[0, 0, 0x10, 0, 1, b'{']).await.unwrap();
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
    let mut tcp = raw_conn(&a).await;
    // Complete the handshake, then say nothing (a frozen peer: nothing,
    // not even a ping, comes from it).
    let t0 = std::time::Instant::now();
    let (code, reason) = close_of(&mut tcp).await;
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
    out.control(Control::IndexRequest { id: 7, under: vec!["../outside".into()], prune: vec![], packed: false })
        .unwrap();
    match next_control(&mut rx).await {
        Control::Error { request: Some(7), fatal: false, message, .. } => {
            assert!(message.contains("../outside"), "{message}")
        }
        other => panic!("expected an error answering request 7, got {other:?}"),
    }
    // The request still ends (empty), so a client waiting on it is released.
    match next_control(&mut rx).await {
        Control::IndexPart { id: 7, entries, done: true, .. } => assert!(entries.is_empty()),
        other => panic!("expected the final index part, got {other:?}"),
    }
    // The session goes on: a valid index of the root works.
    std::fs::write(a.root.join("f"), "x").unwrap();
    // Asked for plain frames, then for compressed ones: the same answer.
    for (id, packed) in [(8, false), (9, true)] {
        out.control(Control::IndexRequest { id, under: vec![WirePath::default()], prune: vec![], packed }).unwrap();
        match next_control(&mut rx).await {
            Control::IndexPart { id: got, entries, done: true, .. } if got == id => {
                assert_eq!(entries.iter().map(|e| e.path.to_str().unwrap()).collect::<Vec<_>>(), vec!["f"])
            }
            other => panic!("expected the index (packed: {packed}), got {other:?}"),
        }
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

/// The window binds: a client that keeps sending on a stream past the
/// window the agent granted is cut off, with a reason, and the agent's
/// memory stays bounded whatever the client sends. The flooded stream
/// belongs to a batch queued behind one whose stream never ends, so
/// nothing consumes it: without the window, every byte would pile up in
/// the agent.
#[tokio::test]
async fn a_client_that_floods_past_its_window_is_cut_off_with_memory_bounded() {
    let a = start_agent(None);
    let pid = a.child.id();
    let before = peak_rss_kib(pid);
    let tcp = raw_conn(&a).await;
    let (mut rd, mut wr) = tcp.into_split();
    let reader = tokio::spawn(async move {
        let mut all = Vec::new();
        let _ = rd.read_to_end(&mut all).await;
        let mut i = 0;
        while i + 4 <= all.len() {
            let len = u32::from_be_bytes(all[i..i + 4].try_into().unwrap()) as usize;
            if i + 4 + len > all.len() {
                break;
            }
            if let Ok(Frame::Close { code, reason }) = Frame::decode(&all[i + 4..i + 4 + len]) {
                return (code, reason);
            }
            i += 4 + len;
        }
        (0, String::new())
    });
    let window = devloop_agent::protocol::STREAM_WINDOW;
    let open = |id: u32, batch: u64| {
        let h = StreamHeader::Batch { id: batch, deletes: vec![], commands: vec![], restart: false, encoding: None };
        Frame::Open { stream: id, window, header: h.encode() }.encode()
    };
    let chunk = vec![0xa5u8; devloop_agent::protocol::CHUNK_SIZE];
    // Batch 1: garbage that the apply thread takes, then waits for the
    // rest of, which never comes.
    wr.write_all(&open(1, 1)).await.unwrap();
    for _ in 0..24 {
        wr.write_all(&devloop_agent::protocol::encode_data(1, &chunk)).await.unwrap();
    }
    wr.write_all(&open(3, 2)).await.unwrap();
    // 512 MiB on stream 3, never waiting for WINDOW.
    let mut sent = 0usize;
    let frame = devloop_agent::protocol::encode_data(3, &chunk);
    for _ in 0..8192 {
        if wr.write_all(&frame).await.is_err() {
            break;
        }
        sent += chunk.len();
    }
    let (code, reason) = tokio::time::timeout(Duration::from_secs(20), reader).await.expect("closed in time").unwrap();
    let grown_mib = peak_rss_kib(pid).saturating_sub(before) / 1024;
    println!("sent {} MiB before the cut; agent peak grew by {grown_mib} MiB", sent >> 20);
    assert!(grown_mib < 64, "the agent held {grown_mib} MiB for a flooding client");
    // The CLOSE carries the reason. A client that keeps writing after it
    // may see its connection reset instead, before it reads it: the
    // agent's own log says why in any case.
    if code != 0 {
        assert_eq!(code, 1002, "reason: {reason}");
        assert!(reason.contains("past its window"), "reason: {reason}");
    }
    let t0 = std::time::Instant::now();
    while !a.stderr.lock().unwrap().contains("past its window") {
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

/// A stream of a kind the agent does not know is refused with a reason
/// naming the kind; the session goes on.
#[tokio::test]
async fn a_stream_of_an_unknown_kind_is_refused_and_the_session_lives_on() {
    let a = start_agent(None);
    let mut tcp = raw_conn(&a).await;
    let open = Frame::Open { stream: 1, window: 1024, header: br#"{"kind":"teleport","to":"mars"}"#.to_vec() };
    tcp.write_all(&open.encode()).await.unwrap();
    tcp.write_all(
        &Frame::Control(Control::IndexRequest {
            id: 9,
            under: vec![WirePath::default()],
            prune: vec![],
            packed: false,
        })
        .encode(),
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    let (mut reset, mut index) = (None, false);
    let t0 = std::time::Instant::now();
    while reset.is_none() || !index {
        assert!(t0.elapsed() < Duration::from_secs(10), "reset {reset:?}, index {index}");
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut chunk)).await.unwrap().unwrap();
        assert!(n > 0, "the agent closed the session");
        buf.extend_from_slice(&chunk[..n]);
        while buf.len() >= 4 {
            let len = u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
            if buf.len() < 4 + len {
                break;
            }
            match Frame::decode(&buf[4..4 + len]).unwrap() {
                Frame::Reset { stream: 1, reason } => reset = Some(reason),
                Frame::Control(Control::IndexPart { id: 9, done: true, .. }) => index = true,
                _ => {}
            }
            buf.drain(..4 + len);
        }
    }
    let reason = reset.unwrap();
    assert!(reason.contains("stream kind `teleport` is not known"), "{reason}");
}
