//! The page cipher: the AEAD LMDB sealed every page of a vault with before
//! values were sealed one by one (`Format::Pages`). Kept to read such a
//! vault once, for its upgrade (`pages`).

use aes_gcm_siv::aead::consts::{U0, U12, U16, U32};
use aes_gcm_siv::aead::generic_array::GenericArray;
use aes_gcm_siv::aead::{AeadCore, AeadInPlace, KeyInit, KeySizeUser};
use aes_gcm_siv::Aes256GcmSiv;

/// The AEAD LMDB sealed pages with: AES-256-GCM-SIV, because LMDB takes
/// each page's nonce from its page number and transaction ID, and a crash
/// between pages reaching the disk and the commit makes the next
/// transaction reuse that ID for different contents (GCM-SIV then shows
/// only that two pages were equal; GCM would leak its authentication key).
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
