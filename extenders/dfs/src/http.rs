//! The HTTP gateway: `GET /dfs/ID` and `GET /dfs/ID/path/in/folder` (and
//! `HEAD`), with single `Range: bytes=a-b` requests, content types from the
//! file name, and folder listings, so curl or a browser can stream a
//! shared file. Files come from the store, else through the chunk cache
//! and providers upstream ([`Gateway`]); every byte sent was verified
//! against the file's BLAKE3 tree, one 512 KiB piece at a time, so memory
//! per response stays at one piece whatever the file size.
//!
//! Parsing (request head, path, range) is pure and never panics on what a
//! client sends. The I/O shell is a thread per connection, bounded like
//! the DFS server's ([`Budgets`]: [`MAX_CONNECTIONS`] in all,
//! [`MAX_CONNECTIONS_PER_PEER`] per address), one request per connection
//! (`Connection: close`), a request head of at most [`MAX_HEAD`] bytes read
//! within [`HEAD_TIMEOUT`].

use std::io::{self, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::budget::{Budgets, Limits};

use crate::cache::PIECE_GROUPS;
use crate::gateway::{Gateway, GatewayError};
use crate::id::Id;
use crate::manifest::{check_name, FileManifest, Kind, Manifest, GROUP_BYTES};

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 32;
/// Connections served at once to one address.
pub const MAX_CONNECTIONS_PER_PEER: usize = 8;
/// Longest request head (request line and headers).
pub const MAX_HEAD: usize = 16 * 1024;
/// Time a client has to send its request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// A client that reads nothing for this long is dropped.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest request path accepted.
pub const MAX_PATH: usize = 8192;
/// Most path components after the ID.
pub const MAX_DEPTH: usize = 64;

/// A request path: an ID and the names under it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DfsPath {
    /// The top ID.
    pub id: Id,
    /// Entry names, one per folder level.
    pub names: Vec<String>,
    /// Whether the path ended with `/`.
    pub trailing_slash: bool,
}

/// Why a request path is refused (400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Not under `/dfs/`.
    #[error("not a /dfs/ path")]
    NotDfs,
    /// Not 64 hex digits.
    #[error("bad ID")]
    BadId,
    /// A bad escape, bad UTF-8 or a name manifests do not allow.
    #[error("bad name: {0}")]
    BadName(&'static str),
    /// Too long or too deep.
    #[error("path too long")]
    TooLong,
}

fn unhex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Decodes `%XX` escapes; the result must be UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hi = unhex(*b.get(i + 1)?)?;
            let lo = unhex(*b.get(i + 2)?)?;
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Escapes everything but unreserved characters.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Escapes text for HTML.
pub fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Parses a request target (`/dfs/ID[/name...][?query]`). Names are
/// checked with the manifest rules (one plain component each: no `..`,
/// no `/`, no control characters), so nothing can climb out.
pub fn parse_path(target: &str) -> Result<DfsPath, PathError> {
    if target.len() > MAX_PATH {
        return Err(PathError::TooLong);
    }
    let path = target.split(['?', '#']).next().unwrap_or("");
    let rest = path.strip_prefix("/dfs/").ok_or(PathError::NotDfs)?;
    let mut parts = rest.split('/');
    let id: Id = parts
        .next()
        .unwrap_or("")
        .parse()
        .map_err(|_| PathError::BadId)?;
    let parts: Vec<&str> = parts.collect();
    if parts.len() > MAX_DEPTH + 1 {
        return Err(PathError::TooLong);
    }
    let trailing_slash = parts.last() == Some(&"");
    let upto = parts.len() - usize::from(trailing_slash);
    let mut names = Vec::new();
    for p in &parts[..upto] {
        let name = percent_decode(p).ok_or(PathError::BadName("bad escape or UTF-8"))?;
        check_name(&name).map_err(PathError::BadName)?;
        names.push(name);
    }
    Ok(DfsPath {
        id,
        names,
        trailing_slash,
    })
}

/// What a `Range` header asks of a file of some size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeAsk {
    /// No usable range (absent, several, or malformed: RFC 9110 says
    /// ignore): the whole file, 200.
    Whole,
    /// Bytes `start..end` (end exclusive), 206.
    Part {
        /// First byte.
        start: u64,
        /// One past the last byte.
        end: u64,
    },
    /// Nothing of the file: 416.
    Unsatisfiable,
}

