//! `.drv` parsing and writing against Nix's own files: the upstream test vectors (2.26.3 and
//! 2.35.2), `.drv` files written by Nix 2.8.0 (tests/data/nix-2.8.0), whatever is in
//! `/nix/store`, and (if `nix-instantiate` is installed) derivations Nix writes during the test.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use bytes::BytesMut;
use hook_protocol::derivation::{
    BasicDerivation, ByteString, Derivation, DerivationOutput, DrvError,
};
use hook_protocol::hash::Hash;
use hook_protocol::store_path::{ContentAddressMethod, STORE_DIR, StorePath};
use hook_protocol::wire::{self, WireError};
use proptest::prelude::*;
use serde_json::Value;

const VECTORS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/upstream");
const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data");
const VERSIONS: [&str; 2] = ["2.26.3", "2.35.2"];

fn vectors_dir() -> PathBuf {
    let p = PathBuf::from(VECTORS);
    assert!(
        p.join("2.26.3").is_dir() && p.join("2.35.2").is_dir(),
        "Nix test vectors not found at {} (expected 2.26.3/ and 2.35.2/ inside; see its README)",
        p.display()
    );
    p
}

fn walk(dir: &Path, ext: &str, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let p = e.unwrap().path();
        if p.is_dir() {
            walk(&p, ext, out);
        } else if p.extension().is_some_and(|x| x == ext) {
            out.push(p);
        }
    }
    out.sort();
}

/// The contents of a vector `.drv`. Upstream, the `advanced-attributes*.drv` vectors are git
/// symlinks into `tests/functional/derivation/`; tests/data/upstream holds the files they point to.
fn read_vector_drv(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Vectors whose hashes upstream replaced by `aaaa…`, so their input derivations are no longer
/// in sorted order; Nix itself would not write them back identically either.
const SCRUBBED: [&str; 2] = ["hello.drv", "firefox.drv"];

#[test]
fn upstream_drv_vectors_parse_and_reserialise_identically() {
    let mut checked = 0;
    let mut compared_json = 0;
    for version in VERSIONS {
        let mut files = Vec::new();
        walk(
            &vectors_dir().join(version).join("derivation"),
            "drv",
            &mut files,
        );
        for path in files {
            let file = path.file_name().unwrap().to_str().unwrap();
            let bytes = read_vector_drv(&path);
            let res = Derivation::parse(&bytes);
            if file.starts_with("bad-") {
                assert!(res.is_err(), "{version}/{file} should not parse");
                checked += 1;
                continue;
            }
            if bytes.starts_with(b"DrvWithVersion(") {
                let err = res.expect_err(&format!("{version}/{file} is a dynamic derivation"));
                assert!(matches!(err, DrvError::UnsupportedVersion(ref v) if v == "xp-dyn-drv"));
                assert!(err.to_string().contains("dynamic derivations"), "{err}");
                checked += 1;
                continue;
            }
            let drv = res.unwrap_or_else(|e| panic!("{version}/{file}: {e}"));
            let out = drv.to_aterm();
            if SCRUBBED.contains(&file) {
                assert_ne!(
                    out.as_bytes(),
                    &bytes[..],
                    "{file} is expected to be unsorted"
                );
                assert_eq!(out.len(), bytes.len(), "{file}: only the order may differ");
                assert_eq!(Derivation::parse(out.as_bytes()).unwrap(), drv);
            } else {
                assert_eq!(
                    out,
                    ByteString::from(bytes.clone()),
                    "{version}/{file} did not re-serialise byte-identically"
                );
            }
            let json = path.with_extension("json");
            if json.exists() {
                let v: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
                compare_with_json(&drv, &v, &format!("{version}/{file}"));
                compared_json += 1;
            }
            checked += 1;
        }
    }
    // 2.26.3: 4 advanced + simple + dyn + 2 bad; 2.35.2: 8 advanced + simple, hello, firefox,
    // dyn + 2 bad. JSON beside: 2.26.3 has 3 advanced + simple, 2.35.2 has 8 advanced + simple.
    assert_eq!(checked, 22, "unexpected number of .drv vectors");
    assert_eq!(
        compared_json, 13,
        "unexpected number of .json files compared"
    );
}

/// A store path as the JSON gives it: absolute in 2.26.3, a base name in 2.35.2.
fn json_path(v: &Value) -> String {
    let s = v.as_str().expect("path is a string");
    if s.starts_with('/') {
        s.to_string()
    } else {
        format!("{STORE_DIR}/{s}")
    }
}

fn method_name(m: ContentAddressMethod) -> &'static str {
    match m {
        ContentAddressMethod::Flat => "flat",
        ContentAddressMethod::Nar => "nar",
        ContentAddressMethod::Text => "text",
        ContentAddressMethod::Git => "git",
    }
}

