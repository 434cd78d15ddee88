//! HTTP proxy front end (not in upstream paqet; issue 3 asks for it).
//!
//! - `CONNECT host:port HTTP/1.x` → a stream to `host:port`, `HTTP/1.1 200 Connection established`, then
//!   raw bytes both ways.
//! - Absolute-URI requests (`GET http://host[:port]/path HTTP/1.1`) → a stream to `host:port` (default 80),
//!   the request line rewritten to origin form, `Proxy-*`, `Connection` and `Keep-Alive` headers dropped,
//!   `Connection: close` added, every other header line forwarded verbatim, then raw bytes both ways (the
//!   body and the response pass through untouched). One origin request per client connection.
//! - Optional `Proxy-Authorization: Basic` check (407 otherwise) when a username or password is set.
//! - The request head is bounded ([`MAX_HEAD`], 431 beyond) and must arrive within [`HEAD_TIMEOUT`];
//!   malformed requests get 400, unreachable targets 502.
use std::io;
use std::rc::Rc;
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info};

use super::dial::{relay, target_text, Dialer};

/// Largest accepted request head (request line + headers).
pub const MAX_HEAD: usize = 64 * 1024;
/// Deadline for receiving the request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// Bounds of the discard read after an error reply.
const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1 << 20;

/// Configuration of one HTTP proxy listener. Authentication is required when either field is non-empty.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HttpConfig {
    pub username: String,
    pub password: String,
}

impl HttpConfig {
    fn auth_required(&self) -> bool {
        !self.username.is_empty() || !self.password.is_empty()
    }
}

/// Why an HTTP proxy connection ended early.
#[derive(Debug, Error)]
pub enum HttpError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("request head not received within {0:?}")]
    Timeout(Duration),
    #[error("connection closed before the end of the request head ({0} bytes received)")]
    Truncated(usize),
    #[error("request head exceeds {0} bytes")]
    HeadTooLarge(usize),
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error(
        "unsupported request target {0:?}: only http:// absolute URIs and CONNECT are proxied"
    )]
    UnsupportedTarget(String),
    #[error("proxy authentication failed or missing")]
    AuthRequired,
    #[error("opening {target}: {source}")]
    Dial { target: String, source: io::Error },
}

impl HttpError {
    /// The status line to answer with, if any.
    fn status(&self) -> Option<(u16, &'static str)> {
        match self {
            HttpError::HeadTooLarge(_) => Some((431, "Request Header Fields Too Large")),
            HttpError::Malformed(_) | HttpError::UnsupportedTarget(_) => Some((400, "Bad Request")),
            HttpError::AuthRequired => Some((407, "Proxy Authentication Required")),
            HttpError::Dial { .. } => Some((502, "Bad Gateway")),
            HttpError::Timeout(_) => Some((408, "Request Timeout")),
            HttpError::Io(_) | HttpError::Truncated(_) => None,
        }
    }
}

/// One header line of a request head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderLine<'a> {
    pub name: &'a str,
    pub value: &'a str,
    /// The whole line as received, without its line ending.
    pub raw: &'a str,
}

/// A parsed request head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestHead<'a> {
    pub method: &'a str,
    pub target: &'a str,
    pub version: &'a str,
    pub headers: Vec<HeaderLine<'a>>,
}

impl RequestHead<'_> {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    }
}

/// Index just past the blank line ending the head (`\r\n\r\n` or `\n\n`), if present.
pub fn find_head_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while let Some(off) = buf[i..].iter().position(|&b| b == b'\n') {
        let nl = i + off;
        match buf.get(nl + 1) {
            Some(b'\n') => return Some(nl + 2),
            Some(b'\r') if buf.get(nl + 2) == Some(&b'\n') => return Some(nl + 3),
            _ => {}
        }
        i = nl + 1;
    }
    None
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b))
}

/// Parses a complete request head (as delimited by [`find_head_end`]).
pub fn parse_head(head: &[u8]) -> Result<RequestHead<'_>, HttpError> {
    let text = std::str::from_utf8(head)
        .map_err(|e| HttpError::Malformed(format!("head is not UTF-8: {e}")))?;
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let line = lines.next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::Malformed(format!("request line {line:?}")));
    };
    if !is_token(method) || target.is_empty() || !version.starts_with("HTTP/1.") {
        return Err(HttpError::Malformed(format!("request line {line:?}")));
    }
    let mut headers = Vec::new();
    for raw in lines {
        if raw.is_empty() {
            break;
        }
        if raw.starts_with([' ', '\t']) {
            return Err(HttpError::Malformed(format!("folded header line {raw:?}")));
        }
        let (name, value) = raw
            .split_once(':')
            .ok_or_else(|| HttpError::Malformed(format!("header line {raw:?} has no ':'")))?;
        if !is_token(name) {
            return Err(HttpError::Malformed(format!("header name {name:?}")));
        }
        headers.push(HeaderLine {
            name,
            value: value.trim_matches([' ', '\t']),
            raw,
        });
    }
    Ok(RequestHead {
        method,
        target,
        version,
        headers,
    })
}

