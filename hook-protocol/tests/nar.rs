//! NAR reader, unpacker and dumper: exact bytes, round trips, rejection of malformed archives,
//! the case hack, and (when `nix-store` is on PATH) byte-for-byte agreement with Nix.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

use hook_protocol::nar::{
    DumpOptions, MAX_DEPTH, NarError, NarSummary, UnpackOptions, copy_nar, dump_path,
    dump_path_unhashed, unpack_nar,
};
use proptest::prelude::*;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

// ---------------------------------------------------------------------------------------------
// A tiny, deliberately permissive NAR writer, to hand-build valid and invalid archives.

fn s(out: &mut Vec<u8>, x: &[u8]) {
    out.extend_from_slice(&(x.len() as u64).to_le_bytes());
    out.extend_from_slice(x);
    out.resize(out.len() + (8 - x.len() % 8) % 8, 0);
}

#[derive(Debug, Clone)]
enum N {
    File(bool, Vec<u8>),
    Link(Vec<u8>),
    Dir(Vec<(Vec<u8>, N)>),
}

fn file(c: &[u8]) -> N {
    N::File(false, c.to_vec())
}

fn dir(entries: Vec<(&str, N)>) -> N {
    N::Dir(entries.into_iter().map(|(n, e)| (n.into(), e)).collect())
}

fn node(out: &mut Vec<u8>, n: &N) {
    s(out, b"(");
    s(out, b"type");
    match n {
        N::File(exec, c) => {
            s(out, b"regular");
            if *exec {
                s(out, b"executable");
                s(out, b"");
            }
            s(out, b"contents");
            s(out, c);
        }
        N::Link(t) => {
            s(out, b"symlink");
            s(out, b"target");
            s(out, t);
        }
        N::Dir(es) => {
            s(out, b"directory");
            for (name, e) in es {
                s(out, b"entry");
                s(out, b"(");
                s(out, b"name");
                s(out, name);
                s(out, b"node");
                node(out, e);
                s(out, b")");
            }
        }
    }
    s(out, b")");
}

fn nar(n: &N) -> Vec<u8> {
    let mut out = Vec::new();
    s(&mut out, b"nix-archive-1");
    node(&mut out, n);
    out
}

