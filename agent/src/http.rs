//! HTTP/1.1, as far as a personal intercept needs it: read a request's or
//! a response's head, and know where its body ends (RFC 9112 section 6),
//! so that each request of a keep-alive connection can go its own way and
//! its answer come back in order. Bodies are copied as they are, never
//! decoded.

use std::io;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest head accepted.
pub const MAX_HEAD: usize = 64 << 10;
/// Longest first line before the bytes are taken for something else.
const MAX_FIRST_LINE: usize = 8 << 10;

/// Why a head could not be read.
#[derive(Debug)]
pub enum HeadError {
    /// The bytes are not an HTTP/1.x message.
    NotHttp,
    TooLarge,
    /// The connection ended inside a head.
    Truncated,
    Io(io::Error),
}

impl From<io::Error> for HeadError {
    fn from(e: io::Error) -> HeadError {
        HeadError::Io(e)
    }
}

/// A reader with a buffer in front: what was read past a head stays for
/// the body, or for the next message.
pub struct Buffered<R> {
    inner: R,
    buf: Vec<u8>,
    pos: usize,
}

impl<R: AsyncRead + Unpin> Buffered<R> {
    pub fn new(inner: R) -> Buffered<R> {
        Buffered { inner, buf: Vec::new(), pos: 0 }
    }

    fn pending(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    /// Reads more into the buffer; false at end of stream.
    async fn fill(&mut self) -> io::Result<bool> {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        let mut chunk = [0u8; 16 << 10];
        let n = self.inner.read(&mut chunk).await?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n > 0)
    }

    /// The next message's head, up to and including its blank line; None
    /// when the stream ends cleanly before any byte of it. A request head
    /// (`request`) must start like one, or it is [`HeadError::NotHttp`] as
    /// soon as that is clear (a TLS hello, an HTTP/2 preface, garbage),
    /// without waiting for more.
    pub async fn read_head(&mut self, request: bool) -> Result<Option<Vec<u8>>, HeadError> {
        loop {
            let p = self.pending();
            if request {
                check_request_start(p)?;
            }
            if let Some(i) = p.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = p[..i + 4].to_vec();
                self.pos += i + 4;
                return Ok(Some(head));
            }
            if p.len() > MAX_HEAD {
                return Err(HeadError::TooLarge);
            }
            if !self.fill().await? {
                return if self.pending().is_empty() { Ok(None) } else { Err(HeadError::Truncated) };
            }
        }
    }

    /// Copies exactly `n` bytes to `w`.
    pub async fn copy_exact<W: AsyncWrite + Unpin>(&mut self, mut n: u64, w: &mut W) -> io::Result<()> {
        while n > 0 {
            if self.pending().is_empty() && !self.fill().await? {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let take = self.pending().len().min(n as usize);
            w.write_all(&self.pending()[..take]).await?;
            self.pos += take;
            n -= take as u64;
        }
        Ok(())
    }

    /// Copies one line (up to and including LF) to `w`, and returns it.
    async fn copy_line<W: AsyncWrite + Unpin>(&mut self, w: &mut W) -> io::Result<Vec<u8>> {
        loop {
            if let Some(i) = self.pending().iter().position(|b| *b == b'\n') {
                let line = self.pending()[..=i].to_vec();
                w.write_all(&line).await?;
                self.pos += i + 1;
                return Ok(line);
            }
            if self.pending().len() > MAX_FIRST_LINE {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "a chunk line is too long"));
            }
            if !self.fill().await? {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// Copies a chunked body, chunks, last chunk and trailers, as it is.
    pub async fn copy_chunked<W: AsyncWrite + Unpin>(&mut self, w: &mut W) -> io::Result<()> {
        loop {
            let line = self.copy_line(w).await?;
            let text = String::from_utf8_lossy(&line);
            let size = text.split(';').next().unwrap_or("").trim();
            let size = u64::from_str_radix(size, 16)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("bad chunk size {size:?}")))?;
            if size == 0 {
                // Trailers, up to the empty line.
                loop {
                    let l = self.copy_line(w).await?;
                    if l == b"\r\n" || l == b"\n" {
                        return Ok(());
                    }
                }
            }
            self.copy_exact(size, w).await?;
            let crlf = self.copy_line(w).await?;
            if crlf != b"\r\n" && crlf != b"\n" {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "chunk data longer than its size"));
            }
        }
    }

    /// Copies the rest of the stream.
    pub async fn copy_to_end<W: AsyncWrite + Unpin>(&mut self, w: &mut W) -> io::Result<()> {
        loop {
            if !self.pending().is_empty() {
                w.write_all(self.pending()).await?;
                self.pos = self.buf.len();
            }
            if !self.fill().await? {
                return Ok(());
            }
        }
    }

    /// Copies a body of the given framing.
    pub async fn copy_body<W: AsyncWrite + Unpin>(&mut self, body: Body, w: &mut W) -> io::Result<()> {
        match body {
            Body::None => Ok(()),
            Body::Length(n) => self.copy_exact(n, w).await,
            Body::Chunked => self.copy_chunked(w).await,
            Body::UntilClose => self.copy_to_end(w).await,
        }
    }

    /// The inner reader and what was read and not yet taken.
    pub fn into_parts(self) -> (R, Vec<u8>) {
        let rest = self.buf[self.pos..].to_vec();
        (self.inner, rest)
    }
}

