//! The TOML configuration file. Asserts: no panic; an error message is produced for whatever
//! is refused.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use nixdock::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(text, Path::new("/etc/nixdock/nixdock.toml")) {
        Ok(c) => {
            let _ = format!("{c:?}");
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
