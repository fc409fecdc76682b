//! `local_store::OutputImporter` against the real local store (`/nix/store`, Nix 2.8 from
//! Debian's nix-bin). Needs root and `nix-store` on PATH: without them these tests fail when `CI`
//! is set ("run scripts/testbed") and are skipped with a note otherwise.
//!
//! Store paths are made up (`/nix/store/<random>-nixdock-test-…`): `--register-validity` does not
//! check that an input-addressed path matches its contents. Every test deletes what it
//! registered.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

use hook_protocol::hash::HashAlgo;
use hook_protocol::hash::{Hash, nix32_encode};
use hook_protocol::nar::{DumpOptions, dump_path};
use hook_protocol::store_path::{ContentAddressMethod, StorePath, make_fixed_output_path};
use hook_protocol::worker::ValidPathInfo;
use nixdock::local_store::ca_column::CaColumnError;
use nixdock::local_store::{ContentAddress, ImportError, OutputImporter, PathInfo, STAGING_PREFIX};
use sha2::{Digest, Sha256};

const STORE: &str = "/nix/store";

/// The tests look for leftover staging directories in the store, so they run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `nix-store`, if this machine can run these tests.
fn nix_store(test: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("nix-store"))
            .find(|p| p.is_file())
    });
    let is_root = fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false);
    let problem = match (&found, is_root, Path::new(STORE).is_dir()) {
        (None, _, _) => Some("nix-store is not on PATH"),
        (_, false, _) => Some("not running as root"),
        (_, _, false) => Some("/nix/store does not exist"),
        _ => None,
    };
    if let Some(p) = problem {
        if std::env::var_os("CI").is_some() {
            panic!("{test}: {p}; run scripts/testbed (as root) to set up Nix");
        }
        eprintln!("{test}: SKIPPED: {p} (run scripts/testbed, as root)");
        return None;
    }
    found
}

/// A fresh, syntactically valid store path that nothing else uses.
fn sp(path: &str) -> StorePath {
    StorePath::from_absolute(path).unwrap()
}

fn fake_store_path(name: &str) -> String {
    let mut h = Sha256::new();
    h.update(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
            .to_le_bytes(),
    );
    h.update(std::process::id().to_le_bytes());
    h.update(name.as_bytes());
    let mut random = [0u8; 16];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut random))
        .unwrap();
    h.update(random);
    format!(
        "{STORE}/{}-nixdock-test-{name}",
        nix32_encode(&h.finalize()[..20])
    )
}

fn ns(nix_store: &Path, args: &[&str]) -> std::process::Output {
    Command::new(nix_store).args(args).output().unwrap()
}

fn ns_ok(nix_store: &Path, args: &[&str]) -> String {
    let out = ns(nix_store, args);
    assert!(
        out.status.success(),
        "nix-store {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn is_valid(nix_store: &Path, p: &str) -> bool {
    ns(nix_store, &["--check-validity", p]).status.success()
}

/// Leftover staging directories of this process's importers.
fn staging_dirs() -> Vec<PathBuf> {
    fs::read_dir(STORE)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(STAGING_PREFIX)
        })
        .collect()
}

/// A tree with unique content, its NAR and path info.
async fn make_output(dir: &Path, name: &str, path: &str) -> (Vec<u8>, PathInfo) {
    let root = dir.join(name);
    fs::create_dir(&root).unwrap();
    fs::write(root.join("unique"), path.as_bytes()).unwrap();
    fs::create_dir(root.join("bin")).unwrap();
    fs::write(root.join("bin/tool"), b"#!/bin/sh\necho tool\n").unwrap();
    fs::set_permissions(root.join("bin/tool"), fs::Permissions::from_mode(0o755)).unwrap();
    symlink("bin/tool", root.join("link")).unwrap();
    let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    fs::write(root.join("big"), big).unwrap();
    nar_of(&root, path).await
}