/// Checks one output against its JSON form (either version's shape).
fn compare_output(o: &DerivationOutput, j: &Value, ctx: &str) {
    let obj = j.as_object().expect("output is an object");
    if o.is_deferred() {
        assert!(obj.is_empty(), "{ctx}: deferred output as {j}");
        return;
    }
    if o.is_input_addressed() {
        assert_eq!(o.path, json_path(&j["path"]), "{ctx}");
        assert_eq!(obj.len(), 1, "{ctx}: {j}");
        return;
    }
    let (method, algo) = o.method_and_algo().expect("content-addressed");
    assert_eq!(j["method"], method_name(method), "{ctx}");
    if o.is_fixed() {
        let h = o.fixed_hash().unwrap();
        match j["hash"].as_str().unwrap() {
            sri if sri.contains('-') => assert_eq!(h, Hash::parse_any(sri, None).unwrap()),
            hex => {
                assert_eq!(h.to_base16(), hex, "{ctx}");
                assert_eq!(j["hashAlgo"], algo.to_string(), "{ctx}");
            }
        }
        if let Some(p) = j.get("path") {
            assert_eq!(o.path, json_path(p), "{ctx}");
        }
    } else {
        assert_eq!(j["hashAlgo"], algo.to_string(), "{ctx}");
        assert_eq!(
            o.is_impure(),
            j.get("impure") == Some(&Value::Bool(true)),
            "{ctx}"
        );
        assert!(o.path.is_empty());
    }
}

fn compare_with_json(drv: &Derivation, j: &Value, ctx: &str) {
    assert_eq!(j["system"], drv.platform, "{ctx}: system");
    assert_eq!(j["builder"], drv.builder.to_string(), "{ctx}: builder");
    let args: Vec<String> = serde_json::from_value(j["args"].clone()).unwrap();
    assert_eq!(args, drv.args, "{ctx}: args");
    let env: BTreeMap<String, String> = serde_json::from_value(j["env"].clone()).unwrap();
    let mut our_env: BTreeMap<String, String> = drv
        .env
        .iter()
        .map(|(k, v)| (k.clone(), v.to_string()))
        .collect();
    // JSON version 4 (2.35) moves `__json` out of the env into a `structuredAttrs` object.
    if let Some(sa) = j.get("structuredAttrs") {
        let ours: Value = serde_json::from_str(&our_env.remove("__json").unwrap()).unwrap();
        assert_eq!(&ours, sa, "{ctx}: structured attributes");
    }
    assert_eq!(env, our_env, "{ctx}: env");

    let outputs = j["outputs"].as_object().unwrap();
    assert_eq!(
        outputs.keys().collect::<Vec<_>>(),
        drv.outputs.keys().collect::<Vec<_>>(),
        "{ctx}: output names"
    );
    for (name, o) in &drv.outputs {
        compare_output(o, &outputs[name], &format!("{ctx}: output {name}"));
    }

    // 2.26.3 has inputDrvs/inputSrcs; 2.35.2 (JSON version 4) has inputs.drvs/inputs.srcs.
    let (jdrvs, jsrcs) = match j.get("inputs") {
        Some(inputs) => (&inputs["drvs"], &inputs["srcs"]),
        None => (&j["inputDrvs"], &j["inputSrcs"]),
    };
    let srcs: BTreeSet<String> = jsrcs.as_array().unwrap().iter().map(json_path).collect();
    let ours: BTreeSet<String> = drv.input_srcs.iter().map(|p| p.to_absolute()).collect();
    assert_eq!(srcs, ours, "{ctx}: input sources");
    let mut drvs = BTreeMap::new();
    for (p, v) in jdrvs.as_object().unwrap() {
        assert_eq!(v["dynamicOutputs"], serde_json::json!({}), "{ctx}");
        let outs: BTreeSet<String> = serde_json::from_value(v["outputs"].clone()).unwrap();
        drvs.insert(json_path(&Value::String(p.clone())), outs);
    }
    let ours: BTreeMap<String, BTreeSet<String>> = drv
        .input_drvs
        .iter()
        .map(|(p, o)| (p.to_absolute(), o.clone()))
        .collect();
    assert_eq!(drvs, ours, "{ctx}: input derivations");
}

