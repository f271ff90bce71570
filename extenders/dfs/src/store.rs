//! The local store: what this node provides.
//!
//! Files are not copied: the store keeps each file's manifest, its
//! outboard (the BLAKE3 tree, 0.4 % of the file) and the path of the data,
//! and serves from that path. A file changed after `add` is caught when it
//! is served (the encoder checks every group against the outboard) and is
//! then refused, never sent.
//!
//! ```text
//! DIR/manifests/<id>        manifest bytes (files and folders)
//! DIR/outboards/<id>.obao   post-order outboard of a file
//! DIR/sources/<id>.json     {"path": ..., "size": ...} of a file
//! ```
//! Every file is written under a temporary name, synced and renamed, so a
//! crash leaves either the old state or the new one.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use bao_tree::io::outboard::PostOrderOutboard;
use serde::{Deserialize, Serialize};

use crate::id::Id;
use crate::manifest::{self, Entry, FileManifest, FolderManifest, Kind, Manifest};
use crate::seal::{self, StateKey};
use crate::tree;

/// The label a source record is sealed under (bound to its ID, so a sealed
/// record cannot be moved to another file's name).
fn source_label(id: &Id) -> String {
    format!("source {id}")
}

/// The store in one directory.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
    /// Seals the sources (where provided files are) at rest; `None`: they
    /// are written in the clear (no node answered).
    state: Option<StateKey>,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file-system operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// Hashing a file failed.
    #[error("hashing {path}: {source}")]
    Hash {
        /// The file.
        path: PathBuf,
        /// Why.
        source: tree::HashError,
    },
    /// A folder entry that cannot be shared.
    #[error("{path}: {why}")]
    Unsupported {
        /// The entry.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// A folder manifest could not be built.
    #[error("folder {path}: {source}")]
    Manifest {
        /// The folder.
        path: PathBuf,
        /// Why.
        source: manifest::ManifestError,
    },
    /// Something in the store itself is damaged.
    #[error("store entry {0} is damaged: {1}")]
    Damaged(String, String),
}

/// Where a provided file's bytes live.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Source {
    path: PathBuf,
    size: u64,
}

/// A file ready to serve: its manifest, data and outboard.
#[derive(Debug)]
pub struct ServedFile {
    /// The file's manifest.
    pub manifest: FileManifest,
    /// The data.
    pub data: File,
    /// The BLAKE3 tree.
    pub outboard: PostOrderOutboard<File>,
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { what, path, source }
}

/// Writes `bytes` to `path` atomically (temporary file, sync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let (tmp, mut f) = create_temp(path)?;
    f.write_all(bytes).map_err(io_err("writing", &tmp))?;
    f.sync_all().map_err(io_err("syncing", &tmp))?;
    fs::rename(&tmp, path).map_err(io_err("renaming", &tmp))?;
    Ok(())
}

/// Creates a new temporary file beside `path`, named `<name>.tmp<random>`:
/// always a new file (`O_CREAT|O_EXCL`, plus `O_NOFOLLOW`), so a file or
/// symbolic link planted under a guessed name cannot redirect the write.
pub fn create_temp(path: &Path) -> Result<(PathBuf, File), StoreError> {
    let mut last = None;
    for _ in 0..16 {
        let tmp = tmp_name(path);
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
        {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(io_err("creating", &tmp)(e)),
        }
    }
    let e = last.unwrap_or_else(|| io::Error::other("no free temporary name"));
    Err(io_err("creating", path)(e))
}

fn tmp_name(path: &Path) -> PathBuf {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    // RandomState is seeded from the OS's random source.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp{:016x}", h.finish()));
    path.with_file_name(name)
}

