//! Test hook: where in `data.mdb` a chosen plaintext was sealed, so a test
//! can flip a byte inside a stored value and be sure it hit one.

use aes_gcm_siv::aead::consts::U12;
use aes_gcm_siv::aead::generic_array::GenericArray;

#[cfg(feature = "test-hooks")]
use std::sync::{
    atomic::{AtomicBool, Ordering},
    Mutex,
};

#[cfg(feature = "test-hooks")]
pub(super) static PROBE_ON: AtomicBool = AtomicBool::new(false);
#[cfg(feature = "test-hooks")]
static PROBE: Mutex<Option<(Vec<u8>, Option<u64>)>> = Mutex::new(None);

/// LMDB's page header before the sealed part of each page (page number
/// and transaction ID; they form the nonce).
const PAGE_HEADER: u64 = 16;

/// Starts watching page seals for `marker`.
pub fn start(marker: &[u8]) {
    *PROBE.lock().unwrap_or_else(|e| e.into_inner()) = Some((marker.to_vec(), None));
    PROBE_ON.store(true, Ordering::Relaxed);
}

/// Stops watching; the file offset of the marker's first byte in the
/// last page sealed with it, if any.
pub fn take() -> Option<u64> {
    PROBE_ON.store(false, Ordering::Relaxed);
    PROBE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .and_then(|(_, at)| at)
}

pub(super) fn observe(nonce: &GenericArray<u8, U12>, page: &[u8]) {
    let mut guard = PROBE.lock().unwrap_or_else(|e| e.into_inner());
    let Some((marker, at)) = guard.as_mut() else {
        return;
    };
    if marker.is_empty() {
        return;
    }
    if let Some(off) = page.windows(marker.len()).position(|w| w == &marker[..]) {
        let mut pgno = [0u8; 8];
        pgno.copy_from_slice(&nonce[..8]);
        let psize = page_size();
        *at = Some(u64::from_le_bytes(pgno) * psize + PAGE_HEADER + off as u64);
    }
}

fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|p| u64::try_from(p).ok())
        .unwrap_or(4096)
}