async fn nar_of(root: &Path, path: &str) -> (Vec<u8>, PathInfo) {
    let mut nar = Vec::new();
    let s = dump_path(root, &mut nar, DumpOptions::default())
        .await
        .unwrap();
    let info = PathInfo {
        info: ValidPathInfo::new(sp(path), Hash::sha256(s.nar_sha256), s.nar_size),
        ca: None,
    };
    (nar, info)
}

/// Deletes test paths (together, so references among them don't matter).
fn delete(nix_store: &Path, paths: &[&str]) {
    let mut args = vec!["--delete"];
    args.extend(paths.iter().copied().filter(|p| is_valid(nix_store, p)));
    if args.len() > 1 {
        ns_ok(nix_store, &args);
    }
    for p in paths {
        assert!(!Path::new(p).exists(), "{p} still exists after --delete");
    }
}

#[tokio::test]
async fn imports_and_registers_paths_with_references() {
    let Some(nix_store) = nix_store("imports_and_registers_paths_with_references") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let t = tempfile::tempdir().unwrap();
    let out = fake_store_path("out");
    let lib = fake_store_path("lib");
    let drv = format!("{}.drv", fake_store_path("drv"));
    let (out_nar, mut out_info) = make_output(t.path(), "out", &out).await;
    // A single-file output.
    fs::write(t.path().join("lib"), lib.as_bytes()).unwrap();
    let (lib_nar, lib_info) = nar_of(&t.path().join("lib"), &lib).await;
    // out refers to itself and to lib, which is registered in the same call (and added after).
    out_info.info.references = [sp(&out), sp(&lib)].into();
    out_info.info.deriver = Some(sp(&drv));

    let mut imp = OutputImporter::new(Path::new(STORE), false).unwrap();
    imp.add(out_info.clone(), &out_nar[..]).await.unwrap();
    imp.add(lib_info.clone(), &lib_nar[..]).await.unwrap();
    assert!(!Path::new(&out).exists(), "nothing is moved before commit");
    imp.commit(&nix_store).await.unwrap();

    for (p, info) in [(&out, &out_info), (&lib, &lib_info)] {
        ns_ok(&nix_store, &["--check-validity", p]);
        let hash = ns_ok(&nix_store, &["-q", "--hash", p]);
        assert_eq!(hash.trim(), info.info.nar_hash.to_string());
        let size = ns_ok(&nix_store, &["-q", "--size", p]);
        assert_eq!(size.trim(), info.info.nar_size.to_string());
        let refs: BTreeSet<String> = ns_ok(&nix_store, &["-q", "--references", p])
            .lines()
            .map(str::to_string)
            .collect();
        let want: BTreeSet<String> = info
            .info
            .references
            .iter()
            .map(|r| r.to_absolute())
            .collect();
        assert_eq!(refs, want);
        ns_ok(&nix_store, &["--verify-path", p]);
    }
    let deriver = ns_ok(&nix_store, &["-q", "--deriver", &out]);
    assert_eq!(deriver.trim(), drv);
    // Canonical metadata.
    let md = fs::symlink_metadata(&out).unwrap();
    assert_eq!(md.mode() & 0o7777, 0o555);
    assert_eq!(md.mtime(), 1);
    let tool = fs::metadata(format!("{out}/bin/tool")).unwrap();
    assert_eq!(tool.mode() & 0o7777, 0o555);
    assert_eq!(tool.mtime(), 1);
    assert_eq!(fs::read(format!("{out}/unique")).unwrap(), out.as_bytes());
    assert_eq!(fs::read(&lib).unwrap(), lib.as_bytes());
    assert!(staging_dirs().is_empty(), "{:?}", staging_dirs());

    // Importing an already-valid path again keeps it (and succeeds).
    let mut imp = OutputImporter::new(Path::new(STORE), false).unwrap();
    imp.add(lib_info.clone(), &lib_nar[..]).await.unwrap();
    imp.commit(&nix_store).await.unwrap();
    ns_ok(&nix_store, &["--verify-path", &lib]);

    delete(&nix_store, &[&out, &lib]);
}

