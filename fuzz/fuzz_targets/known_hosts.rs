//! OpenSSH known_hosts files (a user's, for their own remote builders). Asserts: no panic on
//! parsing or looking up hosts (plain, `[host]:port`, and the names the input mentions).
#![no_main]

use libfuzzer_sys::fuzz_target;
use nixdock::transport::known_hosts::KnownHosts;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let k = KnownHosts::parse(&text);
    let _ = k.lookup("localhost", 22);
    let _ = k.lookup("127.0.0.1", 2222);
    // Hosts the input itself names, so hashed and pattern entries get matched against.
    for line in text.lines().take(4) {
        if let Some(host) = line.split_whitespace().next() {
            let _ = k.lookup(host.trim_start_matches('@'), 22);
            let _ = k.lookup(host, 2222);
        }
    }
    let _ = k.revoked();
});
