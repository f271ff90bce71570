//! Privately stored folders: a folder capability reads exactly one folder.
//!
//! `qdfs store FOLDER` stores each file as its own sealed file and then a
//! **listing**: JSON `{"v":1,"entries":[{"path","size","cap"}]}` naming
//! every file by its path under the folder and its read capability. The
//! listing is sealed and stored like any file, and its index entry is named
//! `FOLDER/` (a trailing slash). A folder capability is the listing's own
//! capability with the text prefix [`PREFIX`] instead of `qdfs:cap:`:
//! whoever holds it reads the listing, and through it every file of that
//! folder, and nothing else.
//!
//! A listing comes from whoever made the capability, so it is checked as
//! hostile before anything is written: at most [`MAX_FILES`] entries, each
//! path 1–[`MAX_DEPTH`] components that each pass the manifest name rules
//! (no `..`, `/`, control characters), no path twice and no path that is
//! also a folder of another; writing never follows a symbolic link.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::Path;

use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::cap::{self, Capability};
use crate::manifest::check_name;
use crate::owner::{self, Net, OwnerError};

/// Text prefix of a folder capability.
pub const PREFIX: &str = "qdfs:folder:";
/// Most files in one listing.
pub const MAX_FILES: usize = 10_000;
/// Deepest path in a listing.
pub const MAX_DEPTH: usize = 64;
/// Largest listing read (bytes of JSON).
pub const MAX_LISTING: u64 = 16 << 20;

/// One file of a folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListingEntry {
    /// Its path under the folder, components joined by `/`.
    pub path: String,
    /// Its size.
    pub size: u64,
    /// Its read capability (`qdfs:cap:`).
    pub cap: String,
}

/// A folder's listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listing {
    /// Format version (1).
    pub v: u32,
    /// The files.
    pub entries: Vec<ListingEntry>,
}

fn bad(why: String) -> OwnerError {
    OwnerError::Index(format!("folder listing: {why}"))
}

impl Listing {
    /// Parses and checks a listing.
    pub fn parse(data: &[u8]) -> Result<Listing, OwnerError> {
        let l: Listing = serde_json::from_slice(data).map_err(|e| bad(e.to_string()))?;
        if l.v != 1 {
            return Err(bad(format!("version {} not supported", l.v)));
        }
        if l.entries.len() > MAX_FILES {
            return Err(bad(format!("more than {MAX_FILES} files")));
        }
        let mut files = HashSet::new();
        let mut dirs = HashSet::new();
        for e in &l.entries {
            let parts: Vec<&str> = e.path.split('/').collect();
            if parts.len() > MAX_DEPTH {
                return Err(bad(format!("{:?} nested deeper than {MAX_DEPTH}", e.path)));
            }
            for p in &parts {
                check_name(p).map_err(|why| bad(format!("{:?}: {why}", e.path)))?;
            }
            for i in 1..parts.len() {
                dirs.insert(parts[..i].join("/"));
            }
            if !files.insert(e.path.clone()) {
                return Err(bad(format!("{:?} named twice", e.path)));
            }
            let c: Capability = e
                .cap
                .parse()
                .map_err(|x| bad(format!("{:?}: {x}", e.path)))?;
            if c.file.size != e.size {
                return Err(bad(format!(
                    "{:?}: size differs from its capability",
                    e.path
                )));
            }
        }
        if let Some(p) = files.iter().find(|f| dirs.contains(*f)) {
            return Err(bad(format!("{p:?} is both a file and a folder")));
        }
        Ok(l)
    }

    /// The listing's bytes.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// The text form of a folder capability for the listing's capability.
pub fn to_text(listing: &Capability) -> String {
    format!(
        "{PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(listing.encode())
    )
}

/// The listing's capability in a folder capability's text form.
pub fn parse_text(s: &str) -> Result<Capability, OwnerError> {
    let b = s
        .trim()
        .strip_prefix(PREFIX)
        .ok_or_else(|| bad("not a folder capability".into()))?;
    format!("{}{b}", cap::PREFIX)
        .parse()
        .map_err(|e| bad(format!("{e}")))
}

/// Creates `dir` (one level; an existing directory is fine, a link is not).
fn make_dir(dir: &Path) -> Result<(), OwnerError> {
    match fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(OwnerError::OutputExists(dir.into())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => fs::create_dir(dir)
            .map_err(|e| OwnerError::Private(crate::private::PrivateError::Io(e))),
        Err(e) => Err(OwnerError::Private(crate::private::PrivateError::Io(e))),
    }
}

/// Reads the folder whose listing `listing` names into the directory
/// `out` (created; an existing one only with `force`); returns the number
/// of files written.
pub fn read(listing: &Capability, out: &Path, force: bool, net: &Net) -> Result<usize, OwnerError> {
    if !force && fs::symlink_metadata(out).is_ok() {
        return Err(OwnerError::OutputExists(out.into()));
    }
    if listing.file.size > MAX_LISTING {
        return Err(bad("larger than allowed".into()));
    }
    let l = Listing::parse(&owner::read_to_vec(listing, net)?)?;
    make_dir(out)?;
    for e in &l.entries {
        let parts: Vec<&str> = e.path.split('/').collect();
        let mut dir = out.to_path_buf();
        for p in &parts[..parts.len() - 1] {
            dir.push(p);
            make_dir(&dir)?;
        }
        let c: Capability = e.cap.parse().map_err(|x| bad(format!("{x}")))?;
        owner::read(&c, &dir.join(parts[parts.len() - 1]), force, net)?;
    }
    Ok(l.entries.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cap::ShareRef;
    use crate::private::{Scheme, SealedFile};

    fn cap(size: u64) -> Capability {
        Capability {
            file: SealedFile {
                key: [1; 32],
                prefix: [2; 16],
                scheme: Scheme { k: 1, n: 2 },
                size,
            },
            shares: vec![
                ShareRef {
                    root: [3; 32],
                    hints: vec![],
                };
                2
            ],
        }
    }

    fn listing(paths: &[&str]) -> Vec<u8> {
        Listing {
            v: 1,
            entries: paths
                .iter()
                .map(|p| ListingEntry {
                    path: p.to_string(),
                    size: 5,
                    cap: cap(5).to_text(),
                })
                .collect(),
        }
        .encode()
    }

    #[test]
    fn hostile_listings_are_refused() {
        assert!(Listing::parse(&listing(&["a.txt", "sub/b.bin"])).is_ok());
        for paths in [
            &["../etc/passwd"][..],
            &["a/../../x"],
            &["/abs"],
            &["a//b"],
            &[""],
            &["a", "a"],
            &["a", "a/b"],
            &["x\u{1b}[2J"],
        ] {
            assert!(Listing::parse(&listing(paths)).is_err(), "{paths:?}");
        }
        let deep = vec!["d"; MAX_DEPTH + 1].join("/");
        assert!(Listing::parse(&listing(&[deep.as_str()])).is_err());
        let mut wrong = Listing::parse(&listing(&["a"])).unwrap();
        wrong.entries[0].size = 6;
        assert!(Listing::parse(&wrong.encode()).is_err());
        assert!(Listing::parse(b"garbage").is_err());
    }

    #[test]
    fn text_form_round_trip() {
        let c = cap(9);
        let t = to_text(&c);
        assert!(t.starts_with(PREFIX));
        assert_eq!(parse_text(&t).unwrap(), c);
        assert!(parse_text(&c.to_text()).is_err());
    }
}