#[tokio::test]
async fn wrong_hash_or_size_leaves_nothing() {
    let Some(nix_store) = nix_store("wrong_hash_or_size_leaves_nothing") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let t = tempfile::tempdir().unwrap();
    let p = fake_store_path("badhash");
    let (nar, info) = make_output(t.path(), "x", &p).await;

    let mut bad_hash = info.clone();
    let mut digest = [0u8; 32];
    digest.copy_from_slice(info.info.nar_hash.digest());
    digest[0] ^= 1;
    bad_hash.info.nar_hash = Hash::sha256(digest);
    let mut bad_size = info.clone();
    bad_size.info.nar_size += 8;
    let mut too_small = info.clone();
    too_small.info.nar_size -= 8;
    for bad in [bad_hash, bad_size, too_small] {
        let mut imp = OutputImporter::new(Path::new(STORE), false).unwrap();
        let err = imp.add(bad.clone(), &nar[..]).await.unwrap_err();
        if bad.info.nar_size < info.info.nar_size {
            // Reading stops at the announced size.
            assert!(matches!(err, ImportError::TooLong { .. }), "{err}");
        } else {
            assert!(matches!(err, ImportError::Mismatch { .. }), "{err}");
        }
        assert!(staging_dirs().is_empty(), "staging removed at once");
        // The importer stays usable, and commits nothing.
        imp.commit(&nix_store).await.unwrap();
        assert!(fs::symlink_metadata(&p).is_err());
        assert!(!is_valid(&nix_store, &p));
    }
}

#[tokio::test]
async fn corrupted_content_of_the_right_size_is_a_mismatch() {
    let Some(nix_store) = nix_store("corrupted_content_of_the_right_size_is_a_mismatch") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let t = tempfile::tempdir().unwrap();
    let p = fake_store_path("corrupt");
    let (mut nar, info) = make_output(t.path(), "x", &p).await;
    // One byte in the middle of the 300 kB file's contents: still a well-formed NAR of the
    // announced size, so only the hash (computed on its own thread beside the unpacking) can
    // tell.
    let i = nar.len() / 2;
    nar[i] ^= 0x55;
    let mut imp = OutputImporter::new(Path::new(STORE), false).unwrap();
    let err = imp.add(info, &nar[..]).await.unwrap_err();
    assert!(matches!(err, ImportError::Mismatch { .. }), "{err}");
    assert!(staging_dirs().is_empty(), "staging removed at once");
    imp.commit(&nix_store).await.unwrap();
    assert!(fs::symlink_metadata(&p).is_err());
    assert!(!is_valid(&nix_store, &p));
}

#[tokio::test]
async fn truncated_nar_leaves_nothing() {
    let Some(nix_store) = nix_store("truncated_nar_leaves_nothing") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let t = tempfile::tempdir().unwrap();
    let p = fake_store_path("truncated");
    let (nar, info) = make_output(t.path(), "x", &p).await;
    let mut imp = OutputImporter::new(Path::new(STORE), false).unwrap();
    // Cut in the middle of the 300 kB file.
    let err = imp
        .add(info, &nar[..nar.len() - 100_000])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ImportError::Nar { source, .. } if source.is_truncated()),
        "{err}"
    );
    drop(imp);
    assert!(staging_dirs().is_empty());
    assert!(fs::symlink_metadata(&p).is_err());
    assert!(!is_valid(&nix_store, &p));
}