impl Store {
    /// Opens (creating if needed) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        for sub in ["manifests", "outboards", "sources"] {
            let p = dir.join(sub);
            fs::create_dir_all(&p).map_err(io_err("creating", &p))?;
        }
        Ok(Store {
            dir: dir.to_path_buf(),
            state: None,
        })
    }

    /// Seals what the store records about provided files (their paths)
    /// under `state` from now on, and opens what was sealed under it.
    pub fn with_state(mut self, state: Option<StateKey>) -> Store {
        self.state = state;
        self
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn manifest_path(&self, id: &Id) -> PathBuf {
        self.dir.join("manifests").join(id.to_hex())
    }
    fn outboard_path(&self, id: &Id) -> PathBuf {
        self.dir.join("outboards").join(format!("{id}.obao"))
    }
    fn source_path(&self, id: &Id) -> PathBuf {
        self.dir.join("sources").join(format!("{id}.json"))
    }

    /// Adds a file or a folder (recursively); returns its ID and manifest.
    pub fn add(&self, path: &Path) -> Result<(Id, Manifest), StoreError> {
        let meta = fs::metadata(path).map_err(io_err("reading", path))?;
        if meta.is_dir() {
            let f = self.add_folder(path, 0)?;
            let m = Manifest::Folder(f);
            Ok((self.put_manifest(&m)?, m))
        } else if meta.is_file() {
            let (id, f) = self.add_file(path)?;
            Ok((id, Manifest::File(f)))
        } else {
            Err(StoreError::Unsupported {
                path: path.into(),
                why: "neither a file nor a folder".into(),
            })
        }
    }

    /// Hashes and adds one file.
    pub fn add_file(&self, path: &Path) -> Result<(Id, FileManifest), StoreError> {
        let abs = fs::canonicalize(path).map_err(io_err("resolving", path))?;
        let (tmp, ob) = self.temp_outboard("adding")?;
        let m = tree::hash_file(&abs, ob, &tmp).map_err(|source| StoreError::Hash {
            path: abs.clone(),
            source,
        })?;
        self.finish_file(&abs, m, &tmp)
    }

    /// Records a file whose manifest `m` and outboard (at `outboard_tmp`,
    /// moved into the store) are known to match the data at `path`.
    pub fn finish_file(
        &self,
        path: &Path,
        m: FileManifest,
        outboard_tmp: &Path,
    ) -> Result<(Id, FileManifest), StoreError> {
        let manifest = Manifest::File(m);
        let id = manifest.id();
        let ob = self.outboard_path(&id);
        fs::rename(outboard_tmp, &ob).map_err(io_err("renaming", outboard_tmp))?;
        let src = Source {
            path: path.to_path_buf(),
            size: m.size,
        };
        let json = serde_json::to_vec(&src).unwrap_or_default();
        let bytes = match &self.state {
            Some(st) => seal::seal(
                st,
                &source_label(&id),
                crate::owner::random_bytes::<24>(),
                &json,
            )
            .map_err(|e| StoreError::Damaged(id.to_hex(), e.to_string()))?,
            None => json,
        };
        write_atomic(&self.source_path(&id), &bytes)?;
        self.put_manifest(&manifest)?;
        Ok((id, m))
    }

    fn add_folder(&self, path: &Path, depth: usize) -> Result<FolderManifest, StoreError> {
        if depth > 64 {
            return Err(StoreError::Unsupported {
                path: path.into(),
                why: "folders nested deeper than 64".into(),
            });
        }
        let mut entries = Vec::new();
        let rd = fs::read_dir(path).map_err(io_err("listing", path))?;
        for item in rd {
            let item = item.map_err(io_err("listing", path))?;
            let p = item.path();
            let name = item
                .file_name()
                .into_string()
                .map_err(|_| StoreError::Unsupported {
                    path: p.clone(),
                    why: "name is not UTF-8".into(),
                })?;
            let ft = item.file_type().map_err(io_err("reading", &p))?;
            if ft.is_symlink() {
                tracing::warn!(path = %p.display(), "skipping symbolic link");
                continue;
            }
            if ft.is_dir() {
                let f = self.add_folder(&p, depth + 1)?;
                let m = Manifest::Folder(f);
                let size = m.size();
                let id = self.put_manifest(&m)?;
                entries.push(Entry {
                    kind: Kind::Folder,
                    name,
                    size,
                    id,
                });
            } else if ft.is_file() {
                let (id, f) = self.add_file(&p)?;
                entries.push(Entry {
                    kind: Kind::File,
                    name,
                    size: f.size,
                    id,
                });
            } else {
                tracing::warn!(path = %p.display(), "skipping special file");
            }
        }
        FolderManifest::new(entries).map_err(|source| StoreError::Manifest {
            path: path.into(),
            source,
        })
    }

    /// Stores a manifest; returns its ID.
    pub fn put_manifest(&self, m: &Manifest) -> Result<Id, StoreError> {
        let bytes = m.encode();
        let id = Id::of_manifest(&bytes);
        let p = self.manifest_path(&id);
        if !p.exists() {
            write_atomic(&p, &bytes)?;
        }
        Ok(id)
    }

    /// A manifest's bytes, checked against its ID; `None` if not here.
    pub fn manifest_bytes(&self, id: &Id) -> Result<Option<Vec<u8>>, StoreError> {
        let p = self.manifest_path(id);
        match fs::read(&p) {
            Ok(b) if Id::of_manifest(&b) == *id => Ok(Some(b)),
            Ok(_) => Err(StoreError::Damaged(id.to_hex(), "hash mismatch".into())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("reading", &p)(e)),
        }
    }

    /// A manifest, parsed; `None` if not here.
    pub fn manifest(&self, id: &Id) -> Result<Option<Manifest>, StoreError> {
        match self.manifest_bytes(id)? {
            None => Ok(None),
            Some(b) => Manifest::parse(&b)
                .map(Some)
                .map_err(|e| StoreError::Damaged(id.to_hex(), e.to_string())),
        }
    }

    /// Opens a provided file for serving; `None` if it is not provided here
    /// or its data is gone or has changed size.
    pub fn open_file(&self, id: &Id) -> Result<Option<ServedFile>, StoreError> {
        let Some(Manifest::File(m)) = self.manifest(id)? else {
            return Ok(None);
        };
        let sp = self.source_path(id);
        let src: Source = match fs::read(&sp) {
            Ok(b) => {
                let damaged = |e: String| StoreError::Damaged(id.to_hex(), e);
                let b = if seal::is_sealed(&b) {
                    let st = self.state.as_ref().ok_or_else(|| {
                        damaged("sealed under the node's key, and no node answered".into())
                    })?;
                    seal::open(st, &source_label(id), &b).map_err(|e| damaged(e.to_string()))?
                } else {
                    b
                };
                serde_json::from_slice(&b).map_err(|e| damaged(e.to_string()))?
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("reading", &sp)(e)),
        };
        let data = match File::open(&src.path) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(%id, path = %src.path.display(), "provided file unreadable: {e}");
                return Ok(None);
            }
        };
        let len = data.metadata().map_err(io_err("reading", &src.path))?.len();
        if len != m.size || src.size != m.size {
            tracing::warn!(%id, path = %src.path.display(), "provided file changed size");
            return Ok(None);
        }
        let op = self.outboard_path(id);
        let ob = File::open(&op).map_err(io_err("opening", &op))?;
        Ok(Some(ServedFile {
            manifest: m,
            data,
            outboard: PostOrderOutboard {
                root: blake3::Hash::from_bytes(m.root),
                tree: tree::tree(m.size),
                data: ob,
            },
        }))
    }

    /// Every ID with a manifest here (what this node announces).
    pub fn ids(&self) -> Result<Vec<Id>, StoreError> {
        let p = self.dir.join("manifests");
        let mut out = Vec::new();
        for item in fs::read_dir(&p).map_err(io_err("listing", &p))? {
            let item = item.map_err(io_err("listing", &p))?;
            if let Some(id) = item.file_name().to_str().and_then(|s| s.parse().ok()) {
                out.push(id);
            }
        }
        out.sort();
        Ok(out)
    }

    /// A temporary path inside the store for an outboard being built.
    pub fn temp_outboard(&self, tag: &str) -> Result<(PathBuf, File), StoreError> {
        create_temp(&self.dir.join("outboards").join(format!(".{tag}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_ignores_planted_temporaries() {
        let tmp = tempfile::tempdir().unwrap();
        let victim = tmp.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        let target = tmp.path().join("state");
        // The old predictable name, planted as a link to the victim.
        let planted = tmp.path().join(format!("state.tmp{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        write_atomic(&target, b"new").unwrap();
        write_atomic(&target, b"newer").unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert_eq!(fs::read(&target).unwrap(), b"newer");
        assert!(fs::symlink_metadata(&planted).unwrap().is_symlink());
        // The store's outboard while adding a file, likewise.
        let store = Store::open(&tmp.path().join("store")).unwrap();
        let planted = store
            .dir()
            .join(format!("outboards/.adding{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        store.add_file(&target).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        let (p, _) = create_temp(&target).unwrap();
        let (q, _) = create_temp(&target).unwrap();
        assert_ne!(p, q);
    }

    #[test]
    fn add_file_and_folder_then_open() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("store")).unwrap();
        let src = tmp.path().join("src");
        fs::create_dir_all(src.join("sub")).unwrap();
        fs::write(src.join("a.txt"), b"hello").unwrap();
        fs::write(src.join("sub/b.bin"), vec![7u8; 40_000]).unwrap();
        let (id, m) = store.add(&src).unwrap();
        let Manifest::Folder(f) = &m else {
            panic!("not a folder")
        };
        assert_eq!(f.entries.len(), 2);
        assert_eq!(m.size(), 40_005);
        assert_eq!(store.manifest(&id).unwrap(), Some(m.clone()));
        let a = &f.entries[0];
        assert_eq!(a.name, "a.txt");
        let served = store.open_file(&a.id).unwrap().unwrap();
        assert_eq!(served.manifest.root, *blake3::hash(b"hello").as_bytes());
        // Same content, same ID.
        let (again, _) = store.add(&src.join("a.txt")).unwrap();
        assert_eq!(again, a.id);
        assert_eq!(store.ids().unwrap().len(), 4);
        // A file that changed size is no longer served.
        fs::write(src.join("a.txt"), b"hello!").unwrap();
        assert!(store.open_file(&a.id).unwrap().is_none());
        assert!(store.open_file(&id).unwrap().is_none());
    }
}