/// Interprets a `Range` header value for a file of `size` bytes.
pub fn parse_range(value: Option<&str>, size: u64) -> RangeAsk {
    let Some(v) = value else {
        return RangeAsk::Whole;
    };
    let Some(spec) = v.trim().strip_prefix("bytes=") else {
        return RangeAsk::Whole;
    };
    if spec.contains(',') {
        return RangeAsk::Whole;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeAsk::Whole;
    };
    let num = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    match (a.trim(), b.trim()) {
        ("", n) => match num(n) {
            None => RangeAsk::Whole,
            Some(0) => RangeAsk::Unsatisfiable,
            Some(_) if size == 0 => RangeAsk::Unsatisfiable,
            Some(n) => RangeAsk::Part {
                start: size - n.min(size),
                end: size,
            },
        },
        (a, "") => match num(a) {
            None => RangeAsk::Whole,
            Some(a) if a >= size => RangeAsk::Unsatisfiable,
            Some(a) => RangeAsk::Part {
                start: a,
                end: size,
            },
        },
        (a, b) => match (num(a), num(b)) {
            (Some(a), Some(b)) if a <= b => {
                if a >= size {
                    RangeAsk::Unsatisfiable
                } else {
                    RangeAsk::Part {
                        start: a,
                        end: b.saturating_add(1).min(size),
                    }
                }
            }
            _ => RangeAsk::Whole,
        },
    }
}

/// Reads bytes `pos..end` of a file, one verified piece at a time.
struct PieceReader {
    gw: Arc<Gateway>,
    id: Id,
    m: FileManifest,
    pos: u64,
    end: u64,
    piece: Option<(u64, Vec<u8>)>,
}

impl Read for PieceReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.end || buf.is_empty() {
            return Ok(0);
        }
        let piece_bytes = PIECE_GROUPS * GROUP_BYTES;
        let k = self.pos / piece_bytes;
        if self.piece.as_ref().is_none_or(|(pk, _)| *pk != k) {
            let d = self
                .gw
                .piece_data(&self.id, &self.m, k)
                .map_err(|e| io::Error::other(e.to_string()))?;
            self.piece = Some((k, d));
        }
        let Some((_, data)) = &self.piece else {
            return Ok(0);
        };
        let at = (self.pos - k * piece_bytes) as usize;
        let avail = data.len().saturating_sub(at);
        let n = avail.min(buf.len()).min((self.end - self.pos) as usize);
        if n == 0 {
            return Err(io::Error::other("piece shorter than the file says"));
        }
        buf[..n].copy_from_slice(&data[at..at + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

/// A request method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// GET.
    Get,
    /// HEAD: the same headers, no body.
    Head,
    /// Anything else (refused with 405).
    Other,
}

/// The parts of a request head the gateway uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// The method.
    pub method: Method,
    /// The request target (path and query).
    pub target: String,
    /// The `Range` header's value, if any.
    pub range: Option<String>,
}

/// Parses a request head (up to and without the empty line): a request
/// line `METHOD TARGET HTTP/1.x` and `Name: value` header lines. `None`
/// for anything else (400).
pub fn parse_head(head: &[u8]) -> Option<Head> {
    let text = std::str::from_utf8(head).ok()?;
    let mut lines = text.split("\r\n");
    let mut req = lines.next()?.split(' ');
    let (m, target, version) = (req.next()?, req.next()?, req.next()?);
    if req.next().is_some() || !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return None;
    }
    let method = match m {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        m if !m.is_empty() && m.bytes().all(|b| b.is_ascii_uppercase()) => Method::Other,
        _ => return None,
    };
    let mut range = None;
    for l in lines {
        let (name, value) = l.split_once(':')?;
        if name.is_empty() || name.bytes().any(|b| b <= b' ' || b >= 0x7f) {
            return None;
        }
        if name.eq_ignore_ascii_case("range") {
            range = Some(value.trim().to_string());
        }
    }
    Some(Head {
        method,
        target: target.to_string(),
        range,
    })
}

/// An answer: status, headers, and a body of exactly `len` bytes.
pub struct Reply {
    /// The status code.
    pub status: u16,
    /// Headers besides Content-Length and Connection.
    pub headers: Vec<(&'static str, String)>,
    /// The body.
    pub body: Box<dyn Read + Send>,
    /// Its length.
    pub len: u64,
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reply")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .field("len", &self.len)
            .finish()
    }
}