#[tokio::test]
async fn failed_registration_removes_moved_paths() {
    let Some(nix_store) = nix_store("failed_registration_removes_moved_paths") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let t = tempfile::tempdir().unwrap();
    let a = fake_store_path("a");
    let b = fake_store_path("b");
    let missing = fake_store_path("never-registered");
    let (a_nar, a_info) = make_output(t.path(), "a", &a).await;
    let (b_nar, mut b_info) = make_output(t.path(), "b", &b).await;
    b_info.info.references = [sp(&missing)].into();

    let mut imp = OutputImporter::new(Path::new(STORE), false).unwrap();
    imp.add(a_info, &a_nar[..]).await.unwrap();
    imp.add(b_info, &b_nar[..]).await.unwrap();
    let err = imp.commit(&nix_store).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            ImportError::CaColumn(CaColumnError::ReferenceNotValid { .. })
        ),
        "{msg}"
    );
    eprintln!("expected failure: {msg}");
    assert!(
        msg.contains(&missing),
        "the error names the reference: {msg}"
    );
    for p in [&a, &b] {
        assert!(fs::symlink_metadata(p).is_err(), "{p} was left on disk");
        assert!(!is_valid(&nix_store, p), "{p} was left registered");
    }
    assert!(staging_dirs().is_empty());
}

#[tokio::test]
async fn invalid_leftover_is_replaced() {
    let Some(nix_store) = nix_store("invalid_leftover_is_replaced") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let t = tempfile::tempdir().unwrap();
    let p = fake_store_path("leftover");
    // A half-written, read-only, unregistered tree at the final path (e.g. a killed hook).
    fs::create_dir(&p).unwrap();
    fs::create_dir(format!("{p}/junk")).unwrap();
    fs::write(format!("{p}/junk/file"), b"junk").unwrap();
    fs::set_permissions(format!("{p}/junk"), fs::Permissions::from_mode(0o555)).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o555)).unwrap();
    assert!(!is_valid(&nix_store, &p));

    let (nar, info) = make_output(t.path(), "x", &p).await;
    let mut imp = OutputImporter::new(Path::new(STORE), false).unwrap();
    imp.add(info, &nar[..]).await.unwrap();
    imp.commit(&nix_store).await.unwrap();
    ns_ok(&nix_store, &["--verify-path", &p]);
    assert!(!Path::new(&format!("{p}/junk")).exists());
    delete(&nix_store, &[&p]);
}

#[tokio::test]
async fn dropping_an_importer_removes_its_staging() {
    let Some(_nix_store) = nix_store("dropping_an_importer_removes_its_staging") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let t = tempfile::tempdir().unwrap();
    let p = fake_store_path("dropped");
    let (nar, info) = make_output(t.path(), "x", &p).await;
    let mut imp = OutputImporter::new(Path::new(STORE), false).unwrap();
    imp.add(info, &nar[..]).await.unwrap();
    assert_eq!(staging_dirs().len(), 1);
    drop(imp);
    assert!(staging_dirs().is_empty());
    assert!(fs::symlink_metadata(&p).is_err());
}

#[tokio::test]
async fn bad_path_infos_are_rejected() {
    let Some(_nix_store) = nix_store("bad_path_infos_are_rejected") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let t = tempfile::tempdir().unwrap();
    let p = fake_store_path("ok");
    let (nar, info) = make_output(t.path(), "x", &p).await;
    let mut imp = OutputImporter::new(Path::new(STORE), false).unwrap();
    // A path info holds `StorePath`s: paths like these are refused where they are parsed
    // (from the builder's reply, the `.drv`, Nix's request) and never reach the importer.
    for bad in [
        "/nix/store/../etc/passwd".to_string(),
        "/tmp/00000000000000000000000000000000-x".to_string(),
        format!("{p}/sub"),
        format!("{p}\n/nix/store/00000000000000000000000000000000-x"),
        "/etc".to_string(),
        "relative.drv".to_string(),
    ] {
        assert!(StorePath::from_absolute(&bad).is_err(), "{bad:?}");
    }
    imp.add(info.clone(), &nar[..]).await.unwrap();
    let err = imp.add(info, &nar[..]).await.unwrap_err();
    assert!(matches!(err, ImportError::Duplicate(_)), "{err}");
    drop(imp);
    assert!(staging_dirs().is_empty());
}

