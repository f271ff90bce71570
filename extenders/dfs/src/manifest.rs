//! The manifest: what an ID names.
//!
//! A manifest is a short, versioned binary document; its BLAKE3 hash is
//! the ID. A file's manifest gives the size and the root of the file's
//! BLAKE3 tree (which is the file's plain BLAKE3 hash, `b3sum`'s output);
//! a folder's lists its entries by name, each with its kind, size and ID.
//! There is exactly one encoding per manifest (entries sorted, no optional
//! fields, nothing after the end), so equal content always has equal IDs,
//! and [`Manifest::parse`] refuses anything else with an error; it never
//! panics.
//!
//! ```text
//! magic "QDFS" | version u8 = 1 | kind u8 (1 file, 2 folder) | body
//! file body:   size u64 | block log u8 (4: 16 KiB chunk groups) | root [32]
//! folder body: count u32 | count × entry, names strictly ascending
//! entry:       kind u8 | name length u16 | name (UTF-8) | size u64 | id [32]
//! ```
//! Integers are big-endian.

use crate::id::Id;

/// The manifest magic.
pub const MAGIC: &[u8; 4] = b"QDFS";
/// The manifest format this build writes and reads.
pub const VERSION: u8 = 1;
/// Chunk-group size as log2 of 1 KiB BLAKE3 chunks: 4 means 16 KiB groups,
/// the unit that is verified, requested and recorded as done.
pub const BLOCK_LOG: u8 = 4;
/// Bytes in one chunk group.
pub const GROUP_BYTES: u64 = 1024 << BLOCK_LOG;
/// Longest manifest accepted (a folder of some 14,000 entries).
pub const MAX_MANIFEST: usize = 4 << 20;
/// Longest entry name in bytes.
pub const MAX_NAME: usize = 255;
/// Largest file size accepted (2^62 bytes: far beyond any disk, and keeps
/// every offset computation clear of overflow).
pub const MAX_FILE_SIZE: u64 = 1 << 62;

/// What a manifest describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Manifest {
    /// One file.
    File(FileManifest),
    /// A folder of files and folders.
    Folder(FolderManifest),
}

/// A file: its size and the root of its BLAKE3 tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileManifest {
    /// Size in bytes.
    pub size: u64,
    /// Root of the BLAKE3 tree over the content (its plain BLAKE3 hash).
    pub root: [u8; 32],
}

/// A folder: its entries, sorted by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FolderManifest {
    /// Entries, strictly ascending by name (bytewise).
    pub entries: Vec<Entry>,
}

/// Whether an entry is a file or a folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A file manifest.
    File,
    /// A folder manifest.
    Folder,
}

/// One entry of a folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// File or folder.
    pub kind: Kind,
    /// Name within the folder: 1–255 bytes of UTF-8, no `/`, NUL, control
    /// or bidirectional formatting characters, not `.` or `..`, not ending
    /// in `.qdfs-part` or `.qdfs-state`.
    pub name: String,
    /// Size in bytes (a folder: all files under it).
    pub size: u64,
    /// The entry's manifest ID.
    pub id: Id,
}

