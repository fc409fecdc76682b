//! The worker-protocol client against a hostile daemon: everything the daemon sends — the
//! handshake reply, the stderr loop (log messages, activities, results, `STDERR_READ`,
//! errors), and each operation's reply — comes from the input; what the client writes goes
//! nowhere.
//!
//! Input: byte 0 picks the version the client offers (`version_from`); bytes 1 and 2 pick four
//! operations in a row (three bits each, bits 0–5), and byte 1's top bit whether the handshake
//! reply comes from the input too (else a valid one at the offered version is prepended, so
//! the fuzzer starts at the operations). Asserts: no panic; a broken connection is never used again (each call after
//! an error fails at once).
#![no_main]

use std::collections::BTreeSet;

use bytes::BytesMut;
use hook_protocol::derivation::BasicDerivation;
use hook_protocol::hash::Hash;
use hook_protocol::store_path::StorePath;
use hook_protocol::wire;
use hook_protocol::worker::{
    BuildMode, ClientHandshakeInfo, ClientSettings, DerivedPath, LogEvent, OutputsSpec,
    ProtocolVersion, STDERR_LAST, ValidPathInfo, WORKER_MAGIC_2, WorkerClient,
};
use libfuzzer_sys::fuzz_target;
use nixdock_fuzz::{block_on, version_from};

/// A valid handshake reply at `v`, ending with an empty stderr loop.
fn handshake_reply(v: ProtocolVersion) -> BytesMut {
    let mut b = BytesMut::new();
    wire::put_u64(&mut b, WORKER_MAGIC_2);
    wire::put_u64(&mut b, v.to_wire());
    if v.minor() >= 38 {
        wire::put_strings(&mut b, std::iter::empty::<&str>());
    }
    ClientHandshakeInfo {
        daemon_nix_version: Some("2.26.3".into()),
        trusted: Some(true),
    }
    .write(&mut b, v);
    wire::put_u64(&mut b, STDERR_LAST);
    b
}

fn path(s: &str) -> StorePath {
    StorePath::from_base_name(s).expect("a valid store path")
}

fn log(e: LogEvent) {
    let _ = e.log_line();
}

async fn run(offered: ProtocolVersion, ops: [u8; 4], stream: &[u8]) {
    let client = WorkerClient::handshake_with(stream, tokio::io::sink(), offered, &mut log).await;
    let Ok(mut c) = client else { return };
    let _ = (
        c.version(),
        c.daemon_nix_version(),
        c.trusted(),
        c.daemon_features(),
    );
    let out = path("g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo");
    let drv = path("g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo.drv");
    for op in ops {
        let broken = c.is_broken();
        let failed = match op {
            0 => c.query_path_info(&out, &mut log).await.is_err(),
            1 => c
                .query_valid_paths(&[out.clone()].into(), false, &mut log)
                .await
                .is_err(),
            2 => {
                let mut sink = tokio::io::sink();
                c.nar_from_path(&out, &mut sink, &mut log).await.is_err()
            }
            3 => {
                let basic = BasicDerivation::default();
                c.build_derivation(&drv, &basic, BuildMode::Normal, &mut log)
                    .await
                    .is_err()
            }
            4 => {
                let paths = [DerivedPath::Built {
                    drv_path: drv.clone(),
                    outputs: OutputsSpec::All,
                }];
                c.build_paths_with_results(&paths, BuildMode::Normal, &mut log)
                    .await
                    .is_err()
            }
            5 => c
                .query_missing(&[DerivedPath::Opaque(out.clone())], &mut log)
                .await
                .is_err(),
            6 => c
                .set_options(&ClientSettings::default(), &mut log)
                .await
                .is_err(),
            _ => {
                // STDERR_READ is answered from this NAR.
                let nar = b"\x0d\0\0\0\0\0\0\0nix-archive-1\0\0\0";
                let info = ValidPathInfo::new(out.clone(), Hash::sha256([0; 32]), 40);
                c.add_to_store_nar(&info, &mut &nar[..], false, true, &mut log)
                    .await
                    .is_err()
            }
        };
        if broken {
            assert!(failed, "a broken connection was used again");
        }
        if failed {
            let _ = c.is_valid_path(&out, &mut log).await;
        }
    }
    let _: BTreeSet<String> = c.features().clone();
}

fuzz_target!(|data: &[u8]| {
    let [version, a, b, rest @ ..] = data else {
        return;
    };
    let offered = version_from(*version);
    let ops = [a & 7, (a >> 3) & 7, b & 7, (b >> 3) & 7];
    block_on(async {
        if a & 0x80 != 0 {
            run(offered, ops, rest).await;
        } else {
            let mut stream = handshake_reply(offered);
            stream.extend_from_slice(rest);
            run(offered, ops, &stream).await;
        }
    });
});