/// `output-*.json`: single outputs of a derivation named `drv-name`, output `output-name`.
/// The 2.26.3 fixed-output files give the path Nix computes from the hash.
#[test]
fn upstream_output_vectors() {
    let mut fixed_paths = 0;
    for version in VERSIONS {
        for kind in [
            "caFixedFlat",
            "caFixedNAR",
            "caFixedText",
            "caFloating",
            "deferred",
            "impure",
            "inputAddressed",
        ] {
            let f = vectors_dir()
                .join(version)
                .join(format!("derivation/output-{kind}.json"));
            let j: Value = serde_json::from_slice(&std::fs::read(&f).unwrap()).unwrap();
            let prefix = match j.get("method").and_then(Value::as_str) {
                Some("nar") => "r:",
                Some("text") => "text:",
                Some("git") => "git:",
                _ => "",
            };
            let ctx = format!("{version} {kind}");
            let o = if kind.starts_with("caFixed") {
                let h = match j["hash"].as_str().unwrap() {
                    sri if sri.contains('-') => Hash::parse_any(sri, None).unwrap(),
                    hex => {
                        Hash::parse_any(hex, Some(j["hashAlgo"].as_str().unwrap().parse().unwrap()))
                            .unwrap()
                    }
                };
                let tmp = DerivationOutput {
                    path: String::new(),
                    hash_algo: format!("{prefix}{}", h.algo()),
                    hash: h.to_base16(),
                };
                // The path is derived from the hash, as Nix's writer does.
                let (m, _) = tmp.method_and_algo().unwrap();
                let p = hook_protocol::store_path::make_fixed_output_path(
                    m,
                    &h,
                    "drv-name-output-name",
                )
                .unwrap();
                let o2 = DerivationOutput {
                    path: p.to_absolute(),
                    ..tmp
                };
                assert_eq!(
                    o2.fixed_output_path("drv-name", "output-name")
                        .unwrap()
                        .unwrap(),
                    p
                );
                if let Some(jp) = j.get("path") {
                    assert_eq!(o2.path, json_path(jp), "{ctx}: fixed output path");
                    fixed_paths += 1;
                }
                o2
            } else if kind == "inputAddressed" {
                DerivationOutput {
                    path: json_path(&j["path"]),
                    ..Default::default()
                }
            } else if kind == "deferred" {
                DerivationOutput::default()
            } else {
                DerivationOutput {
                    path: String::new(),
                    hash_algo: format!("{prefix}{}", j["hashAlgo"].as_str().unwrap()),
                    hash: if kind == "impure" {
                        "impure".into()
                    } else {
                        String::new()
                    },
                }
            };
            o.validate().unwrap_or_else(|e| panic!("{ctx}: {e}"));
            compare_output(&o, &j, &ctx);
            assert_eq!(o.is_fixed(), kind.starts_with("caFixed"), "{ctx}");
            assert_eq!(o.is_floating_ca(), kind == "caFloating", "{ctx}");
            assert_eq!(o.is_impure(), kind == "impure", "{ctx}");
            assert_eq!(o.is_deferred(), kind == "deferred", "{ctx}");
            assert_eq!(
                o.path().is_some(),
                kind.starts_with("caFixed") || kind == "inputAddressed"
            );
        }
    }
    assert_eq!(
        fixed_paths, 3,
        "the 2.26.3 fixed-output vectors carry their paths"
    );
}

#[test]
fn advanced_attributes_options() {
    let read = |v: &str, rel: &str| {
        let p = vectors_dir().join(v).join("derivation").join(rel);
        Derivation::parse(&read_vector_drv(&p)).unwrap()
    };
    let features = |xs: &[&str]| xs.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();

    let d = read("2.26.3", "advanced-attributes.drv");
    assert_eq!(
        d.required_system_features(),
        features(&["rainbow", "uid-range"])
    );
    assert!(d.prefer_local_build());
    assert!(!d.is_builtin());

    let d = read("2.26.3", "advanced-attributes-structured-attrs.drv");
    assert!(d.env.contains_key("__json"));
    assert_eq!(
        d.required_system_features(),
        features(&["rainbow", "uid-range"])
    );
    assert!(d.prefer_local_build());

    let d = read("2.26.3", "advanced-attributes-defaults.drv");
    assert_eq!(d.required_system_features(), features(&[]));
    assert!(!d.prefer_local_build());

    // Floating content-addressed outputs need `ca-derivations`, as Nix adds it.
    let d = read("2.35.2", "ca/advanced-attributes.drv");
    assert!(d.outputs["out"].is_floating_ca());
    assert_eq!(
        d.required_system_features(),
        features(&["ca-derivations", "rainbow", "uid-range"])
    );
    let d = read(
        "2.35.2",
        "ca/advanced-attributes-structured-attrs-defaults.drv",
    );
    assert_eq!(d.required_system_features(), features(&["ca-derivations"]));
    assert!(!d.prefer_local_build());
}

