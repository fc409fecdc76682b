//! `remove_tree` racing a symlink swap (issue 12, finding 6): the store is group-writable by
//! the build users, so while root removes a leftover, a build user can swap a subdirectory of
//! it for a symlink to anywhere. A racing thread swaps the two as fast as it can
//! (`renameat2(RENAME_EXCHANGE)`, atomic); the canary outside the tree must survive every try,
//! and the outside directory's mode must stay as it was.

#![cfg(target_os = "linux")]

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use hook_protocol::nar::remove_tree;

const TRIES: usize = 300;

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

#[test]
fn deletion_racing_a_symlink_swap_stays_inside_the_tree() {
    let base = tempfile::tempdir().unwrap();
    let outside = base.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o755)).unwrap();
    let canary = outside.join("canary");
    let (mut deleted, mut chmodded, mut failed, mut swaps_total) = (0, 0, 0, 0);
    for i in 0..TRIES {
        std::fs::write(&canary, b"alive").unwrap();
        // The leftover: tree/sub/{canary, f0..f31}. The attacker's symlink to the outside
        // directory waits beside the tree (the store is one directory: anywhere in it will do)
        // and is exchanged with tree/sub over and over.
        let tree = base.path().join(format!("tree{i}"));
        let sub = tree.join("sub");
        let lnk = base.path().join(format!("lnk{i}"));
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(sub.join("canary"), b"inside").unwrap();
        for n in 0..32 {
            std::fs::write(sub.join(format!("f{n}")), b"x").unwrap();
        }
        symlink(&outside, &lnk).unwrap();
        // Read-only like a store tree, so the removal has to make directories writable.
        std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o555)).unwrap();

        let stop = Arc::new(AtomicBool::new(false));
        let swaps = Arc::new(AtomicU64::new(0));
        let racer = {
            let (stop, swaps) = (stop.clone(), swaps.clone());
            let (a, b) = (cstr(&sub), cstr(&lnk));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    // SAFETY: NUL-terminated paths.
                    let r = unsafe {
                        libc::renameat2(
                            libc::AT_FDCWD,
                            a.as_ptr(),
                            libc::AT_FDCWD,
                            b.as_ptr(),
                            libc::RENAME_EXCHANGE,
                        )
                    };
                    if r == 0 {
                        swaps.fetch_add(1, Ordering::Relaxed);
                    } else {
                        std::thread::yield_now();
                    }
                }
            })
        };
        // Let the racer get going before the removal starts.
        while swaps.load(Ordering::Relaxed) < 2 {
            std::thread::yield_now();
        }
        // The removal may fail (the tree keeps changing under it); it must never reach out.
        if remove_tree(&tree).is_err() {
            failed += 1;
        }
        stop.store(true, Ordering::Relaxed);
        racer.join().unwrap();
        swaps_total += swaps.load(Ordering::Relaxed);
        if !canary.exists() {
            deleted += 1;
        }
        let mode = std::fs::metadata(&outside).unwrap().permissions().mode() & 0o7777;
        if mode != 0o755 {
            chmodded += 1;
            std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        // Clean up what is left (the racer has stopped): never through the symlink.
        for p in [&sub, &lnk] {
            if std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir()) {
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
            }
        }
        let _ = std::fs::remove_dir_all(&tree);
        let _ = std::fs::remove_file(&lnk);
        let _ = std::fs::remove_dir_all(&lnk);
    }
    println!(
        "{TRIES} tries, {swaps_total} swaps: canary deleted {deleted}×, outside chmodded \
         {chmodded}×, removal failed {failed}×"
    );
    assert_eq!(deleted, 0, "the canary outside the tree was deleted");
    assert_eq!(chmodded, 0, "the directory outside the tree was chmodded");
}