fn sha256(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

async fn copy(bytes: &[u8]) -> Result<(NarSummary, Vec<u8>), NarError> {
    let mut r = bytes;
    let mut out = Vec::new();
    let s = copy_nar(&mut r, &mut out).await?;
    Ok((s, out))
}

async fn dump(p: &Path, case_hack: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let s = dump_path(p, &mut out, DumpOptions { case_hack })
        .await
        .unwrap();
    assert_eq!(s.nar_size, out.len() as u64);
    assert_eq!(s.nar_sha256, sha256(&out));
    // The unhashed variant writes the very same bytes.
    let mut plain = Vec::new();
    let n = dump_path_unhashed(p, &mut plain, DumpOptions { case_hack })
        .await
        .unwrap();
    assert_eq!(n, out.len() as u64);
    assert!(plain == out, "dump_path_unhashed differs from dump_path");
    out
}

async fn unpack(bytes: &[u8], dest: &Path, case_hack: bool) -> Result<NarSummary, NarError> {
    let mut r = bytes;
    unpack_nar(&mut r, dest, UnpackOptions { case_hack }).await
}

// ---------------------------------------------------------------------------------------------
// Trees on disk.

fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn write(p: &Path, contents: &[u8], mode: u32) {
    fs::write(p, contents).unwrap();
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

/// A tree with every kind of node: regular, executable, empty and large files, symlinks
/// (relative, absolute, dangling), nested and empty directories, unicode and odd names, and
/// names whose byte order differs from other orders (upper case, '-', '.').
fn make_tree(root: &Path) {
    fs::create_dir(root).unwrap();
    write(&root.join("hello.txt"), b"hello world\n", 0o644);
    write(&root.join("run.sh"), b"#!/bin/sh\necho hi\n", 0o755);
    write(&root.join("empty"), b"", 0o644);
    write(&root.join("user-x-only"), b"x", 0o700);
    write(&root.join("group-x-only"), b"x", 0o654);
    write(&root.join("big.bin"), &pseudo_random(1_500_000, 7), 0o644);
    write(&root.join("exactly8"), b"12345678", 0o644);
    symlink("hello.txt", root.join("link")).unwrap();
    symlink("/nix/store/does-not-exist", root.join("abs-link")).unwrap();
    symlink("../../..", root.join("dotdot-link")).unwrap();
    fs::create_dir_all(root.join("a/b/c/d")).unwrap();
    write(&root.join("a/b/c/d/deep"), b"deep", 0o644);
    write(&root.join("a/Z"), b"Z", 0o644);
    write(&root.join("a/z"), b"z", 0o644);
    write(&root.join("a/-dash"), b"", 0o644);
    write(&root.join("a/.hidden"), b"h", 0o644);
    write(&root.join("a/a.b"), b"", 0o644);
    write(&root.join("a/a-b"), b"", 0o644);
    write(&root.join("a/a_b"), b"", 0o644);
    fs::create_dir(root.join("empty-dir")).unwrap();
    fs::create_dir(root.join("ünïcødé 日本語")).unwrap();
    write(
        &root.join("ünïcødé 日本語/файл"),
        "данные".as_bytes(),
        0o644,
    );
    write(&root.join("with space & $chars\\"), b"odd", 0o644);
    write(&root.join("newline\nname"), b"nl", 0o644);
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

// ---------------------------------------------------------------------------------------------
// Exact bytes.

#[tokio::test]
async fn hi_file_matches_reference_bytes() {
    let mut expected = Vec::new();
    for tok in ["nix-archive-1", "(", "type", "regular", "contents"] {
        s(&mut expected, tok.as_bytes());
    }
    expected.extend_from_slice(&[3, 0, 0, 0, 0, 0, 0, 0, 0x68, 0x69, 0x0a, 0, 0, 0, 0, 0]);
    s(&mut expected, b")");
    // The first string spelled out: length 13, "nix-archive-1", 3 bytes of padding.
    assert_eq!(&expected[..8], &13u64.to_le_bytes());
    assert_eq!(&expected[8..21], b"nix-archive-1");
    assert_eq!(&expected[21..24], &[0, 0, 0]);
    assert_eq!(expected.len(), 24 + 16 + 16 + 16 + 16 + 16 + 16);

    let t = tmp();
    let p = t.path().join("hi");
    write(&p, b"hi\n", 0o644);
    let dumped = dump(&p, false).await;
    assert_eq!(dumped, expected);

    let (summary, copied) = copy(&expected).await.unwrap();
    assert_eq!(copied, expected);
    assert_eq!(summary.nar_size, expected.len() as u64);
    assert_eq!(summary.nar_sha256, sha256(&expected));
    assert_eq!(summary.sha256_base16().len(), 64);

    let out = t.path().join("out");
    let s2 = unpack(&expected, &out, false).await.unwrap();
    assert_eq!(s2, summary);
    assert_eq!(fs::read(&out).unwrap(), b"hi\n");
}

#[tokio::test]
async fn executable_marker_and_symlink_bytes() {
    let t = tmp();
    let p = t.path().join("x");
    write(&p, b"", 0o755);
    let mut expected = Vec::new();
    for tok in [
        "nix-archive-1",
        "(",
        "type",
        "regular",
        "executable",
        "",
        "contents",
    ] {
        s(&mut expected, tok.as_bytes());
    }
    expected.extend_from_slice(&0u64.to_le_bytes());
    s(&mut expected, b")");
    assert_eq!(dump(&p, false).await, expected);

    let l = t.path().join("l");
    symlink("target", &l).unwrap();
    assert_eq!(dump(&l, false).await, nar(&N::Link(b"target".to_vec())));
}

// ---------------------------------------------------------------------------------------------
// Round trips.

async fn check_metadata(root: &Path) {
    let md = fs::symlink_metadata(root).unwrap();
    if md.file_type().is_symlink() {
        return;
    }
    assert_eq!(md.mtime(), 1, "mtime of {}", root.display());
    let mode = md.permissions().mode() & 0o7777;
    if md.is_dir() {
        assert_eq!(mode, 0o555, "mode of {}", root.display());
        for e in fs::read_dir(root).unwrap() {
            Box::pin(check_metadata(&e.unwrap().path())).await;
        }
    } else {
        assert!(
            mode == 0o444 || mode == 0o555,
            "mode {mode:o} of {}",
            root.display()
        );
    }
}

#[tokio::test]
async fn dump_copy_unpack_dump_round_trip() {
    let t = tmp();
    let src = t.path().join("src");
    make_tree(&src);
    let n1 = dump(&src, false).await;

    // copy_nar passes exactly the bytes through, through a reader that returns one byte at a
    // time (so every read path is exercised).
    let (s1, copied) = copy(&n1).await.unwrap();
    assert_eq!(copied, n1);
    assert_eq!(s1.nar_size, n1.len() as u64);
    assert_eq!(s1.nar_sha256, sha256(&n1));
    let mut slow = tokio_test_reader(&n1, 1);
    let mut copied2 = Vec::new();
    assert_eq!(copy_nar(&mut slow, &mut copied2).await.unwrap(), s1);
    assert_eq!(copied2, n1);

    let out = t.path().join("out");
    let s2 = unpack(&copied, &out, false).await.unwrap();
    assert_eq!(s2, s1);
    // The hash is computed on a thread of its own from the pieces the parser hands on: the
    // same whatever the reads' sizes (1 byte: every structural token and content byte apart).
    for step in [1, 7, 65_536] {
        let dest = t.path().join(format!("out-{step}"));
        let mut r = tokio_test_reader(&n1, step);
        let s = unpack_nar(&mut r, &dest, UnpackOptions::default())
            .await
            .unwrap();
        assert_eq!(s, s1, "reads of {step} bytes");
    }
    check_metadata(&out).await;
    let n2 = dump(&out, false).await;
    assert_eq!(n1, n2);

    // Spot checks of what was unpacked.
    assert_eq!(
        fs::read_link(out.join("link")).unwrap(),
        Path::new("hello.txt")
    );
    assert_eq!(
        fs::read_link(out.join("dotdot-link")).unwrap(),
        Path::new("../../..")
    );
    assert_eq!(
        fs::read(out.join("big.bin")).unwrap(),
        pseudo_random(1_500_000, 7)
    );
    let mode = |p: &str| fs::metadata(out.join(p)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("run.sh"), 0o555);
    assert_eq!(mode("user-x-only"), 0o555);
    assert_eq!(mode("group-x-only"), 0o444);
    assert_eq!(mode("hello.txt"), 0o444);
}

#[tokio::test]
async fn unpack_hashes_every_content_byte() {
    let original = nar(&dir(vec![
        ("a", file(&pseudo_random(1_000_000, 3))),
        ("b", file(b"small")),
        ("c", N::Link(b"a".to_vec())),
    ]));
    let t = tmp();
    let s = unpack(&original, &t.path().join("o"), false).await.unwrap();
    assert_eq!(s.nar_sha256, sha256(&original));
    // A content byte changed in the middle of the big file: still a valid NAR, the tree
    // differs, and so does the hash the unpacking reports (the one the importer checks).
    let mut changed = original.clone();
    let i = original.len() / 2;
    changed[i] ^= 1;
    let s2 = unpack(&changed, &t.path().join("c"), false).await.unwrap();
    assert_eq!(s2.nar_size, s.nar_size);
    assert_eq!(s2.nar_sha256, sha256(&changed));
    assert_ne!(s2.nar_sha256, s.nar_sha256);
}

#[tokio::test]
async fn root_can_be_a_file_a_symlink_or_an_empty_directory() {
    let t = tmp();
    for (i, n) in [
        file(b""),
        N::File(true, pseudo_random(100_000, 3)),
        N::Link(b"/somewhere/else".to_vec()),
        dir(vec![]),
    ]
    .iter()
    .enumerate()
    {
        let bytes = nar(n);
        let out = t.path().join(format!("out{i}"));
        let sum = unpack(&bytes, &out, false).await.unwrap();
        assert_eq!(sum.nar_sha256, sha256(&bytes));
        assert_eq!(dump(&out, false).await, bytes);
    }
}

/// A reader that returns at most `step` bytes per read.
fn tokio_test_reader(bytes: &[u8], step: usize) -> impl tokio::io::AsyncRead + Unpin + '_ {
    struct Slow<'a>(&'a [u8], usize);
    impl tokio::io::AsyncRead for Slow<'_> {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            let n = self.1.min(self.0.len()).min(buf.remaining());
            buf.put_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            std::task::Poll::Ready(Ok(()))
        }
    }
    Slow(bytes, step)
}

