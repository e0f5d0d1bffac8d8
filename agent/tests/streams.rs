//! Streams on one session, against the real agent binary on loopback: the
//! CLI's side (the library) opens Dial streams, which the agent carries to
//! TCP servers of this test. Byte-exact data both ways, many at once,
//! half-close, reset, refusal, and a stalled stream stalling only itself
//! while another streams at full speed and edits keep landing.

mod common;

use common::*;
use devloop_agent::mux::{Incoming, Mux, Stream};
use devloop_agent::protocol::{Control, StreamHeader, TCP_WINDOW};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const T: Duration = Duration::from_secs(60);

fn dial(out: &Mux, port: u16) -> Stream {
    out.open(&StreamHeader::Dial { host: "127.0.0.1".into(), port }, TCP_WINDOW).unwrap()
}

/// A TCP server on loopback running `serve` for each connection.
async fn server<F, Fut>(serve: F) -> u16
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    // A deep accept queue: a thousand connections arrive at once.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let l = sock.listen(4096).unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            match l.accept().await {
                Ok((s, _)) => {
                    tokio::spawn(serve(s));
                }
                Err(e) => panic!("the test's server cannot accept: {e}"),
            }
        }
    });
    port
}

/// Echoes until EOF, then closes its side.
async fn echo(s: TcpStream) {
    let (mut r, mut w) = s.into_split();
    let _ = tokio::io::copy(&mut r, &mut w).await;
    let _ = w.shutdown().await;
}