/// Why bytes are not a manifest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// Ends before a field does.
    #[error("manifest is truncated (needs {needed} bytes at offset {offset})")]
    Truncated {
        /// Where the missing field starts.
        offset: usize,
        /// How many bytes it needs.
        needed: usize,
    },
    /// Longer than [`MAX_MANIFEST`].
    #[error("manifest is longer than {MAX_MANIFEST} bytes")]
    TooLong,
    /// Does not start with [`MAGIC`].
    #[error("not a QuantumDFS manifest (bad magic)")]
    BadMagic,
    /// A version this build does not know.
    #[error("manifest version {0} is not supported (this build reads version {VERSION})")]
    UnsupportedVersion(u8),
    /// A kind byte that is neither file nor folder.
    #[error("unknown manifest kind {0}")]
    UnknownKind(u8),
    /// A chunk-group size this build does not serve.
    #[error("chunk-group size 2^{0} KiB is not supported (only 2^{BLOCK_LOG})")]
    UnsupportedBlockSize(u8),
    /// A file bigger than [`MAX_FILE_SIZE`].
    #[error("file size {0} is out of range")]
    SizeOutOfRange(u64),
    /// A folder whose entries add up to more than [`MAX_FILE_SIZE`].
    #[error("folder entries add up to more than {MAX_FILE_SIZE} bytes")]
    TotalOutOfRange,
    /// Bytes after the end.
    #[error("{0} bytes after the end of the manifest")]
    TrailingBytes(usize),
    /// An entry name that is empty, too long, not UTF-8, or a path.
    #[error("entry {index} has an invalid name: {why}")]
    BadName {
        /// Entry index.
        index: usize,
        /// What is wrong with it.
        why: &'static str,
    },
    /// Entries out of order or repeated.
    #[error("entry {0} is not in strictly ascending name order")]
    Unsorted(usize),
}

/// Suffixes a fetch uses for its side files; no entry name may end in one.
pub const SIDE_SUFFIXES: [&str; 2] = [".qdfs-part", ".qdfs-state"];

/// Bidirectional formatting characters (marks, embeddings, overrides,
/// isolates).
fn is_bidi_format(c: char) -> bool {
    matches!(
        c,
        '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
    )
}

/// Checks one entry name; the reason if it is unfit.
pub fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty");
    }
    if name.len() > MAX_NAME {
        return Err("longer than 255 bytes");
    }
    if name == "." || name == ".." {
        return Err("\".\" or \"..\"");
    }
    if name.contains('/') || name.contains('\0') {
        return Err("contains '/' or NUL");
    }
    // Names are printed to terminals: no control characters (C0, DEL,
    // C1: ESC, CR, LF, ...) and no bidirectional formatting characters
    // that could make one name display as another.
    if name.chars().any(|c| c.is_control() || is_bidi_format(c)) {
        return Err("contains a control or bidirectional formatting character");
    }
    // A fetch keeps its side files beside the output under these suffixes;
    // an entry so named could collide with another entry's.
    if SIDE_SUFFIXES.iter().any(|s| name.ends_with(s)) {
        return Err("ends in .qdfs-part or .qdfs-state (reserved for fetches)");
    }
    Ok(())
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ManifestError> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.data.len());
        let Some(end) = end else {
            return Err(ManifestError::Truncated {
                offset: self.pos,
                needed: n,
            });
        };
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, ManifestError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, ManifestError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, ManifestError> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_be_bytes(a))
    }
    fn u64(&mut self) -> Result<u64, ManifestError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(a))
    }
    fn hash(&mut self) -> Result<[u8; 32], ManifestError> {
        let mut a = [0u8; 32];
        a.copy_from_slice(self.take(32)?);
        Ok(a)
    }
}

const KIND_FILE: u8 = 1;
const KIND_FOLDER: u8 = 2;

fn kind_byte(k: Kind) -> u8 {
    match k {
        Kind::File => KIND_FILE,
        Kind::Folder => KIND_FOLDER,
    }
}

fn kind_of(b: u8) -> Result<Kind, ManifestError> {
    match b {
        KIND_FILE => Ok(Kind::File),
        KIND_FOLDER => Ok(Kind::Folder),
        other => Err(ManifestError::UnknownKind(other)),
    }
}