/// The hook's path: outputs it found invalid under the parent's output locks are committed
/// without a validity check; an invalid leftover at the destination is still replaced.
#[tokio::test]
async fn commit_locked_invalid_registers_and_replaces_leftovers() {
    let Some(nix_store) = nix_store("commit_locked_invalid_registers_and_replaces_leftovers")
    else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let t = tempfile::tempdir().unwrap();
    let out = fake_store_path("locked-out");
    let (out_nar, out_info) = make_output(t.path(), "out", &out).await;
    // What a killed earlier import may leave: unregistered files at the destination.
    fs::write(&out, b"leftover").unwrap();

    let mut imp = OutputImporter::new(Path::new(STORE), false).unwrap();
    imp.add(out_info.clone(), &out_nar[..]).await.unwrap();
    imp.commit_locked_invalid(&nix_store).await.unwrap();

    ns_ok(&nix_store, &["--check-validity", &out]);
    ns_ok(&nix_store, &["--verify-path", &out]);
    let hash = ns_ok(&nix_store, &["-q", "--hash", &out]);
    assert_eq!(hash.trim(), out_info.info.nar_hash.to_string());
    assert_eq!(fs::read(format!("{out}/unique")).unwrap(), out.as_bytes());
    assert!(staging_dirs().is_empty(), "{:?}", staging_dirs());
    delete(&nix_store, &[&out]);
}

/// A flat fixed output: unique content, the store path its hash gives, its NAR and path info.
async fn fixed_output(dir: &Path, name: &str) -> (String, Vec<u8>, PathInfo) {
    let content = format!("{}\n", fake_store_path(name));
    let hash = Hash::sha256_of(content.as_bytes());
    let path = make_fixed_output_path(ContentAddressMethod::Flat, &hash, name)
        .unwrap()
        .to_string();
    let f = dir.join(name);
    fs::write(&f, &content).unwrap();
    let (nar, mut info) = nar_of(&f, &path).await;
    info.ca = Some(ContentAddress {
        method: ContentAddressMethod::Flat,
        hash,
    });
    (format!("fixed:sha256:{}", hash.to_nix32()), nar, info)
}