/// Fails as soon as the start of `p` cannot be an HTTP/1.x request line.
fn check_request_start(p: &[u8]) -> Result<(), HeadError> {
    let Some(&first) = p.first() else { return Ok(()) };
    if !first.is_ascii_uppercase() {
        return Err(HeadError::NotHttp);
    }
    match p.iter().position(|b| *b == b'\n') {
        Some(i) => {
            let line = String::from_utf8_lossy(&p[..i]);
            let parts: Vec<&str> = line.trim_end_matches('\r').split(' ').collect();
            let ok = parts.len() == 3
                && parts[0].bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
                && parts[2] == "HTTP/1.1";
            if ok {
                Ok(())
            } else {
                Err(HeadError::NotHttp)
            }
        }
        None if p.len() > MAX_FIRST_LINE => Err(HeadError::NotHttp),
        None => Ok(()),
    }
}

/// A parsed head: the first line's parts, and the headers in order.
#[derive(Debug, Clone)]
pub struct Head {
    pub first: Vec<String>,
    pub headers: Vec<(String, String)>,
}

impl Head {
    pub fn parse(raw: &[u8]) -> Option<Head> {
        let text = std::str::from_utf8(raw).ok()?;
        let mut lines = text.split("\r\n");
        let first: Vec<String> = lines.next()?.splitn(3, ' ').map(String::from).collect();
        let mut headers = Vec::new();
        for l in lines {
            if l.is_empty() {
                continue;
            }
            let (k, v) = l.split_once(':')?;
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
        Some(Head { first, headers })
    }

    /// The first value of a header (name without case).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Whether a comma-separated header lists `token` (without case).
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .any(|(_, v)| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    }

    pub fn method(&self) -> &str {
        self.first.first().map_or("", String::as_str)
    }

    /// A response's status code.
    pub fn status(&self) -> u16 {
        self.first.get(1).and_then(|s| s.parse().ok()).unwrap_or(0)
    }

    /// Whether the message ends the connection after it.
    pub fn closes(&self) -> bool {
        self.has_token("connection", "close")
    }

    /// Whether this request asks to switch protocols (a WebSocket, say).
    pub fn upgrades(&self) -> bool {
        self.get("upgrade").is_some() && self.has_token("connection", "upgrade")
    }
}

/// Where a body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    None,
    Length(u64),
    Chunked,
    UntilClose,
}

/// A request's body (RFC 9112 6.3): chunked if the last coding is; else
/// Content-Length; else none. Anything else cannot be framed.
pub fn request_body(h: &Head) -> Result<Body, String> {
    if let Some(te) = h.get("transfer-encoding") {
        return match te.rsplit(',').next().map(str::trim) {
            Some(c) if c.eq_ignore_ascii_case("chunked") => Ok(Body::Chunked),
            _ => Err(format!("a request with Transfer-Encoding `{te}` cannot be framed")),
        };
    }
    match h.get("content-length") {
        Some(n) => n.trim().parse().map(Body::Length).map_err(|_| format!("bad Content-Length `{n}`")),
        None => Ok(Body::None),
    }
}

