//! The build-hook channel against bytes recorded from real Nix 2.8 and 2.26 parents
//! (`fixtures/hook-transcripts/`, see its README), plus the reply and `@nix` log-line formats.

use std::collections::BTreeSet;
use std::path::PathBuf;

use bytes::BytesMut;
use hook_protocol::hook::{
    AcceptedWork, HookRequest, Reply, Settings, TryRequest, read_accepted, read_request,
    read_settings, verbosity_from_args, write_reply,
};
use hook_protocol::log::{
    ActivityIds, ActivityType, Field, LogLine, LogParseError, ResultType, Verbosity,
};
use hook_protocol::store_path::StorePath;
use hook_protocol::wire::WireError;
use proptest::prelude::*;

const ACCEPT_DRV: &str = "/nix/store/56v91rdlf53wd5571pawmb5i4baai4d4-hook-transcript-accept.drv";
const OTHER_DRV: &str = "/nix/store/jyqd5lv90ms9n8c8py29kzy2rgq6d6im-hook-transcript-other.drv";
const INPUT: &str = "/nix/store/7n1qad88fxyv5prllc2jxbs8wy2d268r-hook-transcript-input";
const VERSIONS: [&str; 2] = ["nix-2.8", "nix-2.26"];

fn fixture(version: &str, run: &str, file: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/hook-transcripts")
        .join(version)
        .join(run)
        .join(file);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn paths(items: &[&str]) -> BTreeSet<StorePath> {
    items.iter().map(|s| s.parse().unwrap()).collect()
}

fn features_of(drv: &str) -> BTreeSet<String> {
    match drv {
        ACCEPT_DRV => set(&["big-parallel"]),
        OTHER_DRV => set(&["kvm", "nixos-test"]),
        other => panic!("unexpected drv {other}"),
    }
}

fn expect_try(req: HookRequest) -> TryRequest {
    match req {
        HookRequest::Try(t) => t,
        HookRequest::Exit => panic!("expected a try, got Exit"),
    }
}

fn check_settings(version: &str, s: &Settings) {
    assert!(s.len() > 80, "{version}: only {} settings", s.len());
    assert_eq!(s.max_jobs(), Some(0), "{version}");
    assert_eq!(s.system(), Some("x86_64-linux"), "{version}");
    assert_eq!(s.store(), Some("auto"), "{version}");
    assert!(s.builders().is_some(), "{version}");
    assert!(!s.builders_use_substitutes(), "{version}");
    assert_eq!(s.max_silent_time(), None, "{version}");
    assert_eq!(s.timeout(), None, "{version}");
    assert!(
        s.get("timeout").is_some(),
        "{version}: `timeout` is the key sent"
    );
    assert!(
        s.get("build-timeout").is_none(),
        "{version}: aliases are not sent"
    );
    assert_eq!(s.max_build_log_size(), None, "{version}");
    assert!(!s.keep_failed(), "{version}");
    assert!(s.substituters().is_empty(), "{version}");
    assert!(!s.use_case_hack(), "{version}");
    assert!(
        s.extra_platforms().contains(&"i686-linux".to_string()),
        "{version}"
    );
    assert!(s.system_features().contains("big-parallel"), "{version}");
    assert!(
        s.get("build-hook").unwrap().contains("record-hook"),
        "{version}"
    );
}

/// Writes the parsed preamble back and compares it with the recorded bytes.
fn check_reencode(version: &str, run: &str, s: &Settings) {
    let mut b = BytesMut::new();
    s.write(&mut b);
    assert!(
        b[..] == fixture(version, run, "preamble.bin")[..],
        "{version}/{run}: settings do not re-encode byte for byte"
    );
}

fn check_accepted(work: &AcceptedWork) {
    assert_eq!(work.inputs, paths(&[INPUT]));
    assert_eq!(work.wanted_outputs, set(&["dev", "out"]));
    let mut b = BytesMut::new();
    work.write(&mut b);
    assert_eq!(b.len(), 128);
}

#[tokio::test]
async fn accepted_transcripts_parse_completely() {
    for version in VERSIONS {
        let all = fixture(version, "accept", "stdin.bin");
        let mut r = &all[..];
        let settings = read_settings(&mut r).await.unwrap();
        check_settings(version, &settings);
        check_reencode(version, "accept", &settings);

        let t = expect_try(read_request(&mut r).await.unwrap());
        assert!(!t.am_willing, "{version}: max-jobs 0 means not willing");
        assert_eq!(t.needed_system, "x86_64-linux");
        assert_eq!(t.drv_path.to_absolute(), ACCEPT_DRV);
        assert_eq!(t.required_features, set(&["big-parallel"]));
        let mut b = BytesMut::new();
        t.write(&mut b);
        assert!(
            b[..] == fixture(version, "accept", "try-1.bin")[..],
            "{version}"
        );

        assert_eq!(
            fixture(version, "accept", "reply-1.bin"),
            b"# accept\nrecorder\n",
            "{version}"
        );

        let work = read_accepted(&mut r).await.unwrap();
        check_accepted(&work);
        assert!(
            r.is_empty(),
            "{version}: {} bytes after the accepted work",
            r.len()
        );
        assert_eq!(read_request(&mut r).await.unwrap(), HookRequest::Exit);

        // The phase files are the full stream cut at the boundaries.
        let mut cat = fixture(version, "accept", "preamble.bin");
        cat.extend(fixture(version, "accept", "try-1.bin"));
        cat.extend(fixture(version, "accept", "post-accept.bin"));
        assert!(cat == all, "{version}");
    }
}

#[tokio::test]
async fn declined_then_accepted_transcripts_parse_completely() {
    for version in VERSIONS {
        let all = fixture(version, "decline-first", "stdin.bin");
        let mut r = &all[..];
        let settings = read_settings(&mut r).await.unwrap();
        check_settings(version, &settings);
        check_reencode(version, "decline-first", &settings);

        // The same hook process gets a second `try` after `# decline`.
        let t1 = expect_try(read_request(&mut r).await.unwrap());
        let t2 = expect_try(read_request(&mut r).await.unwrap());
        assert_eq!(
            [&t1.drv_path, &t2.drv_path]
                .into_iter()
                .cloned()
                .collect::<BTreeSet<_>>(),
            paths(&[ACCEPT_DRV, OTHER_DRV]),
            "{version}"
        );
        for t in [&t1, &t2] {
            assert!(!t.am_willing);
            assert_eq!(t.needed_system, "x86_64-linux");
            assert_eq!(
                t.required_features,
                features_of(&t.drv_path.to_absolute()),
                "{version}"
            );
        }
        assert_eq!(
            fixture(version, "decline-first", "reply-1.bin"),
            b"# decline\n"
        );
        assert_eq!(
            fixture(version, "decline-first", "reply-2.bin"),
            b"# accept\nrecorder\n"
        );

        check_accepted(&read_accepted(&mut r).await.unwrap());
        assert!(r.is_empty());
        assert_eq!(read_request(&mut r).await.unwrap(), HookRequest::Exit);
    }
}

#[test]
fn recorded_argv_gives_the_parents_verbosity() {
    for version in VERSIONS {
        for run in ["accept", "decline-first"] {
            let argv = String::from_utf8(fixture(version, run, "argv.txt")).unwrap();
            let args: Vec<String> = argv.lines().map(String::from).collect();
            assert_eq!(
                args[0], "record-hook",
                "{version}/{run}: argv[0] is the basename"
            );
            assert_eq!(verbosity_from_args(&args), 3, "{version}/{run}: {args:?}");
        }
    }
}

#[test]
fn newer_nix_sends_more_settings() {
    let s28 = block_on(read_settings(
        &mut &fixture("nix-2.8", "accept", "preamble.bin")[..],
    ))
    .unwrap();
    let s226 = block_on(read_settings(
        &mut &fixture("nix-2.26", "accept", "preamble.bin")[..],
    ))
    .unwrap();
    // 2.26 sends many more settings (fetcher and evaluator settings are global too).
    assert!(s226.len() > s28.len(), "{} vs {}", s226.len(), s28.len());
    for key in [
        "max-jobs",
        "system",
        "store",
        "builders",
        "timeout",
        "max-silent-time",
    ] {
        assert!(s28.get(key).is_some() && s226.get(key).is_some(), "{key}");
    }
}

/// Every proper prefix of a recorded stream is an error, except the clean end right before a
/// command, which is `Exit`; and the errors say "truncated", not something else.
#[test]
fn truncated_streams_are_errors_at_every_prefix() {
    for version in VERSIONS {
        let all = fixture(version, "accept", "stdin.bin");
        let pre = fixture(version, "accept", "preamble.bin").len();
        let tried = pre + fixture(version, "accept", "try-1.bin").len();
        block_on(async {
            for cut in 0..all.len() {
                let mut r = &all[..cut];
                let res = read_settings(&mut r).await;
                if cut < pre {
                    assert!(
                        matches!(res, Err(WireError::Truncated(_))),
                        "{version} cut {cut}: {res:?}"
                    );
                    continue;
                }
                res.unwrap();
                let req = read_request(&mut r).await;
                if cut == pre {
                    assert_eq!(req.unwrap(), HookRequest::Exit, "{version} cut {cut}");
                    continue;
                }
                if cut < tried {
                    assert!(
                        matches!(req, Err(WireError::Truncated(_))),
                        "{version} cut {cut}: {req:?}"
                    );
                    continue;
                }
                expect_try(req.unwrap());
                let acc = read_accepted(&mut r).await;
                assert!(
                    matches!(acc, Err(WireError::Truncated(_))),
                    "{version} cut {cut}: {acc:?}"
                );
            }
        });
    }
}

#[tokio::test]
async fn unknown_tags_and_commands_are_errors() {
    let mut b = BytesMut::new();
    hook_protocol::wire::put_u64(&mut b, 2);
    let err = read_settings(&mut &b[..]).await.unwrap_err();
    assert!(
        matches!(
            err,
            WireError::BadValue {
                what: "settings tag",
                ..
            }
        ),
        "{err}"
    );

    let mut b = BytesMut::new();
    hook_protocol::wire::put_str(&mut b, "build");
    let err = read_request(&mut &b[..]).await.unwrap_err();
    assert!(
        err.to_string().contains("hook command") && err.to_string().contains("build"),
        "{err}"
    );

    // amWilling must be a boolean.
    let mut b = BytesMut::new();
    hook_protocol::wire::put_str(&mut b, "try");
    hook_protocol::wire::put_u64(&mut b, 2);
    assert!(read_request(&mut &b[..]).await.is_err());
}

/// Store paths from the parent are parsed once, where they are read: a bad input path in the
/// post-accept data is an error naming it (it used to be accepted here and later dropped from
/// the build's input sources and allowed references without a word), and so is a bad `.drv`
/// path in a `try`.
#[tokio::test]
async fn bad_store_paths_from_the_parent_are_errors_naming_them() {
    let bad = "/nix/store/not-a-store-path";
    let mut b = BytesMut::new();
    hook_protocol::wire::put_u64(&mut b, 2);
    hook_protocol::wire::put_str(&mut b, INPUT);
    hook_protocol::wire::put_str(&mut b, bad);
    hook_protocol::wire::put_strings(&mut b, set(&["out"]));
    let err = read_accepted(&mut &b[..]).await.unwrap_err();
    assert!(
        matches!(
            err,
            WireError::BadValue {
                what: "input path",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains(bad), "{err}");

    let mut b = BytesMut::new();
    hook_protocol::wire::put_str(&mut b, "try");
    hook_protocol::wire::put_bool(&mut b, true); // am_willing
    hook_protocol::wire::put_str(&mut b, "x86_64-linux");
    hook_protocol::wire::put_str(&mut b, "/tmp/x.drv");
    hook_protocol::wire::put_strings(&mut b, set(&[]));
    let err = read_request(&mut &b[..]).await.unwrap_err();
    assert!(
        matches!(
            err,
            WireError::BadValue {
                what: "derivation path",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("/tmp/x.drv"), "{err}");
}

#[tokio::test]
async fn settings_write_is_what_the_parent_sends() {
    let s: Settings = [("max-jobs", "0")].into_iter().collect();
    let mut b = BytesMut::new();
    s.write(&mut b);
    // One entry (`u64 1`, name, value), then the terminator `u64 0`, as `HookInstance` writes
    // them (`src/libstore/unix/build/hook-instance.cc`, 2.26.3).
    let mut expect = vec![1, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0];
    expect.extend(b"max-jobs");
    expect.extend([1, 0, 0, 0, 0, 0, 0, 0, b'0', 0, 0, 0, 0, 0, 0, 0]);
    expect.extend([0u8; 8]);
    assert_eq!(&b[..], &expect[..]);
    assert_eq!(read_settings(&mut &b[..]).await.unwrap(), s);
}

#[tokio::test]
async fn replies_are_exact_bytes() {
    let accept = Reply::Accept {
        machine: "ssh://builder1".into(),
    };
    assert_eq!(accept.to_bytes(), b"# accept\nssh://builder1\n");
    assert_eq!(Reply::Decline.to_bytes(), b"# decline\n");
    assert_eq!(
        Reply::DeclinePermanently.to_bytes(),
        b"# decline-permanently\n"
    );
    assert_eq!(Reply::Postpone.to_bytes(), b"# postpone\n");
    // A newline in the machine name would make the parent read a second line as a reply.
    let evil = Reply::Accept {
        machine: "a\nb\r\tc".into(),
    };
    assert_eq!(evil.to_bytes(), b"# accept\na b  c\n");
    let mut out = Vec::new();
    write_reply(&mut out, &accept).await.unwrap();
    assert_eq!(out, accept.to_bytes());
}

const DRV: &str = "/nix/store/56v91rdlf53wd5571pawmb5i4baai4d4-hello.drv";

#[test]
fn log_lines_are_exact() {
    let cases: Vec<(LogLine, String)> = vec![
        (
            LogLine::start_build(5, DRV, "m"),
            format!(
                r#"@nix {{"action":"start","fields":["{DRV}","m",1,1],"id":5,"level":3,"text":"building '{DRV}' on 'm'","type":105}}"#
            ),
        ),
        (
            LogLine::start_copy_path(6, "/nix/store/x-y", "local", "ssh-ng://b"),
            r#"@nix {"action":"start","fields":["/nix/store/x-y","local","ssh-ng://b"],"id":6,"level":3,"text":"copying path '/nix/store/x-y' to 'ssh-ng://b'","type":100}"#.into(),
        ),
        (
            LogLine::start_copy_path(6, "/nix/store/x-y", "ssh-ng://b", "daemon"),
            r#"@nix {"action":"start","fields":["/nix/store/x-y","ssh-ng://b","daemon"],"id":6,"level":3,"text":"copying path '/nix/store/x-y' from 'ssh-ng://b'","type":100}"#.into(),
        ),
        (
            LogLine::start_copy_path(6, "/p", "a", "b"),
            r#"@nix {"action":"start","fields":["/p","a","b"],"id":6,"level":3,"text":"copying path '/p' from 'a' to 'b'","type":100}"#.into(),
        ),
        (
            LogLine::start_copy_paths(7, "copying 3 paths"),
            r#"@nix {"action":"start","id":7,"level":3,"text":"copying 3 paths","type":103}"#.into(),
        ),
        (
            LogLine::result_progress(7, 1, 3, 1, 0),
            r#"@nix {"action":"result","fields":[1,3,1,0],"id":7,"type":105}"#.into(),
        ),
        (
            LogLine::result_set_expected(7, ActivityType::CopyPath, 4096),
            r#"@nix {"action":"result","fields":[100,4096],"id":7,"type":106}"#.into(),
        ),
        (
            LogLine::build_log_line(5, "hello\n"),
            r#"@nix {"action":"result","fields":["hello"],"id":5,"type":101}"#.into(),
        ),
        (
            LogLine::stop(5),
            r#"@nix {"action":"stop","id":5}"#.into(),
        ),
        (
            LogLine::error("cannot connect"),
            r#"@nix {"action":"msg","level":0,"msg":"error: cannot connect"}"#.into(),
        ),
        (
            LogLine::error("error: already prefixed"),
            r#"@nix {"action":"msg","level":0,"msg":"error: already prefixed"}"#.into(),
        ),
        (
            LogLine::warn("slow"),
            r#"@nix {"action":"msg","level":1,"msg":"warning: slow"}"#.into(),
        ),
        (
            LogLine::msg(Verbosity::Talkative, "x"),
            r#"@nix {"action":"msg","level":4,"msg":"x"}"#.into(),
        ),
        (
            LogLine::set_phase("buildPhase"),
            r#"@nix {"action":"setPhase","phase":"buildPhase"}"#.into(),
        ),
        (
            LogLine::Start {
                id: 9,
                level: Verbosity::Info,
                typ: 108,
                text: "t".into(),
                fields: vec![Field::Str("/nix/store/x".into()), "https://c".into()],
                parent: Some(8),
            },
            r#"@nix {"action":"start","fields":["/nix/store/x","https://c"],"id":9,"level":3,"parent":8,"text":"t","type":108}"#.into(),
        ),
    ];
    for (line, expect) in cases {
        assert_eq!(line.to_line(), format!("{expect}\n"));
        assert_eq!(line.to_string(), expect);
        // Everything we write parses back to itself.
        assert_eq!(LogLine::parse(&line.to_line()).unwrap(), line, "{expect}");
    }
}

/// A forwarded remote log line: a daemon's `STDERR_RESULT` of type 101 (`resBuildLogLine`) with
/// activity id 0x00001234_00000005, as Nix's `JSONLogger` writes it (`src/libutil/logging.cc`,
/// 2.26.3).
#[test]
fn reference_example_bytes() {
    let id = (0x1234u64 << 32) | 5;
    assert_eq!(
        LogLine::build_log_line(id, "hello").to_line(),
        "@nix {\"action\":\"result\",\"fields\":[\"hello\"],\"id\":20014547599365,\"type\":101}\n"
    );
}

#[test]
fn invalid_utf8_is_replaced_and_control_characters_escaped() {
    let l = LogLine::build_log_line(1, &b"a\xffb\xc3(\x1b[31mred\x7f\ttab\r\nnext\n"[..]);
    assert_eq!(
        l.to_line(),
        "@nix {\"action\":\"result\",\"fields\":[\"a\u{fffd}b\u{fffd}(\\u001b[31mred\u{7f}\\ttab\\r\\nnext\"],\"id\":1,\"type\":101}\n"
    );
    // Exactly one line, whatever the text.
    let m = LogLine::error(&b"multi\nline\0\"quoted\"\\"[..]).to_line();
    assert_eq!(m.matches('\n').count(), 1);
    assert!(m.contains(r#"multi\nline\u0000\"quoted\"\\"#), "{m}");
    // Non-ASCII stays raw UTF-8, as nlohmann writes it (ensure_ascii off).
    assert!(
        LogLine::warn("größe ✓")
            .to_line()
            .contains("warning: größe ✓")
    );
    // Byte lines parse lossily too.
    assert_eq!(
        LogLine::parse_bytes(b"@nix {\"action\":\"setPhase\",\"phase\":\"a\xffb\"}\n"),
        Ok(LogLine::set_phase("a\u{fffd}b"))
    );
}

#[test]
fn keys_are_sorted_in_every_shape() {
    let lines = [
        LogLine::start_build(1, DRV, "m"),
        LogLine::result_progress(1, 0, 0, 0, 0),
        LogLine::msg(Verbosity::Info, "x"),
        LogLine::set_phase("p"),
        LogLine::stop(1),
        LogLine::Start {
            id: 1,
            level: Verbosity::Vomit,
            typ: 0,
            text: String::new(),
            fields: vec![],
            parent: Some(1),
        },
    ];
    for l in lines {
        let v: serde_json::Value = serde_json::from_str(&l.to_json()).unwrap();
        let json = l.to_json();
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        let positions: Vec<usize> = keys
            .iter()
            .map(|k| json.find(&format!("\"{k}\":")).unwrap())
            .collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{json}");
    }
}

/// Lines as real Nix writes them (2.8 `--log-format internal-json`, 2.26 with `parent`, an
/// error with position keys) parse; shapes a 2.8 parent would choke on do not.
#[test]
fn parse_accepts_nix_lines_and_rejects_bad_shapes() {
    let ok = [
        (
            r#"@nix {"action":"start","id":121972776239105,"level":0,"text":"","type":102}"#,
            LogLine::Start {
                id: 121972776239105,
                level: Verbosity::Error,
                typ: 102,
                text: String::new(),
                fields: vec![],
                parent: None,
            },
        ),
        (
            r#"@nix {"action":"start","fields":["/nix/store/x.drv","",1,1],"id":3,"level":3,"parent":2,"text":"building '/nix/store/x.drv'","type":105}"#,
            LogLine::Start {
                id: 3,
                level: Verbosity::Info,
                typ: 105,
                text: "building '/nix/store/x.drv'".into(),
                fields: vec!["/nix/store/x.drv".into(), "".into(), 1.into(), 1.into()],
                parent: Some(2),
            },
        ),
        (
            r#"@nix {"action":"msg","column":null,"file":null,"level":0,"line":null,"msg":"error: x","raw_msg":"x"}"#,
            LogLine::Msg {
                level: Verbosity::Error,
                msg: "error: x".into(),
            },
        ),
        (
            r#"@nix {"action":"result","id":4,"type":104,"fields":["configurePhase"]}"#,
            LogLine::Result {
                id: 4,
                typ: ResultType::SetPhase.code(),
                fields: vec!["configurePhase".into()],
            },
        ),
        (
            r#"@nix {"action":"msg","level":12,"msg":"clamped"}"#,
            LogLine::msg(Verbosity::Vomit, "clamped"),
        ),
    ];
    for (line, expect) in ok {
        assert_eq!(LogLine::parse(line).unwrap(), expect, "{line}");
    }

    type Check = fn(&LogParseError) -> bool;
    let bad: [(&str, Check); 11] = [
        ("{\"action\":\"stop\",\"id\":1}", |e| {
            *e == LogParseError::NoPrefix
        }),
        ("@nix {", |e| {
            matches!(
                e,
                LogParseError::Json {
                    kind: "unexpected end",
                    ..
                }
            )
        }),
        ("@nix [1]", |e| *e == LogParseError::NotAnObject),
        ("@nix {\"id\":1}", |e| {
            matches!(e, LogParseError::BadKey { key: "action", .. })
        }),
        ("@nix {\"action\":\"frobnicate\"}", |e| {
            *e == LogParseError::UnknownAction("frobnicate".into())
        }),
        (r#"@nix {"action":"msg","level":"3","msg":"x"}"#, |e| {
            matches!(e, LogParseError::BadKey { key: "level", .. })
        }),
        (
            r#"@nix {"action":"start","id":1,"level":3,"type":105}"#,
            |e| matches!(e, LogParseError::BadKey { key: "text", .. }),
        ),
        (
            r#"@nix {"action":"start","level":3,"text":"","type":105}"#,
            |e| matches!(e, LogParseError::BadKey { key: "id", .. }),
        ),
        (
            r#"@nix {"action":"result","fields":[-1],"id":1,"type":105}"#,
            |e| matches!(e, LogParseError::BadKey { key: "fields", .. }),
        ),
        (
            r#"@nix {"action":"result","fields":[1.5],"id":1,"type":105}"#,
            |e| matches!(e, LogParseError::BadKey { key: "fields", .. }),
        ),
        (
            r#"@nix {"action":"result","fields":[null],"id":1,"type":105}"#,
            |e| matches!(e, LogParseError::BadKey { key: "fields", .. }),
        ),
    ];
    for (line, check) in bad {
        let err = LogLine::parse(line).unwrap_err();
        assert!(check(&err), "{line}: {err:?}");
    }
}

#[test]
fn codes_match_nix() {
    assert_eq!(Verbosity::Vomit as u8, 7);
    assert_eq!(Verbosity::from_code(3), Verbosity::Info);
    assert_eq!(ActivityType::Build.code(), 105);
    assert_eq!(ActivityType::FetchTree.code(), 112);
    assert_eq!(
        ActivityType::from_code(111),
        Some(ActivityType::BuildWaiting)
    );
    assert_eq!(ActivityType::from_code(113), None);
    assert_eq!(ResultType::FetchStatus.code(), 108);
    assert_eq!(ResultType::from_code(101), Some(ResultType::BuildLogLine));
    assert_eq!(ResultType::from_code(99), None);
}

#[test]
fn activity_ids_are_unique_and_never_zero() {
    let ids = ActivityIds::new();
    let first = ids.next_id();
    assert_eq!(first >> 32, u64::from(std::process::id()));
    assert_eq!(ids.next_id(), first + 1);
    let ids = ActivityIds::starting_at(0);
    assert_eq!(ids.next_id(), 1);
    let ids = ActivityIds::starting_at(u64::MAX);
    assert_eq!(ids.next_id(), u64::MAX);
    assert_ne!(ids.next_id(), 0);
}

fn run_readers(bytes: &[u8]) {
    block_on(async {
        let _ = read_settings(&mut &bytes[..]).await;
        let _ = read_request(&mut &bytes[..]).await;
        let _ = read_accepted(&mut &bytes[..]).await;
        // And as one conversation.
        let mut r = bytes;
        if read_settings(&mut r).await.is_ok() {
            while let Ok(HookRequest::Try(_)) = read_request(&mut r).await {}
        }
    });
}

proptest! {
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        run_readers(&bytes);
    }

    #[test]
    fn mutated_transcripts_never_panic(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = fixture("nix-2.8", "decline-first", "stdin.bin");
        for (i, b) in flips {
            let i = i.index(bytes.len());
            bytes[i] = b;
        }
        bytes.truncate(cut.index(bytes.len() + 1));
        run_readers(&bytes);
    }

    #[test]
    fn settings_round_trip(map in proptest::collection::btree_map(".{0,20}", ".{0,40}", 0..20)) {
        let s = Settings(map);
        let mut b = BytesMut::new();
        s.write(&mut b);
        let back = block_on(read_settings(&mut &b[..])).unwrap();
        prop_assert_eq!(back, s);
    }

    #[test]
    fn log_text_round_trips(text in any::<Vec<u8>>(), id in any::<u64>()) {
        let line = LogLine::build_log_line(id, &text[..]);
        let s = line.to_line();
        prop_assert!(s.ends_with('\n') && s.matches('\n').count() == 1);
        prop_assert_eq!(LogLine::parse(&s).unwrap(), line);
    }
}