// ----------------------------------------------------------------------------------------------
// Nix 2.8.0 output

fn nix28_files() -> Vec<PathBuf> {
    let mut v = Vec::new();
    walk(&Path::new(DATA).join("nix-2.8.0"), "drv", &mut v);
    assert!(v.len() >= 9, "tests/data/nix-2.8.0 is missing files");
    v
}

/// Parses, re-serialises and recomputes the store path of a `.drv` named by its store path.
fn check_store_drv(path: &StorePath, bytes: &[u8]) -> Derivation {
    let drv = Derivation::parse(bytes).unwrap_or_else(|e| panic!("{path}: {e}"));
    assert_eq!(
        drv.to_aterm(),
        ByteString::from(bytes),
        "{path} did not re-serialise byte-identically"
    );
    let name = path.derivation_name().unwrap();
    assert_eq!(&drv.store_path(name).unwrap(), path, "store path of {path}");
    for (out, o) in &drv.outputs {
        if let Some(p) = o.fixed_output_path(name, out) {
            assert_eq!(
                p.unwrap().to_absolute(),
                o.path,
                "{path}: fixed output {out}"
            );
        }
    }
    drv
}

#[test]
fn nix_2_8_written_drvs() {
    let mut by_name = BTreeMap::new();
    for f in nix28_files() {
        let base = f.file_name().unwrap().to_str().unwrap();
        let sp = StorePath::from_base_name(base).unwrap();
        let drv = check_store_drv(&sp, &std::fs::read(&f).unwrap());
        by_name.insert(sp.derivation_name().unwrap().to_string(), drv);
    }
    let weird = &by_name["weird"];
    assert_eq!(
        weird.args,
        ["-c", "echo \"quoted\" \\ back\nnew\ttab\rcr > $out"]
    );
    assert_eq!(
        weird.required_system_features(),
        BTreeSet::from(["big-parallel".to_string(), "kvm".to_string()])
    );
    assert!(weird.prefer_local_build());
    let unicode = &by_name["unicode"];
    assert_eq!(unicode.args[4], "🦀 crab");
    assert_eq!(unicode.env["ctl"], "bell\u{7} esc\u{1b} del\u{7f} nul-less");
    assert_eq!(unicode.env["label"], "ünï");
    let structured = &by_name["structured"];
    assert_eq!(
        structured.required_system_features(),
        BTreeSet::from(["kvm".to_string(), "nixos-test".to_string()])
    );
    assert!(structured.prefer_local_build());
    assert!(by_name["src.tar.gz"].is_builtin());
    assert!(by_name["fo-flat"].outputs["out"].is_fixed());
}

#[test]
fn nix_store_drvs_if_any() {
    let Ok(entries) = std::fs::read_dir(STORE_DIR) else {
        return;
    };
    let mut n = 0;
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.ends_with(".drv") || !e.path().is_file() {
            continue;
        }
        let Ok(bytes) = std::fs::read(e.path()) else {
            continue;
        };
        let sp = StorePath::from_base_name(name).unwrap();
        if bytes.starts_with(b"DrvWithVersion(") {
            assert!(Derivation::parse(&bytes).is_err());
            continue;
        }
        check_store_drv(&sp, &bytes);
        n += 1;
    }
    if n > 0 {
        eprintln!("checked {n} .drv files in {STORE_DIR}");
    }
}