/// A response's body, given the request's method: none for HEAD, 1xx,
/// 204 and 304; chunked; Content-Length; else until the connection closes.
pub fn response_body(method: &str, h: &Head) -> Body {
    let status = h.status();
    if method.eq_ignore_ascii_case("HEAD") || (100..200).contains(&status) || status == 204 || status == 304 {
        return Body::None;
    }
    if h.get("transfer-encoding")
        .is_some_and(|te| te.rsplit(',').next().is_some_and(|c| c.trim().eq_ignore_ascii_case("chunked")))
    {
        return Body::Chunked;
    }
    match h.get("content-length").and_then(|n| n.trim().parse().ok()) {
        Some(n) => Body::Length(n),
        None => Body::UntilClose,
    }
}

/// A short plain-text error response that closes the connection.
pub fn error_response(status: u16, reason: &str, body: &str) -> Vec<u8> {
    let body = format!("{body}\n");
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn heads(input: &[u8], request: bool) -> Vec<Result<Option<Vec<u8>>, String>> {
        let mut b = Buffered::new(input);
        let mut out = Vec::new();
        loop {
            let r = b.read_head(request).await.map_err(|e| format!("{e:?}"));
            let end = !matches!(r, Ok(Some(_)));
            out.push(r);
            if end {
                return out;
            }
        }
    }

    #[tokio::test]
    async fn requests_are_told_from_other_protocols_at_once() {
        // TLS, HTTP/2's preface, HTTP/1.0, lowercase garbage: not ours.
        for bad in [
            &b"\x16\x03\x01\x02\x00"[..],
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"GET / HTTP/1.0\r\n\r\n",
            b"hello world\n",
        ] {
            let r = heads(bad, true).await;
            assert!(matches!(&r[0], Err(e) if e == "NotHttp"), "{bad:?}: {r:?}");
        }
        let r = heads(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nPOST /b HTTP/1.1\r\n\r\n", true).await;
        assert_eq!(r.len(), 3);
        assert_eq!(r[2], Ok(None), "a clean end between messages");
        let r = heads(b"GET /a HTTP/1.1\r\nHost", true).await;
        assert!(matches!(&r[0], Err(e) if e == "Truncated"), "{r:?}");
    }

    #[tokio::test]
    async fn bodies_are_copied_exactly_to_their_end() {
        let input = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nTrailer: x\r\n\r\nNEXT";
        let mut b = Buffered::new(&input[..]);
        let mut out = Vec::new();
        b.copy_chunked(&mut out).await.unwrap();
        assert_eq!(out, &input[..input.len() - 4]);
        let (_, rest) = b.into_parts();
        assert_eq!(rest, b"NEXT", "what follows the body stays for the next message");
        let mut b = Buffered::new(&b"0123456789"[..]);
        let mut out = Vec::new();
        b.copy_exact(4, &mut out).await.unwrap();
        assert_eq!(out, b"0123");
        assert!(Buffered::new(&b"12"[..]).copy_exact(4, &mut Vec::new()).await.is_err());
    }

    #[test]
    fn framing_follows_the_rules() {
        let h = |raw: &str| Head::parse(raw.as_bytes()).unwrap();
        assert_eq!(request_body(&h("POST / HTTP/1.1\r\nContent-Length: 12\r\n\r\n")), Ok(Body::Length(12)));
        assert_eq!(request_body(&h("POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n")), Ok(Body::Chunked));
        assert!(request_body(&h("POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n")).is_err());
        assert_eq!(request_body(&h("GET / HTTP/1.1\r\n\r\n")), Ok(Body::None));
        let r = |raw: &str| h(raw);
        assert_eq!(response_body("HEAD", &r("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")), Body::None);
        assert_eq!(response_body("GET", &r("HTTP/1.1 304 Not Modified\r\n\r\n")), Body::None);
        assert_eq!(response_body("GET", &r("HTTP/1.1 200 OK\r\n\r\n")), Body::UntilClose);
        assert_eq!(response_body("GET", &r("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")), Body::Chunked);
        let up = h("GET /ws HTTP/1.1\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n");
        assert!(up.upgrades() && !up.closes());
    }
}
