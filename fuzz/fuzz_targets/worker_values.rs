//! Worker-protocol values as a daemon sends them, at every negotiated version: path infos
//! (keyed and unkeyed), path sets, build results (keyed, and with 2.35's
//! `realisation-with-path-not-hash`), derived paths, `Missing`, client settings, the
//! handshake info, the trusted flag, a `BasicDerivation`, and realisation JSON.
//!
//! Input: byte 0 picks the version (`version_from`), byte 1 the type, the rest is a sequence
//! of values, decoded until one fails (as upstream's vector files hold several). Asserts: no
//! panic; each value decoded, encoded at the same version, decodes to the same value and
//! encodes to the same bytes.
#![no_main]

use bytes::BytesMut;
use hook_protocol::derivation::BasicDerivation;
use hook_protocol::store_path::{put_store_path_set, read_store_path_set};
use hook_protocol::worker::{
    BuildResult, ClientHandshakeInfo, ClientSettings, DerivedPath, KeyedBuildResult, Missing,
    ProtocolVersion, Realisation, ValidPathInfo, put_trusted_flag, read_trusted_flag,
};
use libfuzzer_sys::fuzz_target;
use nixdock_fuzz::{block_on, version_from};

/// Values decoded from one input at most.
const MAX_VALUES: usize = 32;

/// Decodes values of one type with `$read` (a `&mut &[u8]` reader → `Result<T, _>`) and
/// checks `$write` (value, buffer → `()`) against it.
macro_rules! round_trip {
    ($rest:expr, |$r:ident| $read:expr, |$v:ident, $buf:ident| $write:expr) => {{
        let mut input: &[u8] = $rest;
        for _ in 0..MAX_VALUES {
            let value = {
                let $r = &mut input;
                match $read {
                    Ok(v) => v,
                    Err(_) => break,
                }
            };
            let first = {
                let mut $buf = BytesMut::new();
                let $v = &value;
                $write;
                $buf
            };
            let again = {
                let mut copy: &[u8] = &first[..];
                let $r = &mut copy;
                let again = $read.expect("re-decode an encoded value");
                assert!(copy.is_empty(), "re-decoding left bytes over");
                again
            };
            assert_eq!(again, value);
            let second = {
                let mut $buf = BytesMut::new();
                let $v = &again;
                $write;
                $buf
            };
            assert_eq!(first, second);
        }
    }};
}

fn check(version: ProtocolVersion, kind: u8, rest: &[u8]) {
    let v = version;
    block_on(async {
        match kind % 13 {
            0 => round_trip!(rest, |r| ValidPathInfo::read(r, v).await, |x, b| x
                .write(&mut b, v)),
            1 => {
                // The path of an unkeyed info comes from the request, not the daemon.
                let path = "/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo"
                    .parse()
                    .unwrap();
                round_trip!(
                    rest,
                    |r| ValidPathInfo::read_unkeyed(r, std::clone::Clone::clone(&path), v).await,
                    |x, b| x.write_unkeyed(&mut b, v)
                )
            }
            2 => round_trip!(rest, |r| read_store_path_set(r).await, |x, b| {
                put_store_path_set(&mut b, x)
            }),
            3 => round_trip!(rest, |r| BuildResult::read(r, v).await, |x, b| x
                .write(&mut b, v)),
            4 => round_trip!(
                rest,
                |r| BuildResult::read_with(r, v, true).await,
                |x, b| { x.write_with(&mut b, v, true) }
            ),
            5 => round_trip!(rest, |r| KeyedBuildResult::read(r, v).await, |x, b| {
                x.write(&mut b, v).expect("encode what was decoded")
            }),
            6 => round_trip!(rest, |r| DerivedPath::read(r, v).await, |x, b| {
                x.write(&mut b, v).expect("encode what was decoded")
            }),
            7 => round_trip!(rest, |r| Missing::read(r).await, |x, b| x.write(&mut b)),
            8 => round_trip!(rest, |r| ClientSettings::read(r, v).await, |x, b| {
                x.write(&mut b, v)
            }),
            9 => round_trip!(rest, |r| ClientHandshakeInfo::read(r, v).await, |x, b| {
                x.write(&mut b, v)
            }),
            10 => round_trip!(rest, |r| read_trusted_flag(r).await, |x, b| {
                put_trusted_flag(&mut b, *x)
            }),
            11 => round_trip!(rest, |r| BasicDerivation::read(r).await, |x, b| x
                .write(&mut b)),
            _ => {
                let text = String::from_utf8_lossy(rest);
                if let Ok(real) = Realisation::from_json(None, &text) {
                    let json = real.to_json("sha256:0000000000000000000000000000000000000000000000000000000000000000!out");
                    let again = Realisation::from_json(None, &json).expect("re-read realisation");
                    assert_eq!(again, real, "{json}");
                }
            }
        }
    });
}

fuzz_target!(|data: &[u8]| {
    if let [version, kind, rest @ ..] = data {
        check(version_from(*version), *kind, rest);
    }
});