/// A fixed output is registered with its content address, which makes it self-certifying.
#[tokio::test]
async fn fixed_output_is_registered_with_its_ca() {
    let Some(nix_store) = nix_store("fixed_output_is_registered_with_its_ca") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let t = tempfile::tempdir().unwrap();
    let (ca, nar, info) = fixed_output(t.path(), "nixdock-test-fixed").await;
    assert_eq!(HashAlgo::Sha256, info.ca.unwrap().hash.algo());
    let p = info.info.path.to_absolute();
    let mut imp = OutputImporter::new(Path::new(STORE), false).unwrap();
    imp.add(info, &nar[..]).await.unwrap();
    imp.commit_locked_invalid(&nix_store).await.unwrap();
    let nix = |args: &[&str]| {
        let mut all = vec!["--extra-experimental-features", "nix-command"];
        all.extend_from_slice(args);
        let o = Command::new("nix").args(&all).output().unwrap();
        assert!(o.status.success(), "nix {args:?}: {o:?}");
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let json = nix(&["path-info", "--json", &p]);
    assert!(json.contains(&format!("\"ca\":\"{ca}\"")), "{json}");
    nix(&["store", "verify", "--sigs-needed", "1", &p]);
    delete(&nix_store, &[&p]);
}

/// A database whose schema version nixdock does not know is refused before anything is
/// registered or moved into the store.
#[tokio::test]
async fn unknown_schema_registers_nothing() {
    let Some(nix_store) = nix_store("unknown_schema_registers_nothing") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let t = tempfile::tempdir().unwrap();
    let (_, nar, info) = fixed_output(t.path(), "nixdock-test-schema").await;
    let p = info.info.path.to_absolute();
    let state = t.path().join("state");
    fs::create_dir_all(state.join("db")).unwrap();
    fs::write(state.join("db/schema"), "11").unwrap();
    let mut imp = OutputImporter::new(Path::new(STORE), false).unwrap();
    imp.set_state_dir(&state);
    imp.add(info, &nar[..]).await.unwrap();
    let e = imp.commit_locked_invalid(&nix_store).await.unwrap_err();
    assert!(
        matches!(
            e,
            ImportError::CaColumn(CaColumnError::UnknownSchema { .. })
        ),
        "{e}"
    );
    assert!(e.to_string().contains("'11'"), "{e}");
    assert!(!is_valid(&nix_store, &p));
    assert!(fs::symlink_metadata(&p).is_err());
    assert!(staging_dirs().is_empty(), "{:?}", staging_dirs());
}

/// One path's row in the Nix database, as `(hash, deriver, narSize, ultimate, sigs, ca,
/// registrationTime)`, and its references (the path itself shown as `SELF`).
type DbRow = (
    String,
    Option<String>,
    Option<i64>,
    Option<i64>,
    Option<String>,
    Option<String>,
    i64,
);

fn db_row(p: &str) -> (DbRow, BTreeSet<String>) {
    let db = rusqlite::Connection::open_with_flags(
        "/nix/var/nix/db/db.sqlite",
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let row: DbRow = db
        .query_row(
            "SELECT hash, deriver, narSize, ultimate, sigs, ca, registrationTime \
             FROM ValidPaths WHERE path = ?1",
            [p],
            |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                ))
            },
        )
        .unwrap();
    let mut stmt = db
        .prepare(
            "SELECT b.path FROM Refs r JOIN ValidPaths a ON r.referrer = a.id \
             JOIN ValidPaths b ON r.reference = b.id WHERE a.path = ?1",
        )
        .unwrap();
    let refs = stmt
        .query_map([p], |r| r.get::<_, String>(0))
        .unwrap()
        .map(|r| {
            let r = r.unwrap();
            if r == p { "SELF".to_string() } else { r }
        })
        .collect();
    (row, refs)
}

/// The same tree at `root`: a file, an executable, a directory and a symlink.
fn same_tree(root: &Path) {
    fs::create_dir(root).unwrap();
    fs::write(root.join("data"), b"the same content\n").unwrap();
    fs::create_dir(root.join("bin")).unwrap();
    fs::write(root.join("bin/tool"), b"#!/bin/sh\necho tool\n").unwrap();
    fs::set_permissions(root.join("bin/tool"), fs::Permissions::from_mode(0o755)).unwrap();
    symlink("bin/tool", root.join("link")).unwrap();
}

