//! `.drv` files (ATerm), which the hook reads for every build. Asserts: no panic; a parsed
//! derivation written back parses to the same value and writes the same bytes again; its
//! wire form (`BasicDerivation`, sent with `BuildDerivation`) reads back the same.
#![no_main]

use bytes::BytesMut;
use hook_protocol::derivation::{BasicDerivation, Derivation};
use libfuzzer_sys::fuzz_target;
use nixdock_fuzz::block_on;

fuzz_target!(|data: &[u8]| {
    let Ok(drv) = Derivation::parse(data) else {
        return;
    };
    let aterm = drv.to_aterm();
    let again = Derivation::parse(aterm.as_bytes()).expect("re-parse written .drv");
    assert_eq!(again, drv);
    assert_eq!(again.to_aterm(), aterm);
    let _ = (
        drv.required_system_features(),
        drv.prefer_local_build(),
        drv.is_builtin(),
    );
    for o in drv.outputs.values() {
        let _ = (o.path(), o.method_and_algo(), o.fixed_hash(), o.validate());
    }
    let basic = drv.to_basic(None);
    let mut buf = BytesMut::new();
    basic.write(&mut buf);
    let read = block_on(BasicDerivation::read(&mut &buf[..])).expect("re-read wire form");
    assert_eq!(read, basic);
});