#[tokio::test]
async fn copy_nar_does_not_read_past_the_end() {
    let t = tmp();
    let src = t.path().join("src");
    make_tree(&src);
    let mut cases = vec![dump(&src, false).await];
    cases.push(nar(&file(b"hi\n")));
    cases.push(nar(&N::Link(b"x".to_vec())));
    cases.push(nar(&dir(vec![])));
    for (i, n) in cases.into_iter().enumerate() {
        let trailer = b"MORE PROTOCOL DATA \x00\x01\x02";
        let mut input = n.clone();
        input.extend_from_slice(trailer);
        for step in [1, 7, 4096, usize::MAX] {
            if n.len() > 100_000 && step < 4096 {
                continue; // byte-by-byte through 1.5 MB is slow in debug builds
            }
            let mut r = tokio_test_reader(&input, step);
            let mut out = Vec::new();
            copy_nar(&mut r, &mut out).await.unwrap();
            assert_eq!(out, n);
            let mut rest = Vec::new();
            r.read_to_end(&mut rest).await.unwrap();
            assert_eq!(rest, trailer, "step {step}");

            // Same for unpacking.
            let mut r = tokio_test_reader(&input, step);
            let dest = t.path().join(format!("u{step}-{i}"));
            unpack_nar(&mut r, &dest, UnpackOptions::default())
                .await
                .unwrap();
            let mut rest = Vec::new();
            r.read_to_end(&mut rest).await.unwrap();
            assert_eq!(rest, trailer);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Rejection of malformed archives.

async fn rejected(bytes: &[u8]) -> NarError {
    let err = copy(bytes).await.unwrap_err();
    // The unpacker must agree, and leave nothing behind.
    let t = tmp();
    let dest = t.path().join("out");
    let err2 = unpack(bytes, &dest, false).await.unwrap_err();
    assert_eq!(err.to_string(), err2.to_string());
    assert!(!dest.exists() && fs::symlink_metadata(&dest).is_err());
    err
}

#[tokio::test]
async fn rejects_unsorted_entries() {
    let err = rejected(&nar(&dir(vec![("b", file(b"")), ("a", file(b""))]))).await;
    assert!(matches!(err, NarError::Unsorted { .. }), "{err}");
    // Byte-wise, not case-insensitive or locale order: "B" < "a".
    let err = rejected(&nar(&dir(vec![("a", file(b"")), ("B", file(b""))]))).await;
    assert!(matches!(err, NarError::Unsorted { .. }), "{err}");
    copy(&nar(&dir(vec![("B", file(b"")), ("a", file(b""))])))
        .await
        .unwrap();
    // Sorting is checked in nested directories too, with the right location.
    let err = rejected(&nar(&dir(vec![(
        "sub",
        dir(vec![("y", file(b"")), ("x", file(b""))]),
    )])))
    .await;
    assert!(
        matches!(&err, NarError::Unsorted { path, .. } if path == "/sub"),
        "{err:?}"
    );
    assert!(err.to_string().contains("/sub"), "{err}");
}

#[tokio::test]
async fn rejects_duplicate_entries() {
    let err = rejected(&nar(&dir(vec![("a", file(b"1")), ("a", file(b"2"))]))).await;
    assert!(matches!(err, NarError::DuplicateName { .. }), "{err}");
    let err = rejected(&nar(&dir(vec![("a", file(b"1")), ("a", dir(vec![]))]))).await;
    assert!(matches!(err, NarError::DuplicateName { .. }), "{err}");
}

#[tokio::test]
async fn rejects_bad_names() {
    for bad in [&b""[..], b".", b"..", b"a/b", b"/", b"../etc", b"a\0b"] {
        let n = N::Dir(vec![(bad.to_vec(), file(b"x"))]);
        let err = rejected(&nar(&n)).await;
        assert!(
            matches!(err, NarError::InvalidName { .. }),
            "{bad:?}: {err}"
        );
    }
    // Too long.
    let long = vec![b'x'; hook_protocol::nar::MAX_NAME_LEN + 1];
    let err = rejected(&nar(&N::Dir(vec![(long, file(b""))]))).await;
    assert!(matches!(err, NarError::TooLong { .. }), "{err}");
}

#[tokio::test]
async fn rejects_bad_symlink_targets() {
    let err = rejected(&nar(&N::Link(vec![]))).await;
    assert!(matches!(err, NarError::InvalidTarget { .. }), "{err}");
    let err = rejected(&nar(&N::Link(b"a\0b".to_vec()))).await;
    assert!(matches!(err, NarError::InvalidTarget { .. }), "{err}");
    let err = rejected(&nar(&N::Link(vec![b'x'; 5000]))).await;
    assert!(matches!(err, NarError::TooLong { .. }), "{err}");
}

#[tokio::test]
async fn rejects_bad_magic_and_tokens() {
    let mut bad = Vec::new();
    s(&mut bad, b"nix-archive-2");
    node(&mut bad, &file(b""));
    let err = rejected(&bad).await;
    assert!(matches!(err, NarError::BadMagic { .. }), "{err}");

    // A huge length prefix where the magic should be: an error, not an allocation.
    let mut bad = u64::MAX.to_le_bytes().to_vec();
    bad.extend_from_slice(&[0; 64]);
    let err = rejected(&bad).await;
    assert!(matches!(err, NarError::BadMagic { .. }), "{err}");

    // Unknown type.
    let mut bad = Vec::new();
    for t in ["nix-archive-1", "(", "type", "fifo", ")"] {
        s(&mut bad, t.as_bytes());
    }
    let err = rejected(&bad).await;
    assert!(matches!(err, NarError::UnexpectedToken { .. }), "{err}");

    // Non-empty executable marker.
    let mut bad = Vec::new();
    for t in ["nix-archive-1", "(", "type", "regular", "executable", "yes"] {
        s(&mut bad, t.as_bytes());
    }
    let err = rejected(&bad).await;
    assert!(matches!(err, NarError::BadExecutableMarker { .. }), "{err}");

    // A regular file without contents (Nix 2.26's `parseDump` would accept it; its `dumpPath`,
    // `src/libutil/archive.cc` at 2.26.3, never writes one).
    let mut bad = Vec::new();
    for t in ["nix-archive-1", "(", "type", "regular", ")"] {
        s(&mut bad, t.as_bytes());
    }
    let err = rejected(&bad).await;
    assert!(matches!(err, NarError::UnexpectedToken { .. }), "{err}");

    // Fields out of order.
    let mut bad = Vec::new();
    for t in ["nix-archive-1", "(", "regular", "type"] {
        s(&mut bad, t.as_bytes());
    }
    let err = rejected(&bad).await;
    assert!(matches!(err, NarError::UnexpectedToken { .. }), "{err}");

    // Something else than "entry" in a directory; a huge string where a keyword should be.
    let mut bad = Vec::new();
    for t in ["nix-archive-1", "(", "type", "directory", "target"] {
        s(&mut bad, t.as_bytes());
    }
    let err = rejected(&bad).await;
    assert!(matches!(err, NarError::UnexpectedToken { .. }), "{err}");
    let mut bad = Vec::new();
    for t in ["nix-archive-1", "(", "type"] {
        s(&mut bad, t.as_bytes());
    }
    bad.extend_from_slice(&(1u64 << 40).to_le_bytes());
    let err = rejected(&bad).await;
    assert!(matches!(err, NarError::UnexpectedToken { .. }), "{err}");
}

#[tokio::test]
async fn rejects_non_zero_padding() {
    // In file contents: "hi\n" is followed by 5 bytes of padding.
    let good = nar(&file(b"hi\n"));
    copy(&good).await.unwrap();
    let pad_at = good.len() - 16 - 1; // the last padding byte before ")"
    assert_eq!(good[pad_at], 0);
    let mut bad = good.clone();
    bad[pad_at] = 1;
    let err = rejected(&bad).await;
    assert!(
        matches!(
            err,
            NarError::Wire {
                source: hook_protocol::wire::WireError::NonZeroPadding,
                ..
            }
        ),
        "{err}"
    );
    // In a token: the padding of "type".
    let mut bad = good.clone();
    bad[24 + 16 + 12] = 0xff;
    let err = rejected(&bad).await;
    assert!(matches!(err, NarError::Wire { .. }), "{err}");
    // In the magic.
    let mut bad = good;
    bad[23] = 1;
    let err = rejected(&bad).await;
    assert!(matches!(err, NarError::BadMagic { .. }), "{err}");
}

#[tokio::test]
async fn rejects_every_truncation() {
    let n = nar(&dir(vec![
        ("a", N::File(true, b"12345678901".to_vec())),
        ("b", N::Link(b"a".to_vec())),
        ("c", dir(vec![("d", file(b""))])),
    ]));
    copy(&n).await.unwrap();
    for len in 0..n.len() {
        let err = rejected(&n[..len]).await;
        assert!(
            err.is_truncated() || matches!(err, NarError::BadMagic { .. }),
            "prefix {len}: {err:?}"
        );
    }
}

#[tokio::test]
async fn rejects_too_deep_nesting() {
    let mut n = dir(vec![]);
    for _ in 0..MAX_DEPTH {
        n = N::Dir(vec![(b"d".to_vec(), n)]);
    }
    // MAX_DEPTH + 1 directories: one too many.
    let err = rejected(&nar(&n)).await;
    assert!(matches!(err, NarError::TooDeep { .. }), "{err}");
    let N::Dir(mut inner) = n else { unreachable!() };
    let ok = inner.pop().unwrap().1;
    copy(&nar(&ok)).await.unwrap();
}

#[tokio::test]
async fn unpack_refuses_an_existing_destination() {
    let t = tmp();
    let dest = t.path().join("exists");
    fs::write(&dest, b"keep me").unwrap();
    let err = unpack(&nar(&file(b"x")), &dest, false).await.unwrap_err();
    assert!(matches!(err, NarError::DestinationExists(_)), "{err}");
    assert_eq!(fs::read(&dest).unwrap(), b"keep me");
    // A dangling symlink counts as existing, and is not followed.
    let link = t.path().join("link");
    symlink(t.path().join("nowhere"), &link).unwrap();
    let err = unpack(&nar(&file(b"x")), &link, false).await.unwrap_err();
    assert!(matches!(err, NarError::DestinationExists(_)), "{err}");
    assert!(!t.path().join("nowhere").exists());
}

#[tokio::test]
async fn failed_unpack_removes_what_it_created() {
    let t = tmp();
    let mut n = nar(&dir(vec![
        ("a", file(&pseudo_random(700_000, 1))),
        ("b", dir(vec![("c", file(b"c"))])),
        ("z", file(b"")),
    ]));
    // Corrupt the name of the last entry so that it sorts before "b".
    let pos = n
        .windows(9)
        .rposition(|w| w == b"\x01\0\0\0\0\0\0\0z")
        .unwrap();
    n[pos + 8] = b'a';
    let dest = t.path().join("out");
    let err = unpack(&n, &dest, false).await.unwrap_err();
    assert!(matches!(err, NarError::Unsorted { .. }), "{err}");
    assert!(fs::symlink_metadata(&dest).is_err());
    assert_eq!(fs::read_dir(t.path()).unwrap().count(), 0);
}

#[tokio::test]
async fn dump_rejects_sockets_and_fifos() {
    let t = tmp();
    let d = t.path().join("d");
    fs::create_dir(&d).unwrap();
    let _sock = std::os::unix::net::UnixListener::bind(d.join("sock")).unwrap();
    let mut out = Vec::new();
    let err = dump_path(&d, &mut out, DumpOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, NarError::UnsupportedFileType { path, .. } if path.ends_with("sock")),
        "{err}"
    );
    let fifo = t.path().join("fifo");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let err = dump_path(&fifo, &mut Vec::new(), DumpOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, NarError::UnsupportedFileType { .. }), "{err}");
}

#[tokio::test]
async fn write_errors_are_reported() {
    struct Broken;
    impl tokio::io::AsyncWrite for Broken {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            _: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::task::Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into()))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }
    let t = tmp();
    let src = t.path().join("src");
    make_tree(&src);
    let err = dump_path(&src, &mut Broken, DumpOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, NarError::Write(_)), "{err}");
    let n = dump(&src, false).await;
    let err = copy_nar(&mut &n[..], &mut Broken).await.unwrap_err();
    assert!(matches!(err, NarError::Write(_)), "{err}");
}