/// If Nix is installed, let it write derivations with awkward strings into a private store and
/// check we read and write them exactly as it does.
#[test]
fn live_nix_instantiate_if_available() {
    let Ok(out) = std::process::Command::new("nix-instantiate")
        .arg("--version")
        .output()
    else {
        return;
    };
    if !out.status.success() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let expr = dir.path().join("drvs.nix");
    std::fs::write(
        &expr,
        r#"
let
  weird = builtins.fromJSON ''"q\" b\\ n\n r\r t\t bell\u0007 del\u007f é 🦀 \u2028"'';
  dep = derivation { name = "live-dep"; system = "riscv64-linux"; builder = "/bin/sh"; outputs = [ "out" "dev" ]; };
in [
  (derivation {
    name = "live-main";
    system = "riscv64-linux";
    builder = "/bin/sh";
    args = [ weird "" "\\\\" ];
    ${"key\twith\"odd\\chars"} = weird;
    empty = "";
    dep = dep.dev;
    outputs = [ "out" "bin" "lib" ];
  })
  (derivation {
    name = "live-structured";
    system = "x86_64-linux";
    builder = "/bin/sh";
    __structuredAttrs = true;
    x = weird;
    requiredSystemFeatures = [ "big-parallel" ];
  })
]
"#,
    )
    .unwrap();
    let out = std::process::Command::new("nix-instantiate")
        .arg("--store")
        .arg(&store)
        .arg(&expr)
        .env("HOME", dir.path())
        .env("XDG_CACHE_HOME", dir.path().join("cache"))
        .env_remove("NIX_REMOTE")
        .output()
        .unwrap();
    if !out.status.success() {
        eprintln!(
            "nix-instantiate failed, skipping: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    let stdout = String::from_utf8(out.stdout).unwrap();
    let paths: Vec<&str> = stdout.lines().collect();
    assert_eq!(paths.len(), 2, "{stdout}");
    for p in paths {
        let sp = StorePath::from_absolute(p.trim()).unwrap();
        let file = store.join(p.trim().trim_start_matches('/'));
        let drv = check_store_drv(&sp, &std::fs::read(&file).unwrap());
        if sp.name() == "live-main.drv" {
            let weird = "q\" b\\ n\n r\r t\t bell\u{7} del\u{7f} é 🦀 \u{2028}";
            assert_eq!(drv.args, [weird, "", "\\\\"]);
            assert_eq!(drv.env["key\twith\"odd\\chars"], weird);
            assert_eq!(drv.input_drvs.len(), 1);
        } else {
            assert_eq!(
                drv.required_system_features(),
                BTreeSet::from(["big-parallel".to_string()])
            );
        }
    }
}

// ----------------------------------------------------------------------------------------------
// Parser details

#[test]
fn escapes() {
    let d = Derivation::parse(
        br#"Derive([],[],[],"sys","b\"\\\n\r\t\a\$",["raw
newline"],[("k","\x\"")])"#,
    )
    .unwrap();
    assert_eq!(d.builder, "b\"\\\n\r\ta$");
    assert_eq!(d.args, ["raw\nnewline"]);
    assert_eq!(d.env["k"], "x\"");
    assert_eq!(
        d.to_aterm(),
        r#"Derive([],[],[],"sys","b\"\\\n\r\ta$",["raw\nnewline"],[("k","x\"")])"#
    );
}

/// Nix strings are bytes: a builder, argument or environment value that is not UTF-8 parses,
/// re-serialises byte for byte and goes over the wire unchanged (such a derivation used to be
/// refused as "not valid UTF-8", and so never built by nixdock).
#[test]
fn non_utf8_builder_args_and_env_values_are_kept_as_bytes() {
    let text: &[u8] = b"Derive([(\"out\",\"/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo\",\"\",\"\")],[],[],\"s\",\"/bin/\xff\",[\"-c\",\"a\xc3\"],[(\"k\",\"\xff\\n\xfe\")])";
    let d = Derivation::parse(text).unwrap();
    assert_eq!(d.builder.as_bytes(), b"/bin/\xff");
    assert_eq!(d.args[1].as_bytes(), b"a\xc3");
    assert_eq!(d.env["k"].as_bytes(), b"\xff\n\xfe");
    assert_eq!(d.to_aterm().as_bytes(), text);
    let b = d.to_basic(None);
    let mut buf = BytesMut::new();
    b.write(&mut buf);
    let back = rt().block_on(BasicDerivation::read(&mut &buf[..])).unwrap();
    assert_eq!(back, b);
}

