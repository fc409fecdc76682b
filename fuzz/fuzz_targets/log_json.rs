//! `@nix` JSON log lines. Asserts: no panic; a line that parses, written back, parses to the
//! same value.
#![no_main]

use hook_protocol::log::LogLine;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(line) = LogLine::parse_bytes(data) else {
        return;
    };
    let _ = line.id();
    let text = line.to_line();
    let again = LogLine::parse(text.trim_end_matches('\n')).expect("re-parse written line");
    assert_eq!(again, line, "{text}");
    assert_eq!(again.to_json(), line.to_json());
});