// ---------------------------------------------------------------------------------------------
// The case hack.

#[tokio::test]
async fn case_hack_round_trip() {
    let n = nar(&dir(vec![
        ("README", file(b"upper")),
        ("Readme", file(b"title")),
        ("other", file(b"o")),
        (
            "readme",
            dir(vec![("X", file(b"")), ("x", N::Link(b"X".to_vec()))]),
        ),
    ]));
    let t = tmp();
    let out = t.path().join("out");
    let s1 = unpack(&n, &out, true).await.unwrap();
    assert_eq!(s1.nar_sha256, sha256(&n));
    let mut names: Vec<String> = fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "README",
            "Readme~nix~case~hack~1",
            "other",
            "readme~nix~case~hack~2"
        ]
    );
    assert_eq!(
        fs::read(out.join("Readme~nix~case~hack~1")).unwrap(),
        b"title"
    );
    assert!(
        out.join("readme~nix~case~hack~2/x~nix~case~hack~1")
            .is_symlink()
    );
    // Dumping with the case hack gives back the original NAR; without it, the hacked names.
    assert_eq!(dump(&out, true).await, n);
    assert_ne!(dump(&out, false).await, n);

    // Without the case hack, this NAR cannot be unpacked case-sensitively... it can, here:
    let plain = t.path().join("plain");
    unpack(&n, &plain, false).await.unwrap();
    assert!(plain.join("readme/x").is_symlink());
    // ... and a plain tree with such names dumps with the hack stripped.
    let hacked = t.path().join("hacked");
    fs::create_dir(&hacked).unwrap();
    write(&hacked.join("a~nix~case~hack~7"), b"", 0o644);
    write(&hacked.join("b~nix~case~hack~"), b"", 0o644);
    assert_eq!(
        dump(&hacked, true).await,
        nar(&dir(vec![("a", file(b"")), ("b", file(b""))]))
    );
}