/// Splits an authority `host[:port]` / `[v6][:port]` into (host without brackets, port).
pub fn parse_authority(auth: &str, default_port: Option<u16>) -> Result<(String, u16), HttpError> {
    let bad = || HttpError::Malformed(format!("authority {auth:?}"));
    let (host, port) = if let Some(rest) = auth.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or_else(bad)?;
        match after {
            "" => (h, None),
            p => (h, Some(p.strip_prefix(':').ok_or_else(bad)?)),
        }
    } else {
        match auth.rsplit_once(':') {
            Some((h, _)) if h.contains(':') => return Err(bad()), // unbracketed IPv6
            Some((h, p)) => (h, Some(p)),
            None => (auth, None),
        }
    };
    let port = match port {
        Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad)?,
        None => default_port.ok_or_else(bad)?,
    };
    if host.is_empty()
        || host.len() > 253
        || host.bytes().any(|b| b.is_ascii_whitespace() || b == b'/')
    {
        return Err(bad());
    }
    Ok((host.to_owned(), port))
}

/// Splits `http://authority/path?query` into (host, port, origin-form path). Other schemes are refused.
pub fn parse_absolute_uri(uri: &str) -> Result<(String, u16, String), HttpError> {
    let rest = match uri.get(..7) {
        Some(s) if s.eq_ignore_ascii_case("http://") => &uri[7..],
        _ => return Err(HttpError::UnsupportedTarget(uri.to_owned())),
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = rest[..end]
        .rsplit_once('@')
        .map_or(&rest[..end], |(_, a)| a);
    let (host, port) = parse_authority(authority, Some(80))?;
    let mut path = rest[end..].split('#').next().unwrap_or_default().to_owned();
    if !path.starts_with('/') {
        path.insert(0, '/');
    }
    Ok((host, port, path))
}

/// Standard base64 with padding.
fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// True when `value` (a `Proxy-Authorization` header) carries Basic credentials `user:pass`.
pub fn basic_auth_ok(value: Option<&str>, user: &str, pass: &str) -> bool {
    let Some(v) = value else { return false };
    let Some((scheme, token)) = v.trim().split_once(' ') else {
        return false;
    };
    scheme.eq_ignore_ascii_case("basic")
        && token.trim() == base64(format!("{user}:{pass}").as_bytes())
}

/// Builds the origin-form request head sent to the target.
pub fn origin_request(head: &RequestHead<'_>, host: &str, port: u16, path: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(format!("{} {} {}\r\n", head.method, path, head.version).as_bytes());
    let mut has_host = false;
    for h in &head.headers {
        let n = h.name;
        let hop = n.len() >= 6 && n[..6].eq_ignore_ascii_case("proxy-")
            || n.eq_ignore_ascii_case("connection")
            || n.eq_ignore_ascii_case("keep-alive");
        if hop {
            continue;
        }
        has_host |= n.eq_ignore_ascii_case("host");
        out.extend_from_slice(h.raw.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !has_host {
        let t = target_text(host, port);
        let authority = if port == 80 {
            t.rsplit_once(':').map_or(t.as_str(), |(h, _)| h)
        } else {
            &t
        };
        out.extend_from_slice(format!("Host: {authority}\r\n").as_bytes());
    }
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    out
}

/// Reads until the end of the request head; returns the buffer and the head's length (the rest is body).
pub async fn read_head<R: AsyncRead + Unpin>(r: &mut R) -> Result<(Vec<u8>, usize), HttpError> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        let n = r.read(&mut chunk).await?;
        if n == 0 {
            return Err(HttpError::Truncated(buf.len()));
        }
        let scan_from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = find_head_end(&buf[scan_from..]) {
            let end = scan_from + end;
            if end > MAX_HEAD {
                return Err(HttpError::HeadTooLarge(MAX_HEAD));
            }
            return Ok((buf, end));
        }
        if buf.len() > MAX_HEAD {
            return Err(HttpError::HeadTooLarge(MAX_HEAD));
        }
    }
}

async fn respond<W: AsyncWrite + Unpin>(
    w: &mut W,
    code: u16,
    reason: &str,
    extra: &str,
    msg: &str,
) -> io::Result<()> {
    let body = format!("{msg}\n");
    let resp = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{body}",
        body.len()
    );
    w.write_all(resp.as_bytes()).await?;
    w.shutdown().await
}

