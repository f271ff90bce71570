//! Test hook: where in `data.mdb` a chosen plaintext was sealed, so a test
//! can flip a byte inside a stored value and be sure it hit one.

use std::path::Path;
use std::sync::Mutex;

/// What the probe watches: a marker, and the sealed bytes of the last
/// value whose plaintext held it.
struct Watch {
    marker: Vec<u8>,
    sealed: Option<Vec<u8>>,
}

static PROBE: Mutex<Option<Watch>> = Mutex::new(None);

/// Starts watching seals for `marker`.
pub fn start(marker: &[u8]) {
    *PROBE.lock().unwrap_or_else(|e| e.into_inner()) = Some(Watch {
        marker: marker.to_vec(),
        sealed: None,
    });
}

/// Stops watching; the offset in `file` (a vault's `data.mdb`, after the
/// write committed) of the last sealed value whose plaintext held the
/// marker, if any.
pub fn take(file: &Path) -> Option<u64> {
    let sealed = PROBE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .and_then(|w| w.sealed)?;
    let bytes = std::fs::read(file).ok()?;
    let at = bytes.windows(sealed.len()).position(|w| w == &sealed[..])?;
    u64::try_from(at).ok()
}

pub(super) fn observe(plain: &[u8], sealed: &[u8]) {
    let mut guard = PROBE.lock().unwrap_or_else(|e| e.into_inner());
    let Some(w) = guard.as_mut() else {
        return;
    };
    if !w.marker.is_empty() && plain.windows(w.marker.len()).any(|m| m == &w.marker[..]) {
        w.sealed = Some(sealed.to_vec());
    }
}