fn bytes_reply(status: u16, headers: Vec<(&'static str, String)>, body: Vec<u8>) -> Reply {
    Reply {
        status,
        headers,
        len: body.len() as u64,
        body: Box::new(io::Cursor::new(body)),
    }
}

fn text(status: u16, msg: &str) -> Reply {
    bytes_reply(
        status,
        vec![("Content-Type", "text/plain; charset=utf-8".into())],
        format!("{msg}\n").into_bytes(),
    )
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        416 => "Range Not Satisfiable",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

fn gateway_status(e: &GatewayError) -> u16 {
    match e {
        GatewayError::NotFound => 404,
        GatewayError::BadRequest(_) => 400,
        GatewayError::Upstream(_) | GatewayError::Local(_) => 502,
    }
}

/// Answers one request (the pure parts above, the gateway for data).
pub fn answer(gw: &Arc<Gateway>, method: Method, url: &str, range: Option<&str>) -> Reply {
    if method == Method::Other {
        return text(405, "only GET and HEAD");
    }
    let p = match parse_path(url) {
        Ok(p) => p,
        Err(PathError::NotDfs) => return text(404, "not found (paths are /dfs/ID[/name...])"),
        Err(e) => return text(400, &e.to_string()),
    };
    let mut m = match gw.manifest(&p.id) {
        Ok(m) => m,
        Err(e) => return text(gateway_status(&e), &e.to_string()),
    };
    let mut id = p.id;
    for name in &p.names {
        let Manifest::Folder(f) = &m else {
            return text(404, "not a folder");
        };
        let Some(e) = f.entries.iter().find(|e| e.name == *name) else {
            return text(404, "no such entry");
        };
        let child = match gw.manifest(&e.id) {
            Ok(c) => c,
            Err(e) => return text(gateway_status(&e), &e.to_string()),
        };
        let fits = matches!(
            (&child, e.kind),
            (Manifest::File(_), Kind::File) | (Manifest::Folder(_), Kind::Folder)
        ) && child.size() == e.size;
        if !fits {
            return text(502, "entry does not match its folder");
        }
        (id, m) = (e.id, child);
    }
    match m {
        Manifest::Folder(f) => {
            let mut base = format!("/dfs/{}/", p.id.to_hex());
            for n in &p.names {
                base.push_str(&percent_encode(n));
                base.push('/');
            }
            let mut html = String::from(
                "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>QuantumDFS</title></head><body>\n<ul>\n",
            );
            for e in &f.entries {
                let slash = if e.kind == Kind::Folder { "/" } else { "" };
                html.push_str(&format!(
                    "<li><a href=\"{}{}{slash}\">{}{slash}</a> {}</li>\n",
                    html_escape(&base),
                    html_escape(&percent_encode(&e.name)),
                    html_escape(&e.name),
                    e.size
                ));
            }
            html.push_str("</ul>\n</body></html>\n");
            let headers = vec![
                ("Content-Type", "text/html; charset=utf-8".into()),
                ("Content-Security-Policy", "default-src 'none'".into()),
                ("X-Content-Type-Options", "nosniff".into()),
            ];
            bytes_reply(200, headers, html.into_bytes())
        }
        Manifest::File(fm) => {
            let ctype = p
                .names
                .last()
                .map(|n| mime_guess::from_path(n).first_or_octet_stream().to_string())
                .unwrap_or_else(|| "application/octet-stream".into());
            // Content is anyone's: a shared .html or .svg must not run
            // script on the gateway's origin (a sandboxed document with no
            // sources; videos, images and text still display).
            let mut headers = vec![
                ("Content-Type", ctype),
                ("Accept-Ranges", "bytes".into()),
                ("X-Content-Type-Options", "nosniff".into()),
                (
                    "Content-Security-Policy",
                    "default-src 'none'; media-src 'self'; img-src 'self'; style-src 'unsafe-inline'; sandbox"
                        .into(),
                ),
            ];
            let (status, start, end) = match parse_range(range, fm.size) {
                RangeAsk::Whole => (200, 0, fm.size),
                RangeAsk::Part { start, end } => {
                    headers.push((
                        "Content-Range",
                        format!("bytes {start}-{}/{}", end - 1, fm.size),
                    ));
                    (206, start, end)
                }
                RangeAsk::Unsatisfiable => {
                    let mut r = text(416, "range not satisfiable");
                    r.headers
                        .push(("Content-Range", format!("bytes */{}", fm.size)));
                    return r;
                }
            };
            let reader = PieceReader {
                gw: Arc::clone(gw),
                id,
                m: fm,
                pos: start,
                end,
                piece: None,
            };
            Reply {
                status,
                headers,
                body: Box::new(reader),
                len: end - start,
            }
        }
    }
}

/// Reads a request head (through the empty line) within [`MAX_HEAD`]
/// bytes; bytes after it are ignored (one request per connection).
fn read_head(conn: &mut TcpStream) -> Result<Vec<u8>, u16> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    let deadline = Instant::now() + HEAD_TIMEOUT;
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.truncate(end);
            return Ok(buf);
        }
        if buf.len() > MAX_HEAD {
            return Err(431);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || conn.set_read_timeout(Some(left)).is_err() {
            return Err(400);
        }
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => return Err(400),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn send(conn: &TcpStream, reply: Reply, with_body: bool) -> io::Result<()> {
    let mut out = BufWriter::with_capacity(64 * 1024, conn);
    write!(
        out,
        "HTTP/1.1 {} {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        reply.status,
        reason(reply.status),
        reply.len
    )?;
    for (k, v) in &reply.headers {
        // Values are built here from checked names and numbers; a line
        // break would still be refused rather than split the head.
        if v.contains(['\r', '\n']) {
            return Err(io::Error::other("header value with a line break"));
        }
        write!(out, "{k}: {v}\r\n")?;
    }
    out.write_all(b"\r\n")?;
    if with_body {
        let n = io::copy(&mut reply.body.take(reply.len), &mut out)?;
        if n != reply.len {
            return Err(io::Error::other("body ended early"));
        }
    }
    out.flush()
}

fn serve_connection(gw: &Arc<Gateway>, mut conn: TcpStream) -> io::Result<()> {
    conn.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let head = match read_head(&mut conn).map(|h| parse_head(&h)) {
        Ok(Some(h)) => h,
        Ok(None) => return send(&conn, text(400, "bad request"), true),
        Err(status) => return send(&conn, text(status, "bad request head"), true),
    };
    let reply = answer(gw, head.method, &head.target, head.range.as_deref());
    send(&conn, reply, head.method != Method::Head)
}

/// Serves HTTP on `addr`, a thread per connection within the budgets;
/// returns the bound address.
pub fn spawn(addr: SocketAddr, gw: Arc<Gateway>) -> io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    let budgets = Arc::new(Mutex::new(Budgets::new(Limits {
        max_connections: MAX_CONNECTIONS,
        max_connections_per_peer: MAX_CONNECTIONS_PER_PEER,
        peer_rate: None,
    })));
    std::thread::Builder::new()
        .name("qdfs-http".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let conn = match conn {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::debug!("http accept: {e}");
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    }
                };
                let Ok(peer) = conn.peer_addr() else { continue };
                let admitted = budgets
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .admit(peer.ip(), Instant::now());
                if admitted.is_err() {
                    let _ = conn.set_write_timeout(Some(Duration::from_secs(1)));
                    let _ = send(&conn, text(503, "busy"), true);
                    continue;
                }
                let release = move |b: &Mutex<Budgets>| {
                    b.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .release(peer.ip())
                };
                let (gw, mine) = (Arc::clone(&gw), Arc::clone(&budgets));
                let spawned = std::thread::Builder::new()
                    .name("qdfs-http-conn".into())
                    .spawn(move || {
                        if let Err(e) = serve_connection(&gw, conn) {
                            tracing::debug!(%peer, "http: {e}");
                        }
                        release(&mine);
                    });
                if spawned.is_err() {
                    release(&budgets);
                }
            }
        })?;
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        let id = "ab".repeat(32);
        let p = parse_path(&format!("/dfs/{id}")).unwrap();
        assert!(p.names.is_empty() && !p.trailing_slash);
        let p = parse_path(&format!("/dfs/{id}/a%20b/c.txt?x=1")).unwrap();
        assert_eq!(p.names, ["a b", "c.txt"]);
        let p = parse_path(&format!("/dfs/{id}/sub/")).unwrap();
        assert_eq!(p.names, ["sub"]);
        assert!(p.trailing_slash);
        assert_eq!(parse_path("/x"), Err(PathError::NotDfs));
        assert_eq!(parse_path("/dfs/zz"), Err(PathError::BadId));
        for bad in [
            "..", ".", "a%2Fb", "%2e%2e", "a%00", "%ff", "%4", "", "a%0a",
        ] {
            assert!(
                matches!(
                    parse_path(&format!("/dfs/{id}/{bad}/x")),
                    Err(PathError::BadName(_))
                ),
                "{bad}"
            );
        }
        assert!(parse_path(&format!("/dfs/{id}{}", "/a".repeat(100))).is_err());
    }

    #[test]
    fn ranges() {
        use RangeAsk::*;
        let r = |v: &str| parse_range(Some(v), 1000);
        assert_eq!(parse_range(None, 1000), Whole);
        assert_eq!(r("bytes=0-9"), Part { start: 0, end: 10 });
        assert_eq!(
            r("bytes=990-"),
            Part {
                start: 990,
                end: 1000
            }
        );
        assert_eq!(
            r("bytes=-10"),
            Part {
                start: 990,
                end: 1000
            }
        );
        assert_eq!(
            r("bytes=-5000"),
            Part {
                start: 0,
                end: 1000
            }
        );
        assert_eq!(
            r("bytes=5-99999"),
            Part {
                start: 5,
                end: 1000
            }
        );
        assert_eq!(r("bytes=1000-"), Unsatisfiable);
        assert_eq!(r("bytes=2000-3000"), Unsatisfiable);
        assert_eq!(r("bytes=-0"), Unsatisfiable);
        for ignored in [
            "bytes=5-1",
            "bytes=0-1,3-4",
            "items=0-1",
            "bytes=a-b",
            "bytes=+1-2",
        ] {
            assert_eq!(r(ignored), Whole, "{ignored}");
        }
        assert_eq!(
            r("bytes=18446744073709551615-18446744073709551615"),
            Unsatisfiable
        );
        assert_eq!(parse_range(Some("bytes=0-"), 0), Unsatisfiable);
    }

    #[test]
    fn escaping() {
        assert_eq!(percent_encode("a b/<c>"), "a%20b%2F%3Cc%3E");
        assert_eq!(percent_decode(&percent_encode("ü x&")).unwrap(), "ü x&");
        assert_eq!(
            html_escape("<a href=\"x\">'&'"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;"
        );
    }

    #[test]
    fn garbage_never_panics() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let seed = format!("/dfs/{}/a%20b/../c\nbytes=10-20", "ab".repeat(32)).into_bytes();
        let alphabet = b"/%.-=,0123456789abf\n bytes";
        for _ in 0..20_000 {
            let mut b = seed.clone();
            for _ in 0..=(next() % 4) {
                let i = (next() as usize) % b.len();
                b[i] = if next() % 2 == 0 {
                    alphabet[(next() as usize) % alphabet.len()]
                } else {
                    next() as u8
                };
            }
            b.truncate((next() as usize) % (b.len() + 1));
            crate::fuzzing::fuzz_http(&b);
        }
    }

    #[test]
    fn request_heads() {
        let h = parse_head(b"GET /dfs/x HTTP/1.1\r\nHost: a\r\nrange: bytes=1-2").unwrap();
        assert_eq!(h.method, Method::Get);
        assert_eq!(h.target, "/dfs/x");
        assert_eq!(h.range.as_deref(), Some("bytes=1-2"));
        assert_eq!(parse_head(b"HEAD / HTTP/1.0").unwrap().method, Method::Head);
        assert_eq!(
            parse_head(b"POST / HTTP/1.1").unwrap().method,
            Method::Other
        );
        for bad in [
            &b""[..],
            b"GET",
            b"GET /",
            b"GET / FTP/1",
            b"GET x HTTP/1.1",
            b"GET / HTTP/1.1 extra",
            b"get / HTTP/1.1",
            b"GET / HTTP/1.1\r\nno colon",
            b"GET / HTTP/1.1\r\nbad name: x",
            b"GET / HTTP/1.1\r\n\xff: x",
        ] {
            assert!(
                parse_head(bad).is_none(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