/// After an error reply: reads and discards what the client is still sending (bounded in time and bytes),
/// so that closing with unread data does not reset the connection before the client has read the reply.
async fn linger(conn: &mut TcpStream) {
    let mut sink = [0u8; 8192];
    let mut left = LINGER_BYTES;
    let _ = tokio::time::timeout(LINGER_TIME, async {
        while left > 0 {
            match conn.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

/// Accepts connections until the task is dropped; each one is served on its own local task.
pub async fn serve<D: Dialer + 'static>(listener: TcpListener, cfg: HttpConfig, dialer: Rc<D>) {
    let cfg = Rc::new(cfg);
    info!(listen = ?listener.local_addr().ok(), auth = cfg.auth_required(), "http proxy ready");
    super::accept_loop(&listener, "http proxy", |conn, from| {
        let cfg = cfg.clone();
        let dialer = dialer.clone();
        async move {
            if let Err(e) = handle_conn(conn, &cfg, &*dialer).await {
                debug!(%from, error = %e, "http proxy connection ended");
            }
        }
    })
    .await
}

/// Serves one proxy connection; error replies (400/407/408/431/502) are written before returning the error.
pub async fn handle_conn<D: Dialer>(
    mut conn: TcpStream,
    cfg: &HttpConfig,
    dialer: &D,
) -> Result<(), HttpError> {
    let result = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut conn)).await {
        Ok(r) => r,
        Err(_) => Err(HttpError::Timeout(HEAD_TIMEOUT)),
    };
    let result = match result {
        Ok((buf, end)) => proxy(&mut conn, &buf, end, cfg, dialer).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(Some(stream)) => {
            relay(conn, stream).await;
            Ok(())
        }
        Ok(None) => Ok(()),
        Err(e) => {
            if let Some((code, reason)) = e.status() {
                let extra = if code == 407 {
                    "Proxy-Authenticate: Basic realm=\"paqet-dp\"\r\n"
                } else {
                    ""
                };
                if respond(&mut conn, code, reason, extra, &e.to_string())
                    .await
                    .is_ok()
                {
                    linger(&mut conn).await;
                }
            }
            Err(e)
        }
    }
}

/// Checks the request, opens the target and sends what must precede the raw relay; returns the stream.
async fn proxy<D: Dialer>(
    conn: &mut TcpStream,
    buf: &[u8],
    end: usize,
    cfg: &HttpConfig,
    dialer: &D,
) -> Result<Option<D::Stream>, HttpError> {
    let head = parse_head(&buf[..end])?;
    if cfg.auth_required()
        && !basic_auth_ok(
            head.header("proxy-authorization"),
            &cfg.username,
            &cfg.password,
        )
    {
        return Err(HttpError::AuthRequired);
    }
    let rest = &buf[end..];
    let peer = conn.peer_addr().ok();
    if head.method.eq_ignore_ascii_case("CONNECT") {
        let (host, port) = parse_authority(head.target, None)?;
        let target = target_text(&host, port);
        let mut stream = dialer
            .open_tcp(&host, port)
            .await
            .map_err(|source| HttpError::Dial {
                target: target.clone(),
                source,
            })?;
        conn.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .await?;
        if !rest.is_empty() {
            stream.write_all(rest).await?;
        }
        info!(from = ?peer, %target, "http proxy: CONNECT");
        Ok(Some(stream))
    } else {
        let (host, port, path) = parse_absolute_uri(head.target)?;
        let target = target_text(&host, port);
        let mut stream = dialer
            .open_tcp(&host, port)
            .await
            .map_err(|source| HttpError::Dial {
                target: target.clone(),
                source,
            })?;
        let req = origin_request(&head, &host, port, &path);
        stream.write_all(&req).await?;
        if !rest.is_empty() {
            stream.write_all(rest).await?;
        }
        info!(from = ?peer, %target, method = head.method, "http proxy: request");
        Ok(Some(stream))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_end_is_found_for_crlf_and_lf() {
        assert_eq!(
            find_head_end(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody"),
            Some(27)
        );
        assert_eq!(find_head_end(b"GET / HTTP/1.1\nHost: a\n\nbody"), Some(24));
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\nHost: a\r\n"), None);
        assert_eq!(find_head_end(b""), None);
        assert_eq!(find_head_end(b"\n"), None);
    }

    #[test]
    fn heads_parse_and_bad_ones_fail() {
        let h = parse_head(
            b"GET http://a/ HTTP/1.1\r\nHost: a\r\nProxy-Connection:  keep-alive \r\n\r\n",
        )
        .unwrap();
        assert_eq!(
            (h.method, h.target, h.version),
            ("GET", "http://a/", "HTTP/1.1")
        );
        assert_eq!(h.header("proxy-connection"), Some("keep-alive"));
        assert_eq!(h.headers[1].raw, "Proxy-Connection:  keep-alive ");
        for bad in [
            &b"GET http://a/\r\n\r\n"[..],
            b"GET  http://a/ HTTP/1.1\r\n\r\n",
            b"GET http://a/ SPDY/3\r\n\r\n",
            b"GET http://a/ HTTP/1.1\r\nNoColon\r\n\r\n",
            b"GET http://a/ HTTP/1.1\r\nA: b\r\n c\r\n\r\n",
            b"GET http://a/ HTTP/1.1\r\nBad Name: x\r\n\r\n",
            b"\xff\xfe HTTP/1.1\r\n\r\n",
            b"\r\n\r\n",
        ] {
            assert!(
                matches!(parse_head(bad), Err(HttpError::Malformed(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn authorities_and_uris_split() {
        assert_eq!(
            parse_authority("example.com:443", None).unwrap(),
            ("example.com".into(), 443)
        );
        assert_eq!(
            parse_authority("[2001:db8::1]:8443", None).unwrap(),
            ("2001:db8::1".into(), 8443)
        );
        assert_eq!(
            parse_authority("[::1]", Some(80)).unwrap(),
            ("::1".into(), 80)
        );
        assert!(parse_authority("example.com", None).is_err());
        assert!(parse_authority("example.com:0", None).is_err());
        assert!(parse_authority("2001:db8::1", Some(80)).is_err());
        assert!(parse_authority(":80", None).is_err());
        assert!(parse_authority("[::1", None).is_err());
        assert_eq!(
            parse_absolute_uri("http://a.b/x?y=1").unwrap(),
            ("a.b".into(), 80, "/x?y=1".into())
        );
        assert_eq!(
            parse_absolute_uri("HTTP://10.0.0.1:8080").unwrap(),
            ("10.0.0.1".into(), 8080, "/".into())
        );
        assert_eq!(
            parse_absolute_uri("http://u:p@[::1]:81?q").unwrap(),
            ("::1".into(), 81, "/?q".into())
        );
        assert!(matches!(
            parse_absolute_uri("https://a/"),
            Err(HttpError::UnsupportedTarget(_))
        ));
        assert!(matches!(
            parse_absolute_uri("/relative"),
            Err(HttpError::UnsupportedTarget(_))
        ));
        assert!(parse_absolute_uri("http:///x").is_err());
    }

    #[test]
    fn basic_auth_checks_credentials() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(
            base64(b"Aladdin:open sesame"),
            "QWxhZGRpbjpvcGVuIHNlc2FtZQ=="
        );
        assert!(basic_auth_ok(
            Some("Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="),
            "Aladdin",
            "open sesame"
        ));
        assert!(basic_auth_ok(
            Some("basic  QWxhZGRpbjpvcGVuIHNlc2FtZQ== "),
            "Aladdin",
            "open sesame"
        ));
        assert!(!basic_auth_ok(
            Some("Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="),
            "Aladdin",
            "x"
        ));
        assert!(!basic_auth_ok(
            Some("Bearer QWxhZGRpbjpvcGVuIHNlc2FtZQ=="),
            "Aladdin",
            "open sesame"
        ));
        assert!(!basic_auth_ok(None, "a", "b"));
    }

    #[test]
    fn origin_requests_drop_hop_by_hop_headers() {
        let raw = b"POST http://a.b:8080/up HTTP/1.1\r\nHost: a.b:8080\r\nProxy-Connection: keep-alive\r\n\
Proxy-Authorization: Basic eDp5\r\nConnection: keep-alive\r\nKeep-Alive: 5\r\nX-Thing:  v \r\nContent-Length: 3\r\n\r\n";
        let head = parse_head(raw).unwrap();
        let (host, port, path) = parse_absolute_uri(head.target).unwrap();
        let out = origin_request(&head, &host, port, &path);
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            "POST /up HTTP/1.1\r\nHost: a.b:8080\r\nX-Thing:  v \r\nContent-Length: 3\r\nConnection: close\r\n\r\n"
        );
        let head = parse_head(b"GET http://[::1]/ HTTP/1.0\r\n\r\n").unwrap();
        let out = origin_request(&head, "::1", 80, "/");
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            "GET / HTTP/1.0\r\nHost: [::1]\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn oversized_and_truncated_heads_are_errors() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let big = [&b"GET http://a/ HTTP/1.1\r\nX: "[..], &vec![b'a'; MAX_HEAD]].concat();
            let mut r = &big[..];
            assert!(matches!(
                read_head(&mut r).await,
                Err(HttpError::HeadTooLarge(MAX_HEAD))
            ));
            let mut r = &b"GET http://a/ HTTP/1.1\r\nHost: a\r\n"[..];
            assert!(matches!(
                read_head(&mut r).await,
                Err(HttpError::Truncated(_))
            ));
            let mut r = &b"GET http://a/ HTTP/1.1\r\n\r\nBODY"[..];
            let (buf, end) = read_head(&mut r).await.unwrap();
            assert_eq!(&buf[end..], b"BODY");
        });
    }
}
