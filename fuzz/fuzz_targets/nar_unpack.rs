//! NAR unpacking into a directory (what the hook does with every output a builder sends).
//! Asserts: no panic; nothing is created outside the destination (a sibling directory stays
//! empty, the parent holds nothing else); on failure nothing is left at the destination; on
//! success dumping the unpacked tree gives back exactly the NAR's bytes (with the case hack
//! off). Inputs of odd length unpack with the case hack on (a NAR's length is a multiple of 8,
//! so seeds run without it and the fuzzer reaches it by adding a byte).
#![no_main]

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use hook_protocol::nar::{DumpOptions, UnpackOptions, dump_path, remove_tree, unpack_nar};
use libfuzzer_sys::fuzz_target;
use nixdock_fuzz::block_on;

/// A private directory per fuzzing process: `<tmp>/nixdock-fuzz-<pid>/{sibling,out}`.
fn base() -> &'static Path {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    BASE.get_or_init(|| {
        let b = std::env::temp_dir().join(format!("nixdock-fuzz-unpack-{}", std::process::id()));
        let _ = remove_tree(&b);
        fs::create_dir_all(b.join("sibling")).expect("fuzz directory");
        b
    })
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .expect("read fuzz directory")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fuzz_target!(|data: &[u8]| {
    let base = base();
    let dest = base.join("out");
    let case_hack = data.len() % 2 == 1;
    block_on(async {
        let mut r = data;
        let res = unpack_nar(&mut r, &dest, UnpackOptions { case_hack }).await;
        match &res {
            Ok(s) => {
                assert_eq!(names(base), ["out", "sibling"]);
                if !case_hack {
                    let mut nar = Vec::new();
                    let d = dump_path(&dest, &mut nar, DumpOptions::default())
                        .await
                        .expect("dump what was unpacked");
                    assert_eq!(d.nar_size, s.nar_size);
                    assert_eq!(&nar[..], &data[..s.nar_size as usize]);
                }
            }
            Err(e) => {
                let _ = e.to_string();
                assert_eq!(names(base), ["sibling"], "left behind after {e}");
            }
        }
        assert!(names(&base.join("sibling")).is_empty());
    });
    remove_tree(&dest).expect("remove the unpacked tree");
});
