//! The HTTP gateway: `GET /dfs/ID` and `GET /dfs/ID/path/in/folder` (and
//! `HEAD`), with single `Range: bytes=a-b` requests, content types from the
//! file name, and folder listings, so curl or a browser can stream a
//! shared file. Files come from the store, else through the chunk cache
//! and providers upstream ([`Gateway`]); every byte sent was verified
//! against the file's BLAKE3 tree, one 512 KiB piece at a time, so memory
//! per response stays at one piece whatever the file size.
//!
//! Parsing (path, range) is pure and never panics on what a client sends;
//! the I/O shell is [`tiny_http`] with a fixed number of worker threads.

use std::io::{self, Read};
use std::net::SocketAddr;
use std::sync::Arc;

use tiny_http::{Header, Method, Response, StatusCode};

use crate::cache::PIECE_GROUPS;
use crate::gateway::{Gateway, GatewayError};
use crate::id::Id;
use crate::manifest::{check_name, FileManifest, Kind, Manifest, GROUP_BYTES};

/// Worker threads answering requests.
pub const WORKERS: usize = 8;
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

fn header(k: &str, v: &str) -> Option<Header> {
    Header::from_bytes(k.as_bytes(), v.as_bytes()).ok()
}

type Reply = Response<Box<dyn Read + Send>>;

fn text(status: u16, msg: &str) -> Reply {
    let body = format!("{msg}\n").into_bytes();
    let len = body.len();
    Response::new(
        StatusCode(status),
        [header("Content-Type", "text/plain; charset=utf-8")]
            .into_iter()
            .flatten()
            .collect(),
        Box::new(io::Cursor::new(body)),
        Some(len),
        None,
    )
}

fn gateway_status(e: &GatewayError) -> u16 {
    match e {
        GatewayError::NotFound => 404,
        GatewayError::BadRequest(_) => 400,
        GatewayError::Upstream(_) | GatewayError::Local(_) => 502,
    }
}

/// Answers one request (the pure parts above, the gateway for data).
pub fn answer(gw: &Arc<Gateway>, method: &Method, url: &str, range: Option<&str>) -> Reply {
    if !matches!(method, Method::Get | Method::Head) {
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
            let len = html.len();
            let headers = [
                header("Content-Type", "text/html; charset=utf-8"),
                header("Content-Security-Policy", "default-src 'none'"),
                header("X-Content-Type-Options", "nosniff"),
            ];
            Response::new(
                StatusCode(200),
                headers.into_iter().flatten().collect(),
                Box::new(io::Cursor::new(html.into_bytes())),
                Some(len),
                None,
            )
        }
        Manifest::File(fm) => {
            let ctype = p
                .names
                .last()
                .map(|n| mime_guess::from_path(n).first_or_octet_stream().to_string())
                .unwrap_or_else(|| "application/octet-stream".into());
            let mut headers: Vec<Header> = [
                header("Content-Type", &ctype),
                header("Accept-Ranges", "bytes"),
                header("X-Content-Type-Options", "nosniff"),
            ]
            .into_iter()
            .flatten()
            .collect();
            let (status, start, end) = match parse_range(range, fm.size) {
                RangeAsk::Whole => (200, 0, fm.size),
                RangeAsk::Part { start, end } => {
                    headers.extend(header(
                        "Content-Range",
                        &format!("bytes {start}-{}/{}", end - 1, fm.size),
                    ));
                    (206, start, end)
                }
                RangeAsk::Unsatisfiable => {
                    let mut r = text(416, "range not satisfiable");
                    if let Some(h) = header("Content-Range", &format!("bytes */{}", fm.size)) {
                        r.add_header(h);
                    }
                    return r;
                }
            };
            let Ok(len) = usize::try_from(end - start) else {
                return text(500, "too large for this platform");
            };
            let reader = PieceReader {
                gw: Arc::clone(gw),
                id,
                m: fm,
                pos: start,
                end,
                piece: None,
            };
            // Always a Content-Length (players seek with it), never chunked.
            Response::new(
                StatusCode(status),
                headers,
                Box::new(reader) as Box<dyn Read + Send>,
                Some(len),
                None,
            )
            .with_chunked_threshold(usize::MAX)
        }
    }
}

/// Serves HTTP on `addr` with [`WORKERS`] threads; returns the bound
/// address.
pub fn spawn(addr: SocketAddr, gw: Arc<Gateway>) -> io::Result<SocketAddr> {
    let server = tiny_http::Server::http(addr).map_err(|e| io::Error::other(e.to_string()))?;
    let local = server
        .server_addr()
        .to_ip()
        .ok_or_else(|| io::Error::other("not an IP listener"))?;
    let server = Arc::new(server);
    for _ in 0..WORKERS {
        let (server, gw) = (Arc::clone(&server), Arc::clone(&gw));
        std::thread::Builder::new()
            .name("qdfs-http".into())
            .spawn(move || loop {
                let req = match server.recv() {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::debug!("http: {e}");
                        continue;
                    }
                };
                let range = req
                    .headers()
                    .iter()
                    .find(|h| h.field.equiv("Range"))
                    .map(|h| h.value.as_str().to_owned());
                let reply = answer(&gw, req.method(), req.url(), range.as_deref());
                if let Err(e) = req.respond(reply) {
                    tracing::debug!("http response cut: {e}");
                }
            })?;
    }
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
}