impl Manifest {
    /// Parses a manifest, checking every field; never panics.
    pub fn parse(data: &[u8]) -> Result<Manifest, ManifestError> {
        if data.len() > MAX_MANIFEST {
            return Err(ManifestError::TooLong);
        }
        let mut r = Reader { data, pos: 0 };
        if r.take(4)? != MAGIC {
            return Err(ManifestError::BadMagic);
        }
        let version = r.u8()?;
        if version != VERSION {
            return Err(ManifestError::UnsupportedVersion(version));
        }
        let m = match kind_of(r.u8()?)? {
            Kind::File => {
                let size = r.u64()?;
                if size > MAX_FILE_SIZE {
                    return Err(ManifestError::SizeOutOfRange(size));
                }
                let log = r.u8()?;
                if log != BLOCK_LOG {
                    return Err(ManifestError::UnsupportedBlockSize(log));
                }
                Manifest::File(FileManifest {
                    size,
                    root: r.hash()?,
                })
            }
            Kind::Folder => {
                let count = r.u32()? as usize;
                // Each entry takes at least 43 bytes: refuse a count the
                // rest cannot hold before reserving room for it.
                if count > (data.len() - r.pos) / 43 {
                    return Err(ManifestError::Truncated {
                        offset: r.pos,
                        needed: count.saturating_mul(43),
                    });
                }
                let mut entries: Vec<Entry> = Vec::with_capacity(count);
                let mut total: u64 = 0;
                for index in 0..count {
                    let kind = kind_of(r.u8()?)?;
                    let len = r.u16()? as usize;
                    let raw = r.take(len)?;
                    let name = std::str::from_utf8(raw)
                        .map_err(|_| ManifestError::BadName {
                            index,
                            why: "not UTF-8",
                        })?
                        .to_string();
                    check_name(&name).map_err(|why| ManifestError::BadName { index, why })?;
                    if let Some(prev) = entries.last() {
                        if prev.name.as_bytes() >= name.as_bytes() {
                            return Err(ManifestError::Unsorted(index));
                        }
                    }
                    let size = r.u64()?;
                    if size > MAX_FILE_SIZE {
                        return Err(ManifestError::SizeOutOfRange(size));
                    }
                    // The folder's total is bounded like one file's, so
                    // `size()` and every sum over a folder stay exact.
                    total = total
                        .checked_add(size)
                        .filter(|t| *t <= MAX_FILE_SIZE)
                        .ok_or(ManifestError::TotalOutOfRange)?;
                    let id = Id(r.hash()?);
                    entries.push(Entry {
                        kind,
                        name,
                        size,
                        id,
                    });
                }
                Manifest::Folder(FolderManifest { entries })
            }
        };
        if r.pos != data.len() {
            return Err(ManifestError::TrailingBytes(data.len() - r.pos));
        }
        Ok(m)
    }

    /// The one encoding of this manifest.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        match self {
            Manifest::File(f) => {
                out.push(KIND_FILE);
                out.extend_from_slice(&f.size.to_be_bytes());
                out.push(BLOCK_LOG);
                out.extend_from_slice(&f.root);
            }
            Manifest::Folder(d) => {
                out.push(KIND_FOLDER);
                out.extend_from_slice(&(d.entries.len() as u32).to_be_bytes());
                for e in &d.entries {
                    out.push(kind_byte(e.kind));
                    out.extend_from_slice(&(e.name.len() as u16).to_be_bytes());
                    out.extend_from_slice(e.name.as_bytes());
                    out.extend_from_slice(&e.size.to_be_bytes());
                    out.extend_from_slice(&e.id.0);
                }
            }
        }
        out
    }

    /// The manifest's ID (BLAKE3 of [`Manifest::encode`]).
    pub fn id(&self) -> Id {
        Id::of_manifest(&self.encode())
    }

    /// Bytes of content it names (a folder: all files under it). Exact
    /// for anything [`Manifest::parse`] or [`FolderManifest::new`]
    /// returned (their totals are at most [`MAX_FILE_SIZE`]); saturates
    /// rather than overflowing for a folder built by hand.
    pub fn size(&self) -> u64 {
        match self {
            Manifest::File(f) => f.size,
            Manifest::Folder(d) => d.entries.iter().fold(0u64, |t, e| t.saturating_add(e.size)),
        }
    }
}

