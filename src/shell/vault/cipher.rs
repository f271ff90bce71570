//! The page cipher: the AEAD LMDB seals every page of the vault with (why
//! GCM-SIV: see the `vault` module docs).

use aes_gcm_siv::aead::consts::{U0, U12, U16, U32};
use aes_gcm_siv::aead::generic_array::GenericArray;
use aes_gcm_siv::aead::{AeadCore, AeadInPlace, KeyInit, KeySizeUser};
use aes_gcm_siv::Aes256GcmSiv;

#[cfg(feature = "test-hooks")]
use super::probe::{self, PROBE_ON};
#[cfg(feature = "test-hooks")]
use std::sync::atomic::Ordering;

/// The AEAD LMDB seals pages with: AES-256-GCM-SIV (see the module docs for
/// why not plain GCM), wrapped only so a test can learn where a chosen
/// plaintext landed in the file (`probe`).
pub struct PageCipher(Aes256GcmSiv);

impl KeySizeUser for PageCipher {
    type KeySize = U32;
}

impl KeyInit for PageCipher {
    fn new(key: &GenericArray<u8, U32>) -> Self {
        PageCipher(Aes256GcmSiv::new(key))
    }
}

impl AeadCore for PageCipher {
    type NonceSize = U12;
    type TagSize = U16;
    type CiphertextOverhead = U0;
}

impl AeadInPlace for PageCipher {
    fn encrypt_in_place_detached(
        &self,
        nonce: &GenericArray<u8, U12>,
        aad: &[u8],
        buffer: &mut [u8],
    ) -> aes_gcm_siv::aead::Result<GenericArray<u8, U16>> {
        #[cfg(feature = "test-hooks")]
        if PROBE_ON.load(Ordering::Relaxed) {
            probe::observe(nonce, buffer);
        }
        self.0.encrypt_in_place_detached(nonce, aad, buffer)
    }

    fn decrypt_in_place_detached(
        &self,
        nonce: &GenericArray<u8, U12>,
        aad: &[u8],
        buffer: &mut [u8],
        tag: &GenericArray<u8, U16>,
    ) -> aes_gcm_siv::aead::Result<()> {
        self.0.decrypt_in_place_detached(nonce, aad, buffer, tag)
    }
}
