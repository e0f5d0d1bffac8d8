//! Opening a session: an HTTP/1.1 upgrade that carries the session token
//! (`Authorization: Bearer`) and the protocol version
//! (`Sec-WebSocket-Protocol: devloop.vN`), so a wrong token or version is
//! refused before any frame, with an HTTP status and a sentence saying why.
//!
//! The request has the shape of a WebSocket upgrade: an agent of any
//! earlier version (which spoke WebSocket) then reaches its own version
//! check and answers 426 naming both versions, as this one does. After the
//! `101`, both sides speak the framing in [`crate::protocol`], not
//! WebSocket.

use crate::protocol::{self, AGENT_VERSION_HEADER, PROTOCOL_VERSION};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest request or response head either side reads.
const MAX_HEAD: usize = 16 << 10;

/// Why the CLI could not open a session with an agent.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("the agent refused the session token (HTTP 401): the agent was started for another session; restart it, or check that {env} reaches it", env = protocol::TOKEN_ENV)]
    BadToken,
    #[error("protocol mismatch: {0}. Install the same version of devloop and devloop-agent")]
    Version(String),
    #[error("the agent refused the connection (HTTP {status}): {message}")]
    Rejected { status: u16, message: String },
    #[error("the handshake with the agent failed: {0}")]
    Handshake(String),
    #[error("the connection to the agent failed during the handshake")]
    Io(#[source] std::io::Error),
}

/// Why the agent refused a session.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error("refused ({status}): {message}")]
    Refused { status: u16, message: String },
    #[error("bad request: {0}")]
    Bad(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A request or response head: the first line and the headers.
struct Head {
    first: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn get(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Reads a head up to the blank line; returns it and the bytes read past
/// it (the first frames, which the session must not lose).
async fn read_head<S: AsyncRead + Unpin>(io: &mut S) -> std::io::Result<(Head, Vec<u8>)> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > MAX_HEAD {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "the head is larger than 16 KiB"));
        }
        let n = io.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the peer closed during the handshake"));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let rest = buf[end + 4..].to_vec();
    let text = String::from_utf8_lossy(&buf[..end]);
    let mut lines = text.split("\r\n");
    let first = lines.next().unwrap_or_default().to_string();
    let headers =
        lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_string(), v.trim().to_string())).collect();
    Ok((Head { first, headers }, rest))
}

/// Opens a session as the client (the CLI side). Returns the stream, the
/// bytes already read past the answer, and the agent's version.
pub async fn connect<S>(mut io: S, token: &str) -> Result<(S, Vec<u8>, String), ConnectError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if token.bytes().any(|b| b.is_ascii_control()) {
        return Err(ConnectError::BadToken);
    }
    let req = format!(
        "GET / HTTP/1.1\r\nHost: devloop-agent\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: ZGV2bG9vcC1oYW5kc2hha2U=\r\n\
         Sec-WebSocket-Protocol: {}\r\nAuthorization: Bearer {token}\r\n\r\n",
        protocol::subprotocol(PROTOCOL_VERSION)
    );
    io.write_all(req.as_bytes()).await.map_err(ConnectError::Io)?;
    io.flush().await.map_err(ConnectError::Io)?;
    let (head, rest) = read_head(&mut io).await.map_err(ConnectError::Io)?;
    let status: u16 = head
        .first
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ConnectError::Handshake(format!("not an HTTP answer: {:?}", head.first)))?;
    if status == 101 {
        let theirs = head.get("sec-websocket-protocol").and_then(protocol::parse_subprotocol);
        if head.get("upgrade").is_some_and(|u| u.eq_ignore_ascii_case("websocket")) || theirs != Some(PROTOCOL_VERSION)
        {
            return Err(ConnectError::Version(format!(
                "the agent accepted, but speaks {} (this devloop speaks v{PROTOCOL_VERSION})",
                theirs.map_or("WebSocket".to_string(), |v| format!("v{v}"))
            )));
        }
        let version = head.get(AGENT_VERSION_HEADER).unwrap_or("unknown").to_string();
        return Ok((io, rest, version));
    }
    // The body says why: read what there is (the agent closes after it).
    let mut body = rest;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
        let mut chunk = [0u8; 1024];
        while body.len() < MAX_HEAD {
            match io.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => body.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    let message = String::from_utf8_lossy(&body).trim().to_string();
    Err(match status {
        401 => ConnectError::BadToken,
        426 => ConnectError::Version(message),
        _ => ConnectError::Rejected { status, message },
    })
}