/// Bytes that differ per stream and per position, so a chunk misplaced
/// between streams or within one shows.
fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Writes `data` and FIN, reads everything back until the peer's FIN.
async fn round_trip(s: Stream, data: Vec<u8>) -> Vec<u8> {
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut got = Vec::new();
    r.read_to_end(&mut got).await.unwrap();
    writer.await.unwrap();
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_streams_are_byte_exact_both_ways() {
    let a = start_agent(None);
    let (out, _rx) = session(&a).await;
    let port = server(echo).await;
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..1000u64 {
        // From a few bytes to a few windows, so some streams wait for WINDOW.
        let len = match i % 10 {
            0 => 3 * TCP_WINDOW as usize + 17,
            1..=3 => 40_000 + i as usize,
            _ => 1 + (i as usize * 37) % 4000,
        };
        let s = dial(&out, port);
        tasks.push(tokio::spawn(async move {
            let data = payload(i, len);
            let got = round_trip(s, data.clone()).await;
            assert!(got == data, "stream {i}: {} bytes back of {}, or different", got.len(), data.len());
            len
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += tokio::time::timeout(T, t).await.expect("streams finish in time").unwrap();
    }
    println!("1000 streams, {} MiB each way, in {:?}", total >> 20, t0.elapsed());
    assert!(!out.is_closed(), "the session lives on");
}

/// EOF travels each way on its own: the server half-closes first and still
/// reads; then the client half-closes and still reads the server's reply.
#[tokio::test]
async fn half_close_travels_in_each_direction() {
    let a = start_agent(None);
    let (out, _rx) = session(&a).await;
    let (got_tx, mut got_rx) = tokio::sync::mpsc::unbounded_channel();
    // Says hello, closes its sending side, then reads to the end and
    // reports what came.
    let first = server(move |s| {
        let got_tx = got_tx.clone();
        async move {
            let (mut r, mut w) = s.into_split();
            w.write_all(b"hello").await.unwrap();
            w.shutdown().await.unwrap();
            let mut all = Vec::new();
            r.read_to_end(&mut all).await.unwrap();
            let _ = got_tx.send(all);
        }
    })
    .await;
    let (mut r, mut w) = dial(&out, first).into_split();
    let mut hello = Vec::new();
    tokio::time::timeout(T, r.read_to_end(&mut hello)).await.unwrap().unwrap();
    assert_eq!(hello, b"hello", "the server's data, then its FIN as EOF");
    let data = payload(7, 300_000);
    w.write_all(&data).await.unwrap();
    w.shutdown().await.unwrap();
    let got = tokio::time::timeout(T, got_rx.recv()).await.unwrap().unwrap();
    assert!(got == data, "the client's data after the server's FIN: {} bytes", got.len());

    // The other way: the client's FIN first, the server answers after it.
    let second = server(|s| async move {
        let (mut r, mut w) = s.into_split();
        let mut all = Vec::new();
        r.read_to_end(&mut all).await.unwrap();
        w.write_all(format!("got {}", all.len()).as_bytes()).await.unwrap();
    })
    .await;
    let got = round_trip(dial(&out, second), payload(8, 500_000)).await;
    assert_eq!(String::from_utf8_lossy(&got), "got 500000");
}

/// A reset travels both ways: the client's reset ends the server's
/// connection; a connection the server aborts resets the stream, saying so.
#[tokio::test]
async fn a_reset_ends_the_stream_on_both_sides() {
    let a = start_agent(None);
    let (out, _rx) = session(&a).await;
    let (ended_tx, mut ended_rx) = tokio::sync::mpsc::unbounded_channel();
    let patient = server(move |mut s| {
        let ended_tx = ended_tx.clone();
        async move {
            let mut buf = vec![0u8; 1 << 16];
            let mut n = 0;
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(k) => n += k,
                }
            }
            let _ = ended_tx.send(n);
        }
    })
    .await;
    let mut s = dial(&out, patient);
    s.write_all(&payload(1, 10_000)).await.unwrap();
    // Let the data through before the reset (a reset discards what it
    // overtakes).
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.reset("the developer pressed stop");
    let n = tokio::time::timeout(T, ended_rx.recv()).await.expect("the server's connection ends").unwrap();
    assert_eq!(n, 10_000, "the data before the reset arrived, then the connection ended");

    // The server aborts (RST): the stream is reset with the reason.
    let abrupt = server(|s| async move {
        #[allow(deprecated)] // Blocking on drop is what this test wants: an abort.
        s.set_linger(Some(Duration::ZERO)).unwrap();
        drop(s);
    })
    .await;
    let mut s = dial(&out, abrupt);
    let mut buf = Vec::new();
    let r = tokio::time::timeout(T, s.read_to_end(&mut buf)).await.unwrap();
    // An abort right after accept reads as a failed connection or a
    // refused one, or as EOF (the kernel's choice); what must not happen
    // is a hang, or data.
    if let Err(e) = r {
        let e = e.to_string();
        assert!(e.contains("connection failed") || e.contains("reset by peer"), "{e}");
    }
    assert!(buf.is_empty());
    assert!(!out.is_closed(), "the session lives on");
}

/// A stream to nobody is refused with the reason, and the session lives
/// on: a port where nothing listens.
#[tokio::test]
async fn a_stream_opened_to_nobody_is_refused_and_the_session_lives_on() {
    let a = start_agent(None);
    let (out, _rx) = session(&a).await;
    // A port that was free a moment ago: nothing listens there.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port();
    let mut s = dial(&out, closed);
    let mut buf = Vec::new();
    let e = tokio::time::timeout(T, s.read_to_end(&mut buf)).await.unwrap().unwrap_err();
    assert!(e.to_string().contains(&format!("cannot connect to 127.0.0.1:{closed}")), "{e}");
    let port = server(echo).await;
    assert_eq!(round_trip(dial(&out, port), b"still here".to_vec()).await, b"still here");
}

/// A stream whose reader stopped (a server that never reads) stalls only
/// itself: another stream moves 64 MiB meanwhile, and edits keep landing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stream_stalls_only_itself() {
    let a = start_agent(None);
    let (out, mut rx) = session(&a).await;
    let never_reads = server(|s| async move {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        drop(s);
    })
    .await;
    let counts = server(|s| async move {
        let (mut r, mut w) = s.into_split();
        let mut buf = vec![0u8; 1 << 16];
        let mut n = 0u64;
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(k) => n += k as u64,
            }
        }
        let _ = w.write_all(n.to_string().as_bytes()).await;
    })
    .await;
    // Stalled: more than the window and both sockets' buffers can hold.
    let (_stalled_r, mut stalled) = dial(&out, never_reads).into_split();
    let stalled_sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sent = stalled_sent.clone();
    let stall = tokio::spawn(async move {
        let chunk = vec![1u8; 64 << 10];
        for _ in 0..(256 << 20) / chunk.len() {
            if stalled.write_all(&chunk).await.is_err() {
                break;
            }
            sent.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
    });
    // Let it fill and stall.
    let t0 = Instant::now();
    let mut last = u64::MAX;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = stalled_sent.load(std::sync::atomic::Ordering::Relaxed);
        if now == last {
            break;
        }
        last = now;
        assert!(t0.elapsed() < T, "the stalled stream never stalled");
    }
    // Another stream at full speed.
    let fast = dial(&out, counts);
    let moved = tokio::spawn(async move {
        let (mut r, mut w) = fast.into_split();
        let chunk = vec![2u8; 256 << 10];
        for _ in 0..256 {
            w.write_all(&chunk).await.unwrap();
        }
        w.shutdown().await.unwrap();
        let mut reply = String::new();
        r.read_to_string(&mut reply).await.unwrap();
        reply
    });
    // And edits, each acknowledged.
    for i in 0..20u64 {
        let mut ar = Vec::new();
        let mut b = tar::Builder::new(&mut ar);
        let body = format!("edit {i}");
        let mut h = tar::Header::new_gnu();
        h.set_size(body.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, "edited.txt", body.as_bytes()).unwrap();
        b.finish().unwrap();
        drop(b);
        let batch = Control::Batch { id: 100 + i, deletes: vec![], commands: vec![], restart: false };
        out.batch_with_archive(&batch, &ar).unwrap();
        let applied = tokio::time::timeout(T, async {
            loop {
                match rx.recv().await {
                    Some(Incoming::Control(Control::Applied { id, written, .. })) if id == 100 + i => break written,
                    Some(_) => continue,
                    None => panic!("session ended"),
                }
            }
        })
        .await
        .expect("an edit lands while a stream is stalled");
        assert_eq!(applied, 1);
        assert_eq!(std::fs::read_to_string(a.root.join("edited.txt")).unwrap(), body);
    }
    let reply = tokio::time::timeout(T, moved).await.expect("the fast stream finishes").unwrap();
    assert_eq!(reply, (64u64 << 20).to_string());
    let stuck_at = stalled_sent.load(std::sync::atomic::Ordering::Relaxed);
    assert!(stuck_at < 256 << 20, "the stalled stream was stalled throughout ({stuck_at} bytes in)");
    stall.abort();
}