#[tokio::test]
async fn case_hack_collisions_are_errors() {
    let t = tmp();
    // Unpacking: "A", "a" → "a~nix~case~hack~1", and a real entry of that name collides.
    let n = nar(&dir(vec![
        ("A", file(b"")),
        ("a", file(b"")),
        ("a~nix~case~hack~1", file(b"")),
    ]));
    let dest = t.path().join("out");
    assert!(unpack(&n, &dest, true).await.is_err());
    assert!(fs::symlink_metadata(&dest).is_err());
    let n = nar(&dir(vec![
        ("A", file(b"")),
        ("A~nix~case~hack~1", file(b"")),
        ("a", file(b"")),
    ]));
    let err = unpack(&n, &dest, true).await.unwrap_err();
    assert!(matches!(err, NarError::CaseHackCollision { .. }), "{err}");
    assert!(fs::symlink_metadata(&dest).is_err());

    // Dumping: two names that are equal once unhacked.
    let d = t.path().join("d");
    fs::create_dir(&d).unwrap();
    write(&d.join("x"), b"", 0o644);
    write(&d.join("x~nix~case~hack~1"), b"", 0o644);
    let err = dump_path(&d, &mut Vec::new(), DumpOptions { case_hack: true })
        .await
        .unwrap_err();
    assert!(
        matches!(err, NarError::CaseHackDumpCollision { .. }),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// Fuzzing.

fn arb_tree() -> impl Strategy<Value = N> {
    let leaf = prop_oneof![
        (any::<bool>(), proptest::collection::vec(any::<u8>(), 0..40))
            .prop_map(|(x, c)| N::File(x, c)),
        "[a-z./]{1,12}".prop_map(|t| N::Link(t.into_bytes())),
    ];
    leaf.prop_recursive(4, 32, 5, |inner| {
        proptest::collection::btree_map("[a-zA-Z0-9_.ü-]{1,8}", inner, 0..5).prop_map(|m| {
            N::Dir(
                m.into_iter()
                    .filter(|(k, _)| k != "." && k != "..")
                    .map(|(k, v)| (k.into_bytes(), v))
                    .collect(),
            )
        })
    })
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = rt().block_on(copy(&bytes));
    }

    #[test]
    fn random_bytes_after_a_valid_prefix_never_panic(
        cut in 0usize..200,
        tail in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let mut bytes = nar(&dir(vec![("a", file(b"hello")), ("b", N::Link(b"a".to_vec()))]));
        bytes.truncate(cut.min(bytes.len()));
        bytes.extend_from_slice(&tail);
        let _ = rt().block_on(copy(&bytes));
    }

    #[test]
    fn mutated_nars_never_panic_and_unpack_agrees(
        pos in any::<prop::sample::Index>(),
        val in any::<u8>(),
    ) {
        let mut bytes = nar(&dir(vec![
            ("a", file(b"hello")),
            ("b", N::Link(b"a".to_vec())),
            ("c", dir(vec![("d", N::File(true, b"x".to_vec()))])),
        ]));
        let i = pos.index(bytes.len());
        bytes[i] = val;
        rt().block_on(async {
            let c = copy(&bytes).await;
            let t = tmp();
            let dest = t.path().join("out");
            let u = unpack(&bytes, &dest, false).await;
            prop_assert_eq!(c.is_ok(), u.is_ok());
            if let Ok((s, out)) = c {
                prop_assert_eq!(&out[..], &bytes[..s.nar_size as usize]);
                // Unpacking hashes beside the parse (another thread): same summary.
                prop_assert_eq!(u.ok(), Some(s));
            } else {
                prop_assert!(fs::symlink_metadata(&dest).is_err());
            }
            Ok(())
        })?;
    }

    #[test]
    fn generated_trees_round_trip(tree in arb_tree()) {
        let bytes = nar(&tree);
        rt().block_on(async {
            let (sum, out) = copy(&bytes).await.unwrap();
            prop_assert_eq!(&out, &bytes);
            let t = tmp();
            let dest = t.path().join("out");
            prop_assert_eq!(unpack(&bytes, &dest, false).await.unwrap(), sum);
            prop_assert_eq!(dump(&dest, false).await, bytes);
            Ok(())
        })?;
    }
}

// ---------------------------------------------------------------------------------------------
// Against the real Nix.

/// `nix-store` if it is on PATH. Without it: fail under CI, else skip with a note.
fn nix_store(test: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("nix-store"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        if std::env::var_os("CI").is_some() {
            panic!("{test}: nix-store is not on PATH; run scripts/testbed to install Nix");
        }
        eprintln!("{test}: SKIPPED: nix-store is not on PATH (run scripts/testbed)");
    }
    found
}

fn nix_dump(nix_store: &Path, p: &Path) -> Vec<u8> {
    let out = Command::new(nix_store)
        .arg("--dump")
        .arg(p)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nix-store --dump {}: {}",
        p.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[tokio::test]
async fn dump_path_matches_nix_store_dump() {
    let Some(ns) = nix_store("dump_path_matches_nix_store_dump") else {
        return;
    };
    let t = tmp();
    let tree = t.path().join("tree");
    make_tree(&tree);
    let hi = t.path().join("hi");
    write(&hi, b"hi\n", 0o644);
    let exe = t.path().join("exe");
    write(&exe, &pseudo_random(3_000_001, 9), 0o711);
    let link = t.path().join("link");
    symlink("some/where", &link).unwrap();
    let empty = t.path().join("empty");
    fs::create_dir(&empty).unwrap();

    for p in [&tree, &tree.join("a"), &hi, &exe, &link, &empty] {
        let theirs = nix_dump(&ns, p);
        let ours = dump(p, false).await;
        assert!(
            ours == theirs,
            "dump of {} differs from nix-store --dump",
            p.display()
        );

        // And Nix's NAR unpacks to a tree that dumps back identically.
        let dest = t.path().join(format!(
            "unpacked-{}",
            p.file_name().unwrap().to_string_lossy()
        ));
        let sum = unpack(&theirs, &dest, false).await.unwrap();
        assert_eq!(sum.nar_sha256, sha256(&theirs));
        assert_eq!(sum.nar_size, theirs.len() as u64);
        assert!(
            nix_dump(&ns, &dest) == theirs,
            "re-dump of {}",
            dest.display()
        );
        assert!(dump(&dest, false).await == theirs);
    }
}

#[tokio::test]
async fn case_hack_matches_nix() {
    let Some(ns) = nix_store("case_hack_matches_nix") else {
        return;
    };
    let t = tmp();
    let d = t.path().join("d");
    fs::create_dir(&d).unwrap();
    write(&d.join("README"), b"1", 0o644);
    write(&d.join("readme~nix~case~hack~1"), b"2", 0o644);
    write(&d.join("x~nix~case~hack~3"), b"3", 0o644);
    let out = Command::new(&ns)
        .args(["--option", "use-case-hack", "true", "--dump"])
        .arg(&d)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dump(&d, true).await == out.stdout);

    // Nix's restore with the case hack gives the same names as ours.
    let restored = t.path().join("restored");
    let mut child = Command::new(&ns)
        .args(["--option", "use-case-hack", "true", "--restore"])
        .arg(&restored)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let plain = nar(&dir(vec![
        ("A", file(b"")),
        ("B", file(b"")),
        ("a", file(b"")),
        ("b", dir(vec![])),
    ]));
    {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(&plain).unwrap();
    }
    assert!(child.wait().unwrap().success());
    let ours = t.path().join("ours");
    unpack(&plain, &ours, true).await.unwrap();
    let list = |p: &Path| {
        let mut v: Vec<_> = fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        v.sort();
        v
    };
    assert_eq!(list(&restored), list(&ours));
}