/// The importer registers a path with exactly the database rows `nix-store --register-validity
/// --hash-given` writes for the same tree, deriver and references (it writes them itself, to
/// save a process per build): the same NAR hash and size, deriver, `ultimate`, `sigs`, `ca`
/// and references, a current registration time, and a canonical symlink mtime.
#[tokio::test]
async fn registration_writes_what_nix_store_register_validity_writes() {
    let Some(nix_store) = nix_store("registration_writes_what_nix_store_register_validity_writes")
    else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let t = tempfile::tempdir().unwrap();
    let lib = fake_store_path("reg-lib");
    let by_nix = fake_store_path("reg-by-nix-store");
    let by_hook = fake_store_path("reg-by-hook");
    let drv = format!("{}.drv", fake_store_path("reg-drv"));

    // A valid path both refer to, registered by nix-store.
    fs::write(&lib, b"lib").unwrap();
    let (_, lib_info) = nar_of(Path::new(&lib), &lib).await;
    let reg = |path: &str, info: &PathInfo, refs: &[&str]| {
        let mut input = format!(
            "{path}\nsha256:{}\n{}\n{drv}\n{}\n",
            info.info.nar_hash.to_base16(),
            info.info.nar_size,
            refs.len()
        );
        for r in refs {
            input.push_str(r);
            input.push('\n');
        }
        let mut child = Command::new(&nix_store)
            .args(["--register-validity", "--hash-given"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(child.stdin.as_mut().unwrap(), input.as_bytes()).unwrap();
        drop(child.stdin.take());
        assert!(child.wait().unwrap().success());
    };
    reg(&lib, &lib_info, &[]);

    // nix-store's way: the tree written in place, then registered.
    same_tree(Path::new(&by_nix));
    let (_, nix_info) = nar_of(Path::new(&by_nix), &by_nix).await;
    reg(&by_nix, &nix_info, &[&by_nix, &lib]);

    // The hook's way.
    let t0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    same_tree(&t.path().join("tree"));
    let (nar, mut info) = nar_of(&t.path().join("tree"), &by_hook).await;
    info.info.references = [sp(&by_hook), sp(&lib)].into();
    info.info.deriver = Some(sp(&drv));
    let mut imp = OutputImporter::new(Path::new(STORE), false).unwrap();
    imp.add(info.clone(), &nar[..]).await.unwrap();
    imp.commit_locked_invalid(&nix_store).await.unwrap();

    let (nix_row, nix_refs) = db_row(&by_nix);
    let (hook_row, hook_refs) = db_row(&by_hook);
    assert_eq!(
        nix_row.0,
        format!("sha256:{}", info.info.nar_hash.to_base16()),
        "the same tree has the same NAR hash"
    );
    // Everything but the registration time is the same.
    assert_eq!(
        (
            &nix_row.0, &nix_row.1, nix_row.2, nix_row.3, &nix_row.4, &nix_row.5
        ),
        (
            &hook_row.0,
            &hook_row.1,
            hook_row.2,
            hook_row.3,
            &hook_row.4,
            &hook_row.5
        )
    );
    assert_eq!(hook_row.1.as_deref(), Some(drv.as_str()));
    assert!(
        (t0 - 5..=t0 + 120).contains(&hook_row.6),
        "registration time {} (started at {t0})",
        hook_row.6
    );
    assert_eq!(nix_refs, hook_refs);
    assert_eq!(hook_refs, ["SELF".to_string(), lib.clone()].into());
    for p in [&by_nix, &by_hook] {
        let link = fs::symlink_metadata(format!("{p}/link")).unwrap();
        assert_eq!(link.mtime(), 1, "{p}/link has Nix's canonical mtime");
        ns_ok(&nix_store, &["--verify-path", p]);
    }
    delete(&nix_store, &[&by_hook, &by_nix, &lib]);
}

/// References among the registered paths that form a cycle are refused, as Nix's topological
/// sort refuses them, and nothing stays registered or on disk.
#[tokio::test]
async fn a_reference_cycle_registers_nothing() {
    let Some(nix_store) = nix_store("a_reference_cycle_registers_nothing") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let t = tempfile::tempdir().unwrap();
    let a = fake_store_path("cycle-a");
    let b = fake_store_path("cycle-b");
    let (a_nar, mut a_info) = make_output(t.path(), "a", &a).await;
    let (b_nar, mut b_info) = make_output(t.path(), "b", &b).await;
    a_info.info.references = [sp(&b)].into();
    b_info.info.references = [sp(&a)].into();
    let mut imp = OutputImporter::new(Path::new(STORE), false).unwrap();
    imp.add(a_info, &a_nar[..]).await.unwrap();
    imp.add(b_info, &b_nar[..]).await.unwrap();
    let err = imp.commit_locked_invalid(&nix_store).await.unwrap_err();
    assert!(err.to_string().contains("cycle"), "{err}");
    for p in [&a, &b] {
        assert!(fs::symlink_metadata(p).is_err(), "{p} was left on disk");
        assert!(!is_valid(&nix_store, p), "{p} was left registered");
    }
    assert!(staging_dirs().is_empty());
}