impl FolderManifest {
    /// Builds a folder from entries in any order; refuses bad or repeated
    /// names so that what is built always parses.
    pub fn new(mut entries: Vec<Entry>) -> Result<FolderManifest, ManifestError> {
        entries.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
        for (index, e) in entries.iter().enumerate() {
            check_name(&e.name).map_err(|why| ManifestError::BadName { index, why })?;
            if index > 0 && entries[index - 1].name == e.name {
                return Err(ManifestError::Unsorted(index));
            }
        }
        let mut total: u64 = 0;
        for e in &entries {
            if e.size > MAX_FILE_SIZE {
                return Err(ManifestError::SizeOutOfRange(e.size));
            }
            total = total
                .checked_add(e.size)
                .filter(|t| *t <= MAX_FILE_SIZE)
                .ok_or(ManifestError::TotalOutOfRange)?;
        }
        let m = FolderManifest { entries };
        if Manifest::Folder(m.clone()).encode().len() > MAX_MANIFEST {
            return Err(ManifestError::TooLong);
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(size: u64, b: u8) -> FileManifest {
        FileManifest {
            size,
            root: [b; 32],
        }
    }

    #[test]
    fn file_round_trip_and_id() {
        let m = Manifest::File(file(123_456, 7));
        let bytes = m.encode();
        assert_eq!(bytes.len(), 4 + 1 + 1 + 8 + 1 + 32);
        assert_eq!(Manifest::parse(&bytes), Ok(m.clone()));
        assert_eq!(m.id(), Id(*blake3::hash(&bytes).as_bytes()));
    }

    #[test]
    fn folder_round_trip_sorted() {
        let e = |name: &str, kind| Entry {
            kind,
            name: name.into(),
            size: 5,
            id: Id([1; 32]),
        };
        let f = FolderManifest::new(vec![e("b", Kind::File), e("a", Kind::Folder)]).unwrap();
        assert_eq!(f.entries[0].name, "a");
        let m = Manifest::Folder(f);
        assert_eq!(Manifest::parse(&m.encode()), Ok(m.clone()));
        assert_eq!(m.size(), 10);
        assert!(FolderManifest::new(vec![e("a", Kind::File), e("a", Kind::File)]).is_err());
        assert!(FolderManifest::new(vec![e("x/y", Kind::File)]).is_err());
        assert!(FolderManifest::new(vec![e("..", Kind::File)]).is_err());
    }

    #[test]
    fn refusals_name_the_problem() {
        let good = Manifest::File(file(1, 1)).encode();
        for cut in 0..good.len() {
            assert!(matches!(
                Manifest::parse(&good[..cut]),
                Err(ManifestError::Truncated { .. } | ManifestError::BadMagic)
            ));
        }
        let mut b = good.clone();
        b[4] = 2;
        assert_eq!(
            Manifest::parse(&b),
            Err(ManifestError::UnsupportedVersion(2))
        );
        let mut b = good.clone();
        b[5] = 9;
        assert_eq!(Manifest::parse(&b), Err(ManifestError::UnknownKind(9)));
        let mut b = good.clone();
        b[14] = 5;
        assert_eq!(
            Manifest::parse(&b),
            Err(ManifestError::UnsupportedBlockSize(5))
        );
        let mut b = good.clone();
        b.push(0);
        assert_eq!(Manifest::parse(&b), Err(ManifestError::TrailingBytes(1)));
        let mut b = good;
        b[6] = 0xff;
        assert!(matches!(
            Manifest::parse(&b),
            Err(ManifestError::SizeOutOfRange(_))
        ));
        // A folder claiming four billion entries in a few bytes.
        let mut b = b"QDFS\x01\x02".to_vec();
        b.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            Manifest::parse(&b),
            Err(ManifestError::Truncated { .. })
        ));
    }

