//! Nix's `builders` setting / machines file text (from the parent's settings or a file).
//! Asserts: no panic; every machine parsed has a non-empty store URI.
#![no_main]

use std::collections::BTreeSet;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let systems: BTreeSet<String> = ["x86_64-linux".to_string()].into();
    if let Ok(machines) = hook_protocol::machines::parse_text(&systems, &text) {
        for m in &machines {
            let _ = m.system_supported("aarch64-linux");
            let _ = m.mandatory_met(&BTreeSet::new());
        }
    }
});