/// Accepts a session as the agent. Refuses, with an HTTP answer the
/// client shows to its user, a wrong token or protocol version. Returns
/// the stream and the bytes the client sent past its request.
pub async fn accept<S>(mut io: S, token: &str, agent_version: &str) -> Result<(S, Vec<u8>), AcceptError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (head, rest) = match read_head(&mut io).await {
        Ok(h) => h,
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            return refuse(io, 400, &format!("bad request: {e}")).await;
        }
        Err(e) => return Err(e.into()),
    };
    if !head.first.starts_with("GET ") {
        return refuse(io, 400, "expected a GET upgrade request").await;
    }
    let presented = head.get("authorization").and_then(|v| v.strip_prefix("Bearer ")).unwrap_or("");
    if !constant_time_eq(presented.as_bytes(), token.as_bytes()) {
        return refuse(io, 401, "missing or wrong session token").await;
    }
    let offered: Vec<u32> =
        head.get("sec-websocket-protocol").unwrap_or("").split(',').filter_map(protocol::parse_subprotocol).collect();
    if !offered.contains(&PROTOCOL_VERSION) {
        let theirs = match offered.as_slice() {
            [] => "no devloop protocol".to_string(),
            v => v.iter().map(|n| format!("v{n}")).collect::<Vec<_>>().join(", "),
        };
        let msg = format!(
            "this agent ({agent_version}) speaks devloop protocol v{PROTOCOL_VERSION}, the client speaks {theirs}"
        );
        return refuse(io, 426, &msg).await;
    }
    let resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: devloop\r\n\
         Sec-WebSocket-Protocol: {}\r\n{AGENT_VERSION_HEADER}: {agent_version}\r\n\r\n",
        protocol::subprotocol(PROTOCOL_VERSION)
    );
    io.write_all(resp.as_bytes()).await?;
    io.flush().await?;
    Ok((io, rest))
}

async fn refuse<S: AsyncWrite + Unpin, T>(mut io: S, status: u16, message: &str) -> Result<T, AcceptError> {
    let reason = match status {
        401 => "Unauthorized",
        426 => "Upgrade Required",
        _ => "Bad Request",
    };
    let body = format!("{message}\n");
    let resp = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = io.write_all(resp.as_bytes()).await;
    let _ = io.shutdown().await;
    Err(AcceptError::Refused { status, message: message.to_string() })
}

/// Compares without leaking, through timing, how much of the token matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both sides over an in-memory pipe: what the client sends right after
    /// the answer (its first frames) reaches the server, and the other way.
    #[tokio::test]
    async fn a_session_opens_and_nothing_past_the_heads_is_lost() {
        let (c, s) = tokio::io::duplex(64 << 10);
        let server = tokio::spawn(async move {
            let (mut io, rest) = accept(s, "tok", "9.9.9").await.unwrap();
            let mut got = rest;
            while got.len() < 5 {
                let mut b = [0u8; 16];
                let n = io.read(&mut b).await.unwrap();
                got.extend_from_slice(&b[..n]);
            }
            io.write_all(b"world").await.unwrap();
            got
        });
        let (mut io, rest, v) = connect(c, "tok").await.unwrap();
        assert_eq!(v, "9.9.9");
        io.write_all(b"hello").await.unwrap();
        assert_eq!(server.await.unwrap(), b"hello");
        let mut got = rest;
        while got.len() < 5 {
            let mut b = [0u8; 16];
            let n = io.read(&mut b).await.unwrap();
            got.extend_from_slice(&b[..n]);
        }
        assert_eq!(got, b"world");
    }

    #[tokio::test]
    async fn a_wrong_token_and_a_wrong_version_are_refused_with_a_reason() {
        let (c, s) = tokio::io::duplex(64 << 10);
        tokio::spawn(async move { accept(s, "right", "1").await });
        assert!(matches!(connect(c, "wrong").await, Err(ConnectError::BadToken)));

        let (mut c, s) = tokio::io::duplex(64 << 10);
        tokio::spawn(async move { accept(s, "tok", "1.0").await });
        c.write_all(b"GET / HTTP/1.1\r\nAuthorization: Bearer tok\r\nSec-WebSocket-Protocol: devloop.v2\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 426"), "{answer}");
        assert!(answer.contains(&format!("v{PROTOCOL_VERSION}")) && answer.contains("v2"), "{answer}");
    }
}