    #[test]
    fn unsorted_and_bad_names_refused() {
        let entry = |name: &[u8]| {
            let mut v = vec![KIND_FILE];
            v.extend_from_slice(&(name.len() as u16).to_be_bytes());
            v.extend_from_slice(name);
            v.extend_from_slice(&1u64.to_be_bytes());
            v.extend_from_slice(&[0; 32]);
            v
        };
        let folder = |names: &[&[u8]]| {
            let mut v = b"QDFS\x01\x02".to_vec();
            v.extend_from_slice(&(names.len() as u32).to_be_bytes());
            for n in names {
                v.extend(entry(n));
            }
            v
        };
        assert!(Manifest::parse(&folder(&[b"a", b"b"])).is_ok());
        assert_eq!(
            Manifest::parse(&folder(&[b"b", b"a"])),
            Err(ManifestError::Unsorted(1))
        );
        assert_eq!(
            Manifest::parse(&folder(&[b"a", b"a"])),
            Err(ManifestError::Unsorted(1))
        );
        for bad in [
            &b""[..],
            b".",
            b"..",
            b"a/b",
            b"\xff",
            b"a\0",
            b"a\x1b[2Jb",
            b"a\rb",
            b"a\nb",
            b"a\x7f",
            "a\u{0085}".as_bytes(),
            "evil\u{202E}txt.exe".as_bytes(),
            "a\u{2066}b".as_bytes(),
            b"x.qdfs-part",
            b"x.qdfs-state",
        ] {
            assert!(matches!(
                Manifest::parse(&folder(&[bad])),
                Err(ManifestError::BadName { index: 0, .. })
            ));
        }
    }

    #[test]
    fn folder_totals_are_checked() {
        let folder = |sizes: &[u64]| {
            let mut v = b"QDFS\x01\x02".to_vec();
            v.extend_from_slice(&(sizes.len() as u32).to_be_bytes());
            for (i, size) in sizes.iter().enumerate() {
                v.extend_from_slice(&[KIND_FILE, 0, 1, b'a' + i as u8]);
                v.extend_from_slice(&size.to_be_bytes());
                v.extend_from_slice(&[0; 32]);
            }
            v
        };
        // Four entries of 2^62 bytes each add up to 2^64: would overflow.
        assert_eq!(
            Manifest::parse(&folder(&[MAX_FILE_SIZE; 4])),
            Err(ManifestError::TotalOutOfRange)
        );
        // Two add up to more than one file may be.
        assert_eq!(
            Manifest::parse(&folder(&[MAX_FILE_SIZE, 1])),
            Err(ManifestError::TotalOutOfRange)
        );
        let ok = Manifest::parse(&folder(&[MAX_FILE_SIZE - 1, 1])).unwrap();
        assert_eq!(ok.size(), MAX_FILE_SIZE);
        let e = |name: &str| Entry {
            kind: Kind::File,
            name: name.into(),
            size: MAX_FILE_SIZE,
            id: Id([1; 32]),
        };
        assert_eq!(
            FolderManifest::new(vec![e("a"), e("b")]),
            Err(ManifestError::TotalOutOfRange)
        );
    }

    #[test]
    fn garbage_never_panics() {
        // A cheap stand-in for the fuzzer: random bytes and mutations of
        // valid manifests through the fuzz entry point.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let seed = Manifest::Folder(
            FolderManifest::new(vec![Entry {
                kind: Kind::File,
                name: "f".into(),
                size: 3,
                id: Id([2; 32]),
            }])
            .unwrap(),
        )
        .encode();
        for _ in 0..20_000 {
            let mut b = seed.clone();
            let n = (next() % 4) as usize;
            for _ in 0..=n {
                let i = (next() as usize) % b.len();
                b[i] = next() as u8;
            }
            b.truncate((next() as usize) % (b.len() + 1));
            crate::fuzzing::fuzz_manifest(&b);
            let len = (next() % 64) as usize;
            let r: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            crate::fuzzing::fuzz_manifest(&r);
        }
    }
}