#[test]
fn rejects_malformed() {
    let p = "/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo";
    let d = "/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo.drv";
    let cases: Vec<(String, &str)> = vec![
        ("".into(), "expected 'Derive('"),
        ("Derive(".into(), "expected '['"),
        (r#"Derive([],[],[],"s","b",[],[]"#.into(), "expected ')'"),
        (r#"Derive([],[],[],"s","b",[],[])x"#.into(), "trailing"),
        (r#"Derive([],[],[],"s","b",[],[]) "#.into(), "trailing"),
        (r#"Derive([],[],[],"s","b",[,"a"],[])"#.into(), "expected"),
        (r#"Derive([],[],[],"s","b",["a",],[])"#.into(), "expected"),
        (r#"Derive([],[],[],"s","b",["a""b"],[])"#.into(), "expected"),
        (r#"Derive([],[],[],"s","b",["a],[])"#.into(), "closing"),
        (r#"Derive([],[],[],"s","b\"#.into(), "after '\\'"),
        (r#"Derive([],[],["relative"],"s","b",[],[])"#.into(), "input source"),
        (format!(r#"Derive([],[],["{p}","{p}"],"s","b",[],[])"#), "duplicate input source"),
        (format!(r#"Derive([],[("{d}",["out","out"])],[],"s","b",[],[])"#), "duplicate"),
        (format!(r#"Derive([],[("{d}",["a"]),("{d}",["b"])],[],"s","b",[],[])"#), "duplicate input derivation"),
        (format!(r#"Derive([],[("{d}",(["a"],[("a",["b"])]))],[],"s","b",[],[])"#), "expected '['"),
        (r#"Derive([],[],[],"s","b",[],[("k","1"),("k","2")])"#.into(), "duplicate environment"),
        (format!(r#"Derive([("out","{p}","",""),("out","{p}","","")],[],[],"s","b",[],[])"#), "duplicate output"),
        (r#"Derive([("out","/nix/store/bad","","")],[],[],"s","b",[],[])"#.into(), "output 'out'"),
        (format!(r#"Derive([("out","{p}","","abc")],[],[],"s","b",[],[])"#), "without an algorithm"),
        (format!(r#"Derive([("out","{p}","sha257","abc")],[],[],"s","b",[],[])"#), "unknown hash algorithm"),
        (format!(r#"Derive([("out","{p}","sha256","abc")],[],[],"s","b",[],[])"#), "wrong length"),
        (format!(r#"Derive([("out","{p}","r:sha256","")],[],[],"s","b",[],[])"#), "should not specify"),
        (format!(r#"Derive([("out","{p}","r:sha256","impure")],[],[],"s","b",[],[])"#), "impure"),
        (r#"Derive([("out","","sha256","e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")],[],[],"s","b",[],[])"#.into(), "fixed-output output path"),
        (r#"Derive([("o\"ut","","","")],[],[],"s","b",[],[])"#.into(), "writes unescaped"),
        (r#"Derive([],[],[],"s\\","b",[],[])"#.into(), "writes unescaped"),
        (r#"DrvWithVersion("xp-dyn-drv",[],[],[],"s","b",[],[])"#.into(), "dynamic derivations"),
    ];
    for (text, want) in cases {
        let err = Derivation::parse(text.as_bytes())
            .expect_err(&format!("accepted {text:?}"))
            .to_string();
        assert!(err.contains(want), "{text:?}: error {err:?} lacks {want:?}");
    }
    // Paths, names and the platform are text; the builder, args and env values are not.
    let err = Derivation::parse(b"Derive([],[],[],\"\xff\",\"b\",[],[])").unwrap_err();
    assert!(matches!(err, DrvError::NotUtf8 { offset: 17 }), "{err:?}");
    let err = Derivation::parse(b"Derive([],[],[],\"s\",\"b\",[],[]]").unwrap_err();
    assert_eq!(
        err,
        DrvError::Syntax {
            offset: 29,
            expected: "')'"
        }
    );
}

#[test]
fn builtin_and_basic() {
    let text = br#"Derive([("out","/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo","","")],[("/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-dep.drv",["out"])],["/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-src"],"builtin","builtin:fetchurl",[],[("requiredSystemFeatures"," a\tb  c\n")])"#;
    let d = Derivation::parse(text).unwrap();
    assert!(d.is_builtin());
    assert_eq!(
        d.required_system_features(),
        ["a", "b", "c"].into_iter().map(String::from).collect()
    );
    let b = d.to_basic(None);
    assert_eq!(b.input_srcs, d.input_srcs);
    let closure: BTreeSet<StorePath> = [
        "/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-src",
        "/nix/store/00000000000000000000000000000000-dep-out",
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .collect();
    let b2 = d.to_basic(Some(closure.clone()));
    assert_eq!(b2.input_srcs, closure);
    assert_eq!(b2.outputs, d.outputs);
    assert_eq!(b2.env, d.env);
}

// ----------------------------------------------------------------------------------------------
// BasicDerivation wire form

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
}

#[test]
fn basic_derivation_exact_bytes() {
    let p = "/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo";
    let mut b = BasicDerivation {
        platform: "x86_64-linux".into(),
        builder: "/bin/sh".into(),
        args: vec!["-c".into(), "true".into()],
        ..Default::default()
    };
    b.outputs.insert(
        "out".into(),
        DerivationOutput {
            path: p.into(),
            ..Default::default()
        },
    );
    b.outputs.insert(
        "dev".into(),
        DerivationOutput {
            path: String::new(),
            hash_algo: "r:sha256".into(),
            hash: String::new(),
        },
    );
    b.input_srcs.insert(p.parse().unwrap());
    b.env.insert("z".into(), "1".into());
    b.env.insert("a".into(), "2".into());
    let mut buf = BytesMut::new();
    b.write(&mut buf);

    // `writeDerivation(Sink &, …)` in `src/libstore/derivations.cc` (2.26.3), built field by
    // field from the primitives.
    let mut want = BytesMut::new();
    let s = |w: &mut BytesMut, x: &str| wire::put_str(w, x);
    wire::put_u64(&mut want, 2);
    for x in ["dev", "", "r:sha256", "", "out", p, "", ""] {
        s(&mut want, x);
    }
    wire::put_u64(&mut want, 1);
    s(&mut want, p);
    s(&mut want, "x86_64-linux");
    s(&mut want, "/bin/sh");
    wire::put_u64(&mut want, 2);
    s(&mut want, "-c");
    s(&mut want, "true");
    wire::put_u64(&mut want, 2);
    for x in ["a", "2", "z", "1"] {
        s(&mut want, x);
    }
    assert_eq!(&buf[..], &want[..]);
    // The first bytes, literally: two outputs, then "dev".
    assert_eq!(
        &buf[..24],
        b"\x02\0\0\0\0\0\0\0\x03\0\0\0\0\0\0\0dev\0\0\0\0\0"
    );

    let back = rt().block_on(BasicDerivation::read(&mut &buf[..])).unwrap();
    assert_eq!(back, b);
}

#[test]
fn basic_derivation_from_vectors_round_trips() {
    let rt = rt();
    for f in nix28_files() {
        let d = Derivation::parse(&std::fs::read(&f).unwrap()).unwrap();
        let b = d.to_basic(None);
        let mut buf = BytesMut::new();
        b.write(&mut buf);
        let mut r = &buf[..];
        assert_eq!(rt.block_on(BasicDerivation::read(&mut r)).unwrap(), b);
        assert!(r.is_empty());
        // Every strict prefix is a truncation error, never a panic or a success.
        for cut in [0, 1, 8, buf.len() / 2, buf.len() - 1] {
            let err = rt
                .block_on(BasicDerivation::read(&mut &buf[..cut]))
                .unwrap_err();
            assert!(matches!(err, WireError::Truncated(_)), "{err}");
        }
    }
}

#[test]
fn basic_derivation_rejects_bad_outputs() {
    let rt = rt();
    for (path, algo, hash) in [
        ("relative", "", ""),
        ("", "md4", ""),
        ("", "", "abc"),
        (
            "/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo",
            "sha256",
            "zz",
        ),
    ] {
        let mut buf = BytesMut::new();
        wire::put_u64(&mut buf, 1);
        for x in ["out", path, algo, hash] {
            wire::put_str(&mut buf, x);
        }
        wire::put_u64(&mut buf, 0);
        for x in ["sys", "builder"] {
            wire::put_str(&mut buf, x);
        }
        wire::put_u64(&mut buf, 0);
        wire::put_u64(&mut buf, 0);
        let err = rt
            .block_on(BasicDerivation::read(&mut &buf[..]))
            .unwrap_err();
        assert!(
            matches!(
                err,
                WireError::BadValue {
                    what: "derivation output",
                    ..
                }
            ),
            "{err}"
        );
    }
}

// ----------------------------------------------------------------------------------------------
// Property tests

fn arb_store_path(suffix: &'static str) -> impl Strategy<Value = StorePath> {
    (
        proptest::array::uniform20(any::<u8>()),
        "[a-zA-Z0-9+._?=-]{0,20}",
    )
        .prop_map(move |(d, n)| StorePath::from_parts(d, &format!("x{n}{suffix}")).unwrap())
}

fn arb_output() -> impl Strategy<Value = DerivationOutput> {
    let algos = prop_oneof![
        Just(hook_protocol::hash::HashAlgo::Md5),
        Just(hook_protocol::hash::HashAlgo::Sha1),
        Just(hook_protocol::hash::HashAlgo::Sha256),
        Just(hook_protocol::hash::HashAlgo::Sha512),
    ];
    let methods = prop_oneof![Just(""), Just("r:"), Just("text:"), Just("git:")];
    (
        0..5u8,
        arb_store_path(""),
        algos,
        methods,
        proptest::collection::vec(any::<u8>(), 64),
    )
        .prop_map(|(kind, path, algo, method, bytes)| {
            let hash_algo = format!("{method}{algo}");
            match kind {
                0 => DerivationOutput {
                    path: path.to_absolute(),
                    ..Default::default()
                },
                1 => DerivationOutput {
                    path: path.to_absolute(),
                    hash: Hash::new(algo, &bytes[..algo.size()]).unwrap().to_base16(),
                    hash_algo,
                },
                2 => DerivationOutput {
                    hash_algo,
                    ..Default::default()
                },
                3 => DerivationOutput {
                    hash_algo,
                    hash: "impure".into(),
                    ..Default::default()
                },
                _ => DerivationOutput::default(),
            }
        })
}

/// Strings with plenty of the characters that need escaping.
fn arb_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[\"\\\\\n\r\t a-z$(),\\[\\]]{0,20}",
        proptest::collection::vec(
            prop_oneof![
                Just('"'),
                Just('\\'),
                Just('\n'),
                Just('\r'),
                Just('\t'),
                any::<char>()
            ],
            0..12
        )
        .prop_map(|v| v.into_iter().collect()),
    ]
}

prop_compose! {
    fn arb_derivation()(
        outputs in proptest::collection::btree_map("[a-z][a-z0-9_-]{0,8}", arb_output(), 0..4),
        input_drvs in proptest::collection::btree_map(
            arb_store_path(".drv"),
            proptest::collection::btree_set("[a-z][a-z0-9-]{0,6}", 0..3),
            0..4),
        input_srcs in proptest::collection::btree_set(arb_store_path(""), 0..4),
        platform in "[a-z0-9_ \n-]{0,16}",
        builder in arb_text(),
        args in proptest::collection::vec(arb_text(), 0..4),
        env in proptest::collection::btree_map(arb_text(), arb_text(), 0..6),
    ) -> Derivation {
        Derivation {
            outputs, input_drvs, input_srcs, platform,
            builder: builder.into(),
            args: args.into_iter().map(ByteString::from).collect(),
            env: env.into_iter().map(|(k, v)| (k, v.into())).collect(),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn aterm_round_trips(d in arb_derivation()) {
        let text = d.to_aterm();
        let back = Derivation::parse(text.as_bytes());
        prop_assert_eq!(back.as_ref(), Ok(&d), "{}", text);
        prop_assert_eq!(back.unwrap().to_aterm(), text);
    }

    #[test]
    fn basic_derivation_wire_round_trips(d in arb_derivation()) {
        let b = d.to_basic(None);
        let mut buf = BytesMut::new();
        b.write(&mut buf);
        let back = rt().block_on(BasicDerivation::read(&mut &buf[..])).unwrap();
        prop_assert_eq!(back, b);
    }

    #[test]
    fn parse_never_panics_on_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = Derivation::parse(&bytes);
    }

    #[test]
    fn parse_never_panics_on_mutated_drvs(
        d in arb_derivation(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0..3u8), 1..6),
    ) {
        let mut bytes = d.to_aterm().into_bytes();
        for (at, b, op) in edits {
            if bytes.is_empty() { break; }
            let i = at.index(bytes.len());
            match op {
                0 => bytes[i] = b,
                1 => { bytes.remove(i); }
                _ => bytes.insert(i, b),
            }
        }
        if let Ok(d2) = Derivation::parse(&bytes) {
            // Whatever parses must write back to something that parses to the same value.
            prop_assert_eq!(Derivation::parse(d2.to_aterm().as_bytes()), Ok(d2));
        }
    }

    #[test]
    fn basic_read_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = rt().block_on(BasicDerivation::read(&mut &bytes[..]));
    }

    #[test]
    fn basic_read_never_panics_on_mutations(
        d in arb_derivation(),
        at in any::<prop::sample::Index>(),
        b in any::<u8>(),
    ) {
        let mut buf = BytesMut::new();
        d.to_basic(None).write(&mut buf);
        let i = at.index(buf.len());
        buf[i] = b;
        let _ = rt().block_on(BasicDerivation::read(&mut &buf[..]));
    }
}
