//! NAR parsing (`copy_nar`, what the hook runs over every NAR a builder sends). Asserts: no
//! panic; a NAR that parses is copied byte for byte (exactly the bytes it consumed) and its
//! summary's size and SHA-256 are those bytes'.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nixdock_fuzz::block_on;
use sha2::{Digest, Sha256};

fuzz_target!(|data: &[u8]| {
    block_on(async {
        let mut r = data;
        let mut out = Vec::new();
        if let Ok(s) = hook_protocol::nar::copy_nar(&mut r, &mut out).await {
            let consumed = data.len() - r.len();
            assert_eq!(s.nar_size as usize, consumed);
            assert_eq!(&out[..], &data[..consumed]);
            assert_eq!(s.nar_sha256, <[u8; 32]>::from(Sha256::digest(&out)));
        }
    });
});
