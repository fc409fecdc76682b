//! Upstream common/worker/serve-protocol vectors for strings, collections and store paths, and
//! the hash encodings.
//!
//! Expected values: for 2.26.3 transcribed from `src/libstore-tests/common-protocol.cc` (and the
//! identical `worker-protocol.cc` / `serve-protocol.cc` cases) at that tag; for 2.35.2 read from
//! the `.json` beside each `.bin`.

use std::collections::BTreeSet;
use std::path::PathBuf;

use bytes::BytesMut;
use hook_protocol::hash::{
    Hash, HashAlgo, HashError, base64_decode, base64_encode, nix32_decode, nix32_encode,
};
use hook_protocol::store_path::{
    StorePath, put_optional_store_path, put_store_path, put_store_path_set,
    read_optional_store_path, read_store_path, read_store_path_set,
};
use hook_protocol::wire::{self, WireError};
use proptest::prelude::*;
use serde_json::Value;

const VECTORS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/upstream");
const PROTOCOLS: [&str; 3] = ["common-protocol", "worker-protocol", "serve-protocol"];

fn vector(version: &str, proto: &str, name: &str) -> Vec<u8> {
    let root = PathBuf::from(VECTORS);
    assert!(
        root.join(version).is_dir(),
        "Nix test vectors not found at {} (expected {version}/ inside)",
        root.display()
    );
    let p = root.join(version).join(proto).join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn json(proto: &str, name: &str) -> Value {
    serde_json::from_slice(&vector("2.35.2", proto, &format!("{name}.json"))).unwrap()
}

/// Runs `f` on each (version, protocol, bytes of `<name>.bin`).
fn each_bin(name: &str, mut f: impl FnMut(&str, &str, &[u8])) {
    for version in ["2.26.3", "2.35.2"] {
        for proto in PROTOCOLS {
            f(
                version,
                proto,
                &vector(version, proto, &format!("{name}.bin")),
            );
        }
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn sp(base: &str) -> StorePath {
    StorePath::from_base_name(base).unwrap()
}

// ----------------------------------------------------------------------------------------------
// Transcribed 2.26.3 values

/// `"oh no \0\0\0 what was that!"` in the C++ source becomes `"oh no "`: the `std::string` is
/// built from a `const char *`.
fn expected_strings() -> Vec<String> {
    strs(&["", "hi", "white rabbit", "大白兔", "oh no "])
}

fn expected_vectors() -> (Vec<Vec<String>>, Vec<Vec<String>>) {
    (
        vec![strs(&[]), strs(&[""]), strs(&["", "foo", "bar"])],
        vec![strs(&[]), strs(&[""]), strs(&["", "1", "2"])],
    )
}

fn expected_store_paths() -> Vec<StorePath> {
    vec![
        sp("g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo"),
        sp("g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo-bar"),
    ]
}

fn expected_optional_store_paths() -> Vec<Option<StorePath>> {
    vec![None, Some(sp("g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo-bar"))]
}

#[test]
fn json_matches_transcribed_values() {
    for proto in PROTOCOLS {
        let s: Vec<String> = serde_json::from_value(json(proto, "string")).unwrap();
        assert_eq!(s, expected_strings(), "{proto}");

        let v = json(proto, "vector");
        let (flat, nested) = expected_vectors();
        for (k, want) in flat.iter().enumerate() {
            let got: Vec<String> = serde_json::from_value(v[k].clone()).unwrap();
            assert_eq!(&got, want, "{proto} vector {k}");
        }
        let got: Vec<Vec<String>> = serde_json::from_value(v[3].clone()).unwrap();
        assert_eq!(got, nested);

        let paths: Vec<String> = serde_json::from_value(json(proto, "store-path")).unwrap();
        assert_eq!(
            paths.iter().map(|b| sp(b)).collect::<Vec<_>>(),
            expected_store_paths()
        );
        let opt: Vec<Option<String>> =
            serde_json::from_value(json(proto, "optional-store-path")).unwrap();
        assert_eq!(
            opt.iter().map(|o| o.as_deref().map(sp)).collect::<Vec<_>>(),
            expected_optional_store_paths()
        );
    }
    let simple: String = serde_json::from_slice(&vector("2.35.2", "store-path", "simple.json"))
        .map(|v: Value| v.as_str().unwrap().to_string())
        .unwrap();
    let p = sp(&simple);
    assert!(p.is_derivation());
    assert_eq!(p.name(), "foo.drv");
}

// ----------------------------------------------------------------------------------------------
// Decode and re-encode

#[test]
fn string_bin() {
    let rt = rt();
    each_bin("string", |version, proto, bytes| {
        let mut r = bytes;
        let mut got = Vec::new();
        for _ in 0..5 {
            got.push(rt.block_on(wire::read_string(&mut r)).unwrap());
        }
        assert!(r.is_empty(), "{version}/{proto}: trailing bytes");
        assert_eq!(got, expected_strings(), "{version}/{proto}");
        let mut buf = BytesMut::new();
        for s in &got {
            wire::put_str(&mut buf, s);
        }
        assert_eq!(&buf[..], bytes, "{version}/{proto}: re-encoding differs");
    });
}

#[test]
fn vector_bin() {
    let rt = rt();
    each_bin("vector", |version, proto, bytes| {
        let mut r = bytes;
        let mut flat = Vec::new();
        for _ in 0..3 {
            flat.push(rt.block_on(wire::read_string_list(&mut r)).unwrap());
        }
        let n = rt
            .block_on(wire::read_len(&mut r, "list", wire::MAX_COLLECTION_LEN))
            .unwrap();
        let mut nested = Vec::new();
        for _ in 0..n {
            nested.push(rt.block_on(wire::read_string_list(&mut r)).unwrap());
        }
        assert!(r.is_empty(), "{version}/{proto}: trailing bytes");
        assert_eq!(
            (flat.clone(), nested.clone()),
            expected_vectors(),
            "{version}/{proto}"
        );

        let mut buf = BytesMut::new();
        for v in &flat {
            wire::put_strings(&mut buf, v);
        }
        wire::put_u64(&mut buf, nested.len() as u64);
        for v in &nested {
            wire::put_strings(&mut buf, v);
        }
        assert_eq!(&buf[..], bytes, "{version}/{proto}: re-encoding differs");
    });
}

#[test]
fn set_bin() {
    let rt = rt();
    let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    let want_flat = vec![set(&[]), set(&[""]), set(&["", "foo", "bar"])];
    let want_nested: BTreeSet<BTreeSet<String>> = [set(&[]), set(&[""]), set(&["", "1", "2"])]
        .into_iter()
        .collect();
    // 2.35.2's JSON lists the sets in order.
    for proto in PROTOCOLS {
        let j = json(proto, "set");
        for (k, want) in want_flat.iter().enumerate() {
            let got: BTreeSet<String> = serde_json::from_value(j[k].clone()).unwrap();
            assert_eq!(&got, want);
        }
        let got: BTreeSet<BTreeSet<String>> = serde_json::from_value(j[3].clone()).unwrap();
        assert_eq!(got, want_nested);
    }
    each_bin("set", |version, proto, bytes| {
        let mut r = bytes;
        let mut flat = Vec::new();
        for _ in 0..3 {
            flat.push(rt.block_on(wire::read_string_set(&mut r)).unwrap());
        }
        let n = rt
            .block_on(wire::read_len(&mut r, "set", wire::MAX_COLLECTION_LEN))
            .unwrap();
        let mut nested = BTreeSet::new();
        for _ in 0..n {
            nested.insert(rt.block_on(wire::read_string_set(&mut r)).unwrap());
        }
        assert!(r.is_empty(), "{version}/{proto}: trailing bytes");
        assert_eq!(flat, want_flat, "{version}/{proto}");
        assert_eq!(nested, want_nested, "{version}/{proto}");

        // Re-encoding in BTreeSet order reproduces Nix's std::set order.
        let mut buf = BytesMut::new();
        for s in &flat {
            wire::put_strings(&mut buf, s);
        }
        wire::put_u64(&mut buf, nested.len() as u64);
        for s in &nested {
            wire::put_strings(&mut buf, s);
        }
        assert_eq!(&buf[..], bytes, "{version}/{proto}: re-encoding differs");
    });
}

#[test]
fn store_path_bin() {
    let rt = rt();
    each_bin("store-path", |version, proto, bytes| {
        let mut r = bytes;
        let got = vec![
            rt.block_on(read_store_path(&mut r)).unwrap(),
            rt.block_on(read_store_path(&mut r)).unwrap(),
        ];
        assert!(r.is_empty(), "{version}/{proto}: trailing bytes");
        assert_eq!(got, expected_store_paths(), "{version}/{proto}");
        let mut buf = BytesMut::new();
        for p in &got {
            put_store_path(&mut buf, p);
        }
        assert_eq!(&buf[..], bytes, "{version}/{proto}: re-encoding differs");
    });
}

#[test]
fn optional_store_path_bin() {
    let rt = rt();
    each_bin("optional-store-path", |version, proto, bytes| {
        let mut r = bytes;
        let got = vec![
            rt.block_on(read_optional_store_path(&mut r)).unwrap(),
            rt.block_on(read_optional_store_path(&mut r)).unwrap(),
        ];
        assert!(r.is_empty(), "{version}/{proto}: trailing bytes");
        assert_eq!(got, expected_optional_store_paths(), "{version}/{proto}");
        let mut buf = BytesMut::new();
        for p in &got {
            put_optional_store_path(&mut buf, p.as_ref());
        }
        assert_eq!(&buf[..], bytes, "{version}/{proto}: re-encoding differs");
    });
}

#[test]
fn store_path_set_round_trip_and_errors() {
    let rt = rt();
    let set: BTreeSet<StorePath> = expected_store_paths().into_iter().collect();
    let mut buf = BytesMut::new();
    put_store_path_set(&mut buf, &set);
    // A store path set is a string set of the printed paths.
    let mut r = &buf[..];
    let as_strings = rt.block_on(wire::read_string_set(&mut r)).unwrap();
    assert_eq!(
        as_strings,
        set.iter().map(|p| p.to_string()).collect::<BTreeSet<_>>()
    );
    assert_eq!(
        rt.block_on(read_store_path_set(&mut &buf[..])).unwrap(),
        set
    );

    // The store-path vectors are not sets, but each element is a valid path; an invalid one
    // is a BadValue error.
    for bad in [
        "",
        "/nix/store/x",
        "/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-a b",
    ] {
        let mut buf = BytesMut::new();
        wire::put_str(&mut buf, bad);
        let err = rt.block_on(read_store_path(&mut &buf[..])).unwrap_err();
        assert!(matches!(err, WireError::BadValue { .. }), "{bad:?}: {err}");
    }
}

// ----------------------------------------------------------------------------------------------
// Hashes

/// `content-address.bin` holds nix32 hashes (`text:sha256:…`, `fixed:sha1:…`,
/// `fixed:r:sha256:…`); `content-address.json` (2.35.2) holds the same hashes in SRI form, and
/// the C++ test says what was hashed.
#[test]
fn content_address_vector_hashes_in_nix32_and_sri() {
    let rt = rt();
    let bin = vector("2.26.3", "common-protocol", "content-address.bin");
    let j = json("common-protocol", "content-address");
    let mut r = &bin[..];
    for k in 0..3 {
        let ca = rt.block_on(wire::read_string(&mut r)).unwrap();
        let typed = ca
            .strip_prefix("text:")
            .or_else(|| ca.strip_prefix("fixed:r:"))
            .or_else(|| ca.strip_prefix("fixed:"))
            .unwrap();
        let from_nix32 = Hash::parse_any(typed, None).unwrap();
        let from_sri = Hash::parse_any(j[k]["hash"].as_str().unwrap(), None).unwrap();
        assert_eq!(from_nix32, from_sri, "{ca}");
        assert_eq!(from_nix32.to_string(), typed, "Display is <algo>:<nix32>");
        assert_eq!(from_sri.to_sri(), j[k]["hash"].as_str().unwrap());
    }
    assert!(r.is_empty());
    // hashString(SHA256, "Derive(...)") and hashString(SHA256, "(...)").
    assert_eq!(
        Hash::parse_any(
            "sha256:1vb2xd67750jrvqgykxrf5ipl3h1q57sxc57q5nzjw56bqp3sxzr",
            None
        )
        .unwrap(),
        Hash::sha256_of(b"Derive(...)")
    );
    assert_eq!(
        Hash::parse_any(
            "sha256:1lr187v6dck1rjh2j6svpikcfz53wyl3qrlcbb405zlh13x0khhh",
            None
        )
        .unwrap(),
        Hash::sha256_of(b"(...)")
    );
    // drv-output.bin: `sha256:<base16>!<output>`, the base16 form of the SRI in the C++ test.
    let drv_out = vector("2.26.3", "common-protocol", "drv-output.bin");
    let id = rt.block_on(wire::read_string(&mut &drv_out[..])).unwrap();
    let (h, out) = id.split_once('!').unwrap();
    assert_eq!(out, "baz");
    let h = Hash::parse_any(h, None).unwrap();
    assert_eq!(
        h,
        Hash::parse_any("sha256-FePFYIlMuycIXPZbWi7LGEiMmZSX9FMbaQenWBzm1Sc=", None).unwrap()
    );
    assert_eq!(
        format!("sha256:{}", h.to_base16()),
        id.split('!').next().unwrap()
    );
}

/// Values computed with Nix 2.8.0's `nix-hash` on the file `hello\n`.
#[test]
fn known_hashes_of_hello() {
    let cases = [
        (
            HashAlgo::Md5,
            "b1946ac92492d2347c6235b4d2611184",
            "4425hx5d1mc9y39llj4k4nm55i",
        ),
        (
            HashAlgo::Sha1,
            "f572d396fae9206628714fb2ce00f72e94f2258f",
            "iwjz551fyw0cxcjgf4l6c879zabd6wpm",
        ),
        (
            HashAlgo::Sha256,
            "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03",
            "00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq",
        ),
        (
            HashAlgo::Sha512,
            "e7c22b994c59d9cf2b48e549b1e24666636045930d3da7c1acb299d1c3b7f931f94aae41edda2c2b207a36e10f8bcb8d45223e54878f5b316e7ce3b6bc019629",
            "0lrc0dwnvipqviibf7qfm1y492qvjwb1zhkcyi05cndmva1mr5gjcgrnz1x36djmk0sfg8djd2n0qv68vib2jg590mwznar9jcjphp7",
        ),
    ];
    for (algo, hex, n32) in cases {
        let h = Hash::parse_any(hex, Some(algo)).unwrap();
        assert_eq!(h.algo(), algo);
        assert_eq!(h.to_base16(), hex);
        assert_eq!(h.to_nix32(), n32, "{algo}");
        assert_eq!(nix32_decode(n32).unwrap(), h.digest());
        assert_eq!(nix32_encode(h.digest()), n32);
        // Every accepted form parses back to the same hash.
        for form in [
            format!("{algo}:{hex}"),
            format!("{algo}:{}", hex.to_uppercase()),
            format!("{algo}:{n32}"),
            format!("{algo}:{}", h.to_base64()),
            h.to_sri(),
            h.to_string(),
        ] {
            assert_eq!(Hash::parse_any(&form, None).unwrap(), h, "{form}");
            assert_eq!(Hash::parse_any(&form, Some(algo)).unwrap(), h, "{form}");
        }
        for bare in [hex.to_string(), n32.to_string(), h.to_base64()] {
            assert_eq!(Hash::parse_any(&bare, Some(algo)).unwrap(), h, "{bare}");
            assert!(matches!(
                Hash::parse_any(&bare, None),
                Err(HashError::NoAlgo(_))
            ));
        }
        assert_eq!(Hash::new(algo, h.digest()).unwrap(), h);
        assert!(Hash::new(algo, &h.digest()[1..]).is_err());
    }
    assert_eq!(
        Hash::sha256_of(b"hello\n").to_base16(),
        "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"
    );
    assert_eq!(Hash::sha512_of(b"hello\n").to_base16(), cases[3].1);
}

#[test]
fn parse_any_errors() {
    let hex = "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03";
    let err = |s: &str, a: Option<HashAlgo>| Hash::parse_any(s, a).unwrap_err();
    assert!(matches!(
        err(&format!("sha257:{hex}"), None),
        HashError::UnknownAlgo(_)
    ));
    assert!(matches!(
        err(&format!("sha256:{hex}"), Some(HashAlgo::Sha1)),
        HashError::AlgoMismatch { .. }
    ));
    assert!(matches!(
        err(&format!("sha256:{hex}0"), None),
        HashError::WrongLength { .. }
    ));
    assert!(matches!(
        err(&format!("sha256:{}", hex.replace('5', "g")), None),
        HashError::BadEncoding { .. }
    ));
    // nix32 without the letters e, o, u, t.
    assert!(matches!(
        err(
            "sha256:e0xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq",
            None
        ),
        HashError::BadEncoding { .. }
    ));
    // Top nix32 digit too large for 256 bits.
    assert!(matches!(
        err(
            "sha256:z0xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq",
            None
        ),
        HashError::BadEncoding { .. }
    ));
    // SRI with a digest of the wrong size.
    assert!(matches!(
        err("sha256-AAAA", None),
        HashError::BadEncoding { .. }
    ));
    assert!(matches!(
        err("sha256-!!!!", None),
        HashError::BadEncoding { .. }
    ));
    assert!(matches!(err("", None), HashError::NoAlgo(_)));
    assert_eq!("sha512".parse::<HashAlgo>().unwrap(), HashAlgo::Sha512);
    assert_eq!(HashAlgo::Md5.to_string(), "md5");
}

proptest! {
    #[test]
    fn nix32_round_trips(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
        let s = nix32_encode(&bytes);
        prop_assert!(s.bytes().all(|c| b"0123456789abcdfghijklmnpqrsvwxyz".contains(&c)));
        prop_assert_eq!(s.len(), (bytes.len() * 8).div_ceil(5));
        prop_assert_eq!(nix32_decode(&s).unwrap(), bytes);
    }

    #[test]
    fn base64_round_trips(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
        let s = base64_encode(&bytes);
        prop_assert_eq!(s.len(), bytes.len().div_ceil(3) * 4);
        prop_assert_eq!(base64_decode(&s).unwrap(), bytes);
    }

    #[test]
    fn hash_forms_round_trip(
        algo in prop_oneof![Just(HashAlgo::Md5), Just(HashAlgo::Sha1), Just(HashAlgo::Sha256), Just(HashAlgo::Sha512)],
        bytes in proptest::collection::vec(any::<u8>(), 64),
    ) {
        let h = Hash::new(algo, &bytes[..algo.size()]).unwrap();
        for s in [h.to_string(), h.to_sri(), format!("{algo}:{}", h.to_base16()), format!("{algo}:{}", h.to_base64())] {
            prop_assert_eq!(Hash::parse_any(&s, None).unwrap(), h);
        }
        for s in [h.to_base16(), h.to_nix32(), h.to_base64()] {
            prop_assert_eq!(Hash::parse_any(&s, Some(algo)).unwrap(), h);
        }
    }

    #[test]
    fn hash_parse_never_panics(s in ".{0,140}", which in 0..5u8) {
        let algo = [None, Some(HashAlgo::Md5), Some(HashAlgo::Sha1), Some(HashAlgo::Sha256), Some(HashAlgo::Sha512)][which as usize];
        let _ = Hash::parse_any(&s, algo);
        let _ = nix32_decode(&s);
        let _ = base64_decode(&s);
    }

    #[test]
    fn hash_parse_never_panics_on_near_misses(
        prefix in prop_oneof![Just(""), Just("sha256:"), Just("sha1-"), Just("md5:"), Just("sha512-")],
        s in "[0-9a-zA-Z+/=\n-]{0,130}",
    ) {
        let _ = Hash::parse_any(&format!("{prefix}{s}"), None);
        let _ = Hash::parse_any(&s, Some(HashAlgo::Sha256));
    }

    #[test]
    fn store_path_parse_never_panics(s in "(/nix/store/)?[0-9a-z]{0,34}-?.{0,20}") {
        if let Ok(p) = StorePath::from_absolute(&s) {
            prop_assert_eq!(p.to_string(), s.clone());
            prop_assert_eq!(StorePath::from_parts(*p.digest(), p.name()).unwrap(), p);
        }
        let _ = StorePath::from_base_name(&s);
    }

    #[test]
    fn read_store_path_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..96)) {
        let rt = rt();
        let _ = rt.block_on(read_store_path(&mut &bytes[..]));
        let _ = rt.block_on(read_optional_store_path(&mut &bytes[..]));
        let _ = rt.block_on(read_store_path_set(&mut &bytes[..]));
    }

    #[test]
    fn read_store_path_never_panics_on_framed_strings(s in "(/nix/store/)?[0-9a-z]{30,34}-?.{0,20}") {
        let mut buf = BytesMut::new();
        wire::put_str(&mut buf, &s);
        if let Ok(p) = rt().block_on(read_store_path(&mut &buf[..])) {
            prop_assert_eq!(p.to_string(), s);
        }
    }
}
