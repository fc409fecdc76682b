//! The Nix packaging (`flake.nix`, `nix/`): every file parses, the flake's outputs have the
//! promised shape, and the NixOS and nix-darwin modules put the hook where each Nix version
//! reads it and write a config file nixdock accepts.
//!
//! There is no nixpkgs here (no network), so the package and the modules are evaluated with
//! `nix/tests/stub-lib.nix` and `nix/tests/stub-pkgs.nix` by `nix/tests/eval-module.nix` and
//! `nix/tests/eval-flake.nix`, using the test bed's `nix-instantiate` (Debian's Nix 2.8).
//! Without it these tests skip loudly, or fail when `CI` is set (see `common::require_tool`).

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nixdock::cli::nix_version::has_nix_conf_bug;
use nixdock::config::{Config, DEFAULT_CONFIG_PATH};
use serde_json::{Value, json};

const NIX_INSTANTIATE: &str = "nix-instantiate";
const SYSTEMS: [&str; 4] = [
    "x86_64-linux",
    "aarch64-linux",
    "x86_64-darwin",
    "aarch64-darwin",
];

fn root() -> &'static Path {
    common::repo_root()
}

/// Runs nix-instantiate (read-only: nothing is written to the store) and returns its output.
fn nix_instantiate(args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(NIX_INSTANTIATE);
    cmd.arg("--readonly-mode").args(args).current_dir(root());
    common::run_with_timeout(cmd, Duration::from_secs(120)).unwrap_or_else(|e| panic!("{e}"))
}

/// `--arg NAME EXPR` pairs; JSON values go through a file so no quoting is needed.
struct Args {
    dir: tempfile::TempDir,
    list: Vec<String>,
}

impl Args {
    fn new() -> Args {
        Args {
            dir: tempfile::tempdir().unwrap(),
            list: Vec::new(),
        }
    }

    fn expr(mut self, name: &str, expr: &str) -> Args {
        self.list.extend(["--arg".into(), name.into(), expr.into()]);
        self
    }

    fn json(self, name: &str, value: &Value) -> Args {
        let file = self.dir.path().join(format!("{name}.json"));
        std::fs::write(&file, value.to_string()).unwrap();
        let expr = format!("builtins.fromJSON (builtins.readFile {})", file.display());
        self.expr(name, &expr)
    }

    fn str(mut self, name: &str, value: &str) -> Args {
        self.list
            .extend(["--argstr".into(), name.into(), value.into()]);
        self
    }
}

/// Evaluates `file` (relative to the repo) with `args`; Ok(JSON) or Err(stderr).
fn eval(file: &str, args: &Args) -> Result<Value, String> {
    let path = root().join(file);
    let mut all = vec!["--eval", "--strict", "--json", path.to_str().unwrap()];
    all.extend(args.list.iter().map(String::as_str));
    let out = nix_instantiate(&all);
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(serde_json::from_slice(&out.stdout).expect("nix-instantiate printed JSON"))
}

/// flake.nix's outputs against the stub nixpkgs, with `paths` run through the source filter.
/// (nix-instantiate calls the file's function only when given an argument.)
fn eval_flake(paths: Value) -> Value {
    eval(
        "nix/tests/eval-flake.nix",
        &Args::new().json("paths", &paths),
    )
    .unwrap()
}

#[derive(Clone, Copy, Debug)]
enum Module {
    NixOs,
    Darwin,
}

impl Module {
    fn file(self) -> PathBuf {
        root().join(match self {
            Module::NixOs => "nix/nixos-module.nix",
            Module::Darwin => "nix/darwin-module.nix",
        })
    }

    /// Where the module puts NIX_CONFIG for nix-daemon.
    fn daemon_env_path(self) -> &'static [&'static str] {
        match self {
            Module::NixOs => &["systemd", "services", "nix-daemon", "environment"],
            Module::Darwin => &[
                "launchd",
                "daemons",
                "nix-daemon",
                "serviceConfig",
                "EnvironmentVariables",
            ],
        }
    }

    /// The rest of the machine's configuration the module reads: a Docker engine on NixOS.
    fn machine(self) -> Value {
        match self {
            Module::NixOs => json!({ "virtualisation": { "docker": { "enable": true } } }),
            Module::Darwin => json!({}),
        }
    }
}

/// The module evaluated for `nix_version` with `services.nixdock = nixdock`.
fn eval_module(module: Module, nix_version: &str, nixdock: Value) -> Result<Value, String> {
    eval_module_with(module, nix_version, nixdock, module.machine(), None)
}

fn eval_module_with(
    module: Module,
    nix_version: &str,
    nixdock: Value,
    machine: Value,
    user_definitions: Option<&str>,
) -> Result<Value, String> {
    let mut args = Args::new()
        .expr("module", module.file().to_str().unwrap())
        .str("nixVersion", nix_version)
        .json("nixdock", &nixdock)
        .json("config", &machine);
    if let Some(defs) = user_definitions {
        args = args.expr("userDefinitions", defs);
    }
    eval("nix/tests/eval-module.nix", &args)
}

fn get<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(k))
}

fn cargo_manifest() -> toml::Table {
    std::fs::read_to_string(root().join("Cargo.toml"))
        .unwrap()
        .parse()
        .unwrap()
}

/// The TOML the module writes, parsed the way nixdock-hook parses /etc/nixdock/nixdock.toml.
fn module_config_file(result: &Value) -> Result<Config, String> {
    let etc = get(&result["config"], &["environment", "etc"]).expect("environment.etc is set");
    let name = DEFAULT_CONFIG_PATH.strip_prefix("/etc/").unwrap();
    let source = &etc[name]["source"];
    assert_eq!(
        source["stubData"]["format"], "toml",
        "{name} is not made with pkgs.formats.toml: {etc}"
    );
    let text = toml::to_string(&source["stubData"]["value"]).map_err(|e| e.to_string())?;
    Config::parse(&text, Path::new(DEFAULT_CONFIG_PATH)).map_err(|e| format!("{e}\n{text}"))
}

/// nixdock's commented example config (what `nixdock install` writes), uncommented: it names
/// every key nixdock reads.
fn every_config_key_as_toml() -> String {
    nixdock::cli::install::DEFAULT_CONFIG
        .lines()
        .filter_map(|l| l.strip_prefix("# "))
        .filter(|l| l.contains(" = ") || l.starts_with('['))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Every .nix file of the packaging, found on disk (not from a list in this test).
fn nix_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "nix") {
                out.push(p);
            }
        }
    }
    let mut files = vec![root().join("flake.nix")];
    walk(&root().join("nix"), &mut files);
    files.sort();
    files
}

#[test]
fn every_nix_file_parses() {
    if !common::require_tool(NIX_INSTANTIATE) {
        return;
    }
    let files = nix_files();
    for wanted in [
        "flake.nix",
        "nix/package.nix",
        "nix/nixos-module.nix",
        "nix/darwin-module.nix",
        "nix/tests/eval-module.nix",
    ] {
        assert!(
            files.contains(&root().join(wanted)),
            "{wanted} is missing: {files:?}"
        );
    }
    for f in &files {
        let out = nix_instantiate(&["--parse", f.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{} does not parse:\n{}",
            f.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn flake_outputs_have_the_promised_shape() {
    if !common::require_tool(NIX_INSTANTIATE) {
        return;
    }
    let f = eval_flake(json!([]));
    let names: BTreeSet<&str> = f["outputNames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for wanted in ["packages", "nixosModules", "darwinModules", "overlays"] {
        assert!(names.contains(wanted), "no {wanted} output: {names:?}");
    }
    assert_eq!(f["inputs"], json!(["nixpkgs"]), "only nixpkgs is an input");

    let manifest = cargo_manifest();
    let version = manifest["package"]["version"].as_str().unwrap();
    let licenses: Vec<&str> = manifest["workspace"]["package"]["license"]
        .as_str()
        .unwrap()
        .split(" OR ")
        .collect();
    let bins: Vec<&str> = manifest["bin"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    let lock = root().join("Cargo.lock");

    let mut systems: Vec<&str> = f["packageSystems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    systems.sort();
    let mut want = SYSTEMS.to_vec();
    want.sort();
    assert_eq!(systems, want);

    let check_package = |what: &str, p: &Value| {
        assert_eq!(p["isDerivation"], true, "{what}");
        assert_eq!(p["pname"], "nixdock", "{what}");
        assert_eq!(p["version"], version, "{what}: version is Cargo.toml's");
        assert_eq!(
            p["cargoLock"],
            lock.to_str().unwrap(),
            "{what}: the repo's lock"
        );
        assert_eq!(
            p["meta"]["license"],
            json!(licenses),
            "{what}: Cargo's licence"
        );
        assert_eq!(
            p["meta"]["description"],
            manifest["package"]["description"].as_str().unwrap(),
            "{what}"
        );
        let main = p["meta"]["mainProgram"].as_str().unwrap();
        assert_eq!(main, "nixdock", "{what}");
        assert!(bins.contains(&main), "{what}: mainProgram is not a [[bin]]");
        let platforms = p["meta"]["platforms"].as_array().unwrap();
        for s in SYSTEMS {
            assert!(
                platforms.contains(&json!(s)),
                "{what}: {s} not in platforms"
            );
        }
        // The sandbox has no Docker; the package must not run the integration tests.
        assert_eq!(p["doCheck"], false, "{what}");
    };
    for s in SYSTEMS {
        let pkgs = &f["packages"][s];
        check_package(&format!("packages.{s}.nixdock"), &pkgs["nixdock"]);
        check_package(&format!("packages.{s}.default"), &pkgs["default"]);
        assert_eq!(f["defaultIsNixdock"][s], true, "packages.{s}.default");
    }
    check_package("overlays.default's nixdock", &f["overlay"]);

    for (output, file) in [
        ("nixosModule", "nix/nixos-module.nix"),
        ("darwinModule", "nix/darwin-module.nix"),
    ] {
        assert_eq!(
            f[output],
            json!([root().join(file).to_str().unwrap()]),
            "{output}s.default imports the module file"
        );
    }
}

fn copy_tree(from: &Path, to: &Path) {
    if from.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap().flatten() {
            copy_tree(&e.path(), &to.join(e.file_name()));
        }
    } else {
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(from, to).unwrap();
    }
}

/// Real Nix (the test bed's, with flakes enabled for the command) reads flake.nix as a flake,
/// with nixpkgs overridden by a flake made of the stubs: the schema of inputs and outputs is
/// what `nix flake show` understands. This copies the evaluated files to the store.
#[test]
fn nix_reads_the_flake_with_a_stub_nixpkgs() {
    if !common::require_tool("nix") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // What evaluating the flake reads (not the sources, which only a build would).
    let src = tmp.path().join("src");
    for part in ["flake.nix", "nix", "Cargo.toml", "Cargo.lock"] {
        copy_tree(&root().join(part), &src.join(part));
    }
    let stub = tmp.path().join("stub");
    for part in ["stub-lib.nix", "stub-pkgs.nix"] {
        copy_tree(&root().join("nix/tests").join(part), &stub.join(part));
    }
    let systems = SYSTEMS.map(|s| format!("\"{s}\"")).join(" ");
    std::fs::write(
        stub.join("flake.nix"),
        format!(
            "{{ outputs = {{ self }}: let lib = import ./stub-lib.nix; in {{\n\
             inherit lib;\n\
             legacyPackages = lib.genAttrs [ {systems} ] (system: import ./stub-pkgs.nix {{ inherit lib system; }});\n\
             }}; }}\n"
        ),
    )
    .unwrap();
    let mut cmd = Command::new("nix");
    cmd.args([
        "--extra-experimental-features",
        "nix-command flakes",
        "flake",
        "show",
        "--json",
        "--no-write-lock-file",
        "--override-input",
        "nixpkgs",
    ])
    .arg(format!("path:{}", stub.display()))
    .arg(format!("path:{}", src.display()));
    let out = common::run_with_timeout(cmd, Duration::from_secs(120)).unwrap();
    assert!(
        out.status.success(),
        "nix flake show failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let show: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        show["nixosModules"]["default"]["type"], "nixos-module",
        "{show}"
    );
    assert_eq!(
        show["overlays"]["default"]["type"], "nixpkgs-overlay",
        "{show}"
    );
    assert!(show.get("darwinModules").is_some(), "{show}");
    let version = cargo_manifest()["package"]["version"]
        .as_str()
        .unwrap()
        .to_string();
    for s in SYSTEMS {
        for name in ["default", "nixdock"] {
            let p = &show["packages"][s][name];
            assert_eq!(p["type"], "derivation", "packages.{s}.{name}: {show}");
            assert_eq!(
                p["name"],
                format!("nixdock-{version}"),
                "packages.{s}.{name}"
            );
        }
    }
}

/// The package's installCheckPhase runs `$out/bin/<prog> <args> | grep -F '<text>'`; the same
/// commands against the binaries cargo just built must pass, or the Nix build would fail.
#[test]
fn install_check_passes_against_the_real_binaries() {
    if !common::require_tool(NIX_INSTANTIATE) {
        return;
    }
    let f = eval_flake(json!([]));
    let phase = f["packages"]["x86_64-linux"]["default"]["installCheckPhase"]
        .as_str()
        .unwrap();
    let mut checked = BTreeSet::new();
    for line in phase.lines().filter(|l| l.contains("$out/bin/")) {
        let (cmd, grep) = line
            .split_once(" | grep -F ")
            .expect("`cmd | grep -F text`");
        let mut words = cmd.split_whitespace();
        let prog = words.next().unwrap().strip_prefix("$out/bin/").unwrap();
        let exe = match prog {
            "nixdock" => env!("CARGO_BIN_EXE_nixdock"),
            "nixdock-hook" => env!("CARGO_BIN_EXE_nixdock-hook"),
            other => panic!("installCheckPhase runs an unknown program {other}"),
        };
        let text = grep.trim().trim_matches('\'');
        let out = Command::new(exe).args(words).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{line}: {}", out.status);
        assert!(stdout.contains(text), "{line}: output was {stdout:?}");
        checked.insert(prog);
    }
    // Both programs are installed and checked.
    assert_eq!(checked, BTreeSet::from(["nixdock", "nixdock-hook"]));
}

/// The package's source filter keeps exactly the crates' manifests, sources and the lock: the
/// build must see everything it compiles, and edits elsewhere must not change the source.
#[test]
fn source_filter_keeps_what_cargo_builds() {
    if !common::require_tool(NIX_INSTANTIATE) {
        return;
    }
    // Every entry of the working tree except VCS data and build output (their top directory
    // itself is included, to see it dropped).
    fn walk(dir: &Path, rel: &str, out: &mut Vec<(String, bool)>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let r = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            let is_dir = e.file_type().unwrap().is_dir();
            out.push((r.clone(), is_dir));
            let skip = rel.is_empty() && (name == ".git" || name.starts_with("target"));
            if is_dir && !skip {
                walk(&e.path(), &r, out);
            }
        }
    }
    let mut entries = Vec::new();
    walk(root(), "", &mut entries);
    let paths: Vec<Value> = entries
        .iter()
        .map(|(p, d)| json!({ "path": p, "type": if *d { "directory" } else { "regular" } }))
        .collect();
    let f = eval_flake(Value::Array(paths));
    let kept_entries: BTreeSet<String> = f["sourceFilter"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kept"] == true)
        .map(|e| e["path"].as_str().unwrap().to_string())
        .collect();
    // builtins.path only descends into directories the filter keeps.
    let in_source = |p: &str| {
        let mut prefix = String::new();
        p.split('/').all(|part| {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            kept_entries.contains(&prefix)
        })
    };
    let files: Vec<&str> = entries
        .iter()
        .filter(|(_, d)| !d)
        .map(|(p, _)| p.as_str())
        .collect();
    let needed = |p: &str| {
        matches!(p, "Cargo.toml" | "Cargo.lock" | "hook-protocol/Cargo.toml")
            || p.starts_with("src/")
            || p.starts_with("hook-protocol/src/")
    };
    for p in &files {
        assert_eq!(
            in_source(p),
            needed(p),
            "{p}: {}",
            if needed(p) {
                "the build needs it but the filter drops it"
            } else {
                "the filter keeps it but the build does not read it"
            }
        );
    }
    assert!(files.contains(&"src/builder/entry.sh"), "walk saw src/");
    assert!(!in_source("target"), "target/ is filtered out");
}

#[test]
fn hook_setting_follows_the_nix_version() {
    if !common::require_tool(NIX_INSTANTIATE) {
        return;
    }
    // Debian's 2.8, the edges of the 2.25-2.33 bug, versions inside it, and after the fix.
    for version in [
        "2.8.0", "2.24.12", "2.25.0", "2.26.3", "2.33.9", "2.34.0", "2.35.2",
    ] {
        let (major, minor) = nixdock::cli::nix_version::parse_nix_version(version).unwrap();
        let buggy = has_nix_conf_bug((major, minor));
        for module in [Module::NixOs, Module::Darwin] {
            let what = format!("{module:?} with Nix {version}");
            let r = eval_module(module, version, json!({ "enable": true })).unwrap();
            let hook = r["services"]["nixdock"]["hook"].as_str().unwrap();
            let package = r["services"]["nixdock"]["package"]["storePath"]
                .as_str()
                .unwrap();
            assert_eq!(hook, format!("{package}/bin/nixdock-hook"), "{what}");
            let in_settings = get(&r["config"], &["nix", "settings", "build-hook"]);
            let env = get(&r["config"], module.daemon_env_path());
            if buggy {
                // Exactly what `nixdock install` gives the daemon for these versions.
                let dropin = nixdock::cli::install::systemd_dropin(Path::new(hook));
                let want = dropin
                    .lines()
                    .find_map(|l| l.strip_prefix("Environment=\"NIX_CONFIG="))
                    .and_then(|v| v.strip_suffix('"'))
                    .unwrap();
                assert_eq!(
                    env.and_then(|e| e.get("NIX_CONFIG")),
                    Some(&json!(want)),
                    "{what}: NIX_CONFIG for nix-daemon: {r}"
                );
                assert_eq!(in_settings, None, "{what}: nix.conf is ignored there");
            } else {
                assert_eq!(in_settings, Some(&json!(hook)), "{what}: {r}");
                assert_eq!(
                    env.and_then(|e| e.get("NIX_CONFIG")),
                    None,
                    "{what}: NIX_CONFIG not needed"
                );
            }
            assert_eq!(r["failedAssertions"], json!([]), "{what}");
            // The CLI is installed too (nixdock doctor, status, ...).
            assert_eq!(
                get(&r["config"], &["environment", "systemPackages"]),
                Some(&json!([{ "storePath": package, "stubData": null }])),
                "{what}"
            );
        }
    }
}

#[test]
fn disabled_module_sets_nothing() {
    if !common::require_tool(NIX_INSTANTIATE) {
        return;
    }
    for module in [Module::NixOs, Module::Darwin] {
        for nixdock in [
            json!({}),
            json!({ "enable": false, "settings": { "offload-local": true } }),
        ] {
            let r = eval_module(module, "2.26.3", nixdock.clone()).unwrap();
            assert_eq!(r["config"], json!({}), "{module:?} {nixdock}: {r}");
        }
    }
}

#[test]
fn config_file_is_the_one_nixdock_reads() {
    if !common::require_tool(NIX_INSTANTIATE) {
        return;
    }
    let every_key = every_config_key_as_toml();
    let expected = Config::parse(&every_key, Path::new("example")).unwrap();
    assert!(
        !expected.builders.is_empty() && expected.docker_host.is_some(),
        "the example names builders and docker-host: {every_key}"
    );
    // TOML → JSON is how a user's settings look to the module.
    let settings: Value = serde_json::to_value(every_key.parse::<toml::Table>().unwrap()).unwrap();
    for module in [Module::NixOs, Module::Darwin] {
        // Every key nixdock documents is a module option, and comes back unchanged.
        let r = eval_module(
            module,
            "2.35.2",
            json!({ "enable": true, "settings": settings }),
        )
        .unwrap_or_else(|e| panic!("{module:?} rejects nixdock's own keys: {e}"));
        assert_eq!(module_config_file(&r).unwrap(), expected, "{module:?}");

        // No settings: an empty file, i.e. nixdock's defaults.
        let r = eval_module(module, "2.35.2", json!({ "enable": true })).unwrap();
        assert_eq!(
            module_config_file(&r).unwrap(),
            Config::default(),
            "{module:?}"
        );

        // A builder with only some keys: the rest stay out of the file (no nulls in TOML).
        let r = eval_module(
            module,
            "2.26.3",
            json!({ "enable": true, "settings": { "builders": { "aarch64-linux": { "memory": "2g", "cpus": 1.5 } } } }),
        )
        .unwrap();
        let c = module_config_file(&r).unwrap();
        let b = &c.builders["aarch64-linux"];
        assert_eq!(
            (b.memory.as_deref(), b.cpus, b.image.as_deref()),
            (Some("2g"), Some(1.5), None),
            "{module:?}"
        );
    }
}

/// Keys and values nixdock rejects fail the evaluation, naming the key, instead of reaching
/// the file and failing every build.
#[test]
fn settings_nixdock_rejects_fail_evaluation() {
    if !common::require_tool(NIX_INSTANTIATE) {
        return;
    }
    for module in [Module::NixOs, Module::Darwin] {
        for (settings, needle) in [
            (json!({ "dockr-host": "x" }), "dockr-host"),
            (
                json!({ "builders": { "x86_64-linux": { "imgae": "x" } } }),
                "imgae",
            ),
            (
                json!({ "builders": { "x86_64-linux": { "max-jobs": 0 } } }),
                "max-jobs",
            ),
            (json!({ "offload-local": "yes" }), "offload-local"),
        ] {
            // nixdock itself rejects the same file.
            let text = toml::to_string(&settings).unwrap();
            assert!(
                Config::parse(&text, Path::new("x")).is_err(),
                "nixdock accepts {text}"
            );
            let e = eval_module(
                module,
                "2.35.2",
                json!({ "enable": true, "settings": settings }),
            )
            .expect_err(&format!("{module:?} accepts {settings}"));
            assert!(e.contains(needle), "{module:?} {settings}: {e}");
        }
    }
}

/// Values nixdock checks when it loads the file (system names, memory, cpus, extra-nix-conf)
/// are checked by the modules too, with the same verdict.
#[test]
fn settings_values_get_nixdocks_verdict() {
    if !common::require_tool(NIX_INSTANTIATE) {
        return;
    }
    let cases = [
        ("x86_64-linux", json!({})),
        ("linux", json!({})),
        ("x86_64-linux", json!({ "memory": "8g" })),
        ("x86_64-linux", json!({ "memory": "512 MB" })),
        ("x86_64-linux", json!({ "memory": "1048576" })),
        ("x86_64-linux", json!({ "memory": "lots" })),
        ("x86_64-linux", json!({ "memory": "1.5g" })),
        ("x86_64-linux", json!({ "memory": "" })),
        ("x86_64-linux", json!({ "cpus": 0.5 })),
        ("x86_64-linux", json!({ "cpus": -1.0 })),
        ("x86_64-linux", json!({ "cpus": 2 })),
        ("x86_64-linux", json!({ "speed-factor": 2.5 })),
        ("x86_64-linux", json!({ "speed-factor": 0.0 })),
        ("x86_64-linux", json!({ "speed-factor": -1 })),
        (
            "x86_64-linux",
            json!({ "extra-nix-conf": ["keep-outputs = true"] }),
        ),
        (
            "x86_64-linux",
            json!({ "extra-nix-conf": ["a = 1\nb = 2"] }),
        ),
        (
            "x86_64-linux",
            json!({ "extra-nix-conf": ["keep-outputs = true", "trusted-users = root alice"] }),
        ),
        (
            "x86_64-linux",
            json!({ "extra-nix-conf": ["keep-outputs = true", "extra-trusted-users = alice"] }),
        ),
        (
            "x86_64-linux",
            json!({ "extra-nix-conf": ["keep-outputs = true", "trusted-users=*"] }),
        ),
        (
            "x86_64-linux",
            json!({ "extra-nix-conf": ["keep-outputs = true", "allowed-users = alice"] }),
        ),
        (
            "x86_64-linux",
            json!({ "extra-nix-conf": ["keep-outputs = true", "build-users-group ="] }),
        ),
        (
            "x86_64-linux",
            json!({ "extra-nix-conf": ["keep-outputs = true", "extra-build-users-group = x"] }),
        ),
        (
            "x86_64-linux",
            json!({ "extra-nix-conf": ["keep-outputs = true", "require-sigs = false"] }),
        ),
        (
            "x86_64-linux",
            json!({ "extra-nix-conf": ["keep-outputs = true", "auto-allocate-uids = true"] }),
        ),
        (
            "x86_64-linux",
            json!({ "extra-nix-conf": ["keep-outputs = true", "require-drop-supplementary-groups = false"] }),
        ),
        (
            "x86_64-linux",
            json!({ "extra-nix-conf": ["keep-outputs = true", "!include /etc/nix/x.conf"] }),
        ),
        (
            "x86_64-linux",
            json!({ "extra-nix-conf": ["keep-outputs = true", "include /etc/nix/x.conf"] }),
        ),
        (
            "x86_64-linux",
            json!({ "extra-nix-conf": ["keep-outputs = true", "# trusted-users = alice"] }),
        ),
        (
            "x86_64-linux",
            json!({ "extra-nix-conf": ["keep-outputs = true", "max-jobs = 2 # trusted-users = alice"] }),
        ),
        (
            "x86_64-linux",
            json!({ "extra-nix-conf": ["keep-outputs = true", "sandbox = false"] }),
        ),
        (
            "x86_64-linux",
            json!({ "extra-nix-conf": ["keep-outputs = true", "build-hook = /bin/false"] }),
        ),
        (
            "x86_64-linux",
            json!({ "extra-nix-conf": ["keep-outputs = true", "extra-trusted-public-keys = k:AAAA"] }),
        ),
        (
            "x86_64-linux",
            json!({ "extra-nix-conf": ["keep-outputs = true", "  trusted-users   =   alice  "] }),
        ),
    ];
    let mut verdicts = BTreeSet::new();
    for (system, builder) in cases {
        let settings = json!({ "builders": { system: builder } });
        let text = toml::to_string(&settings).unwrap();
        let nixdock_ok = Config::parse(&text, Path::new("x")).is_ok();
        verdicts.insert(nixdock_ok);
        for module in [Module::NixOs, Module::Darwin] {
            let module_ok = match eval_module(
                module,
                "2.35.2",
                json!({ "enable": true, "settings": settings }),
            ) {
                Ok(r) => r["failedAssertions"] == json!([]),
                Err(_) => false,
            };
            assert_eq!(
                module_ok, nixdock_ok,
                "{module:?} and nixdock disagree about {text}"
            );
        }
    }
    // The cases cover both verdicts.
    assert_eq!(verdicts.len(), 2);
    // A refused extra-nix-conf line is named, with why, as nixdock names it.
    let settings = json!({ "builders": { "x86_64-linux": {
        "extra-nix-conf": ["extra-trusted-users = alice"] } } });
    for module in [Module::NixOs, Module::Darwin] {
        let r = eval_module(
            module,
            "2.35.2",
            json!({ "enable": true, "settings": settings }),
        )
        .unwrap();
        let failed = r["failedAssertions"].to_string();
        assert!(
            failed.contains("extra-nix-conf line \\\"extra-trusted-users = alice\\\" is refused")
                && failed.contains("only root (nixdock) may be trusted"),
            "{module:?}: {failed}"
        );
    }
}

/// On 2.25-2.33 the hook depends on nix-daemon's NIX_CONFIG: another definition of it must be
/// an error, not a silent loss of the hook; lib.mkForce is the documented way to take over.
#[test]
fn another_daemon_nix_config_conflicts_loudly() {
    if !common::require_tool(NIX_INSTANTIATE) {
        return;
    }
    for module in [Module::NixOs, Module::Darwin] {
        let path = module.daemon_env_path().join(".");
        let defs = |value: &str| format!("lib: {{ {path}.NIX_CONFIG = {value}; }}");
        let e = eval_module_with(
            module,
            "2.26.3",
            json!({ "enable": true }),
            module.machine(),
            Some(&defs("\"max-jobs = 4\"")),
        )
        .expect_err("two NIX_CONFIG definitions");
        assert!(
            e.contains("conflicting definition values") && e.contains("NIX_CONFIG"),
            "{module:?}: {e}"
        );
        let r = eval_module_with(
            module,
            "2.26.3",
            json!({ "enable": true }),
            module.machine(),
            Some(&defs("lib.mkForce \"max-jobs = 4\"")),
        )
        .unwrap();
        let env = get(&r["config"], module.daemon_env_path()).unwrap();
        assert_eq!(env["NIX_CONFIG"], "max-jobs = 4", "{module:?}");
        // Outside the buggy range the module leaves NIX_CONFIG alone: no conflict.
        eval_module_with(
            module,
            "2.34.0",
            json!({ "enable": true }),
            module.machine(),
            Some(&defs("\"max-jobs = 4\"")),
        )
        .unwrap();
    }
}

#[test]
fn nixos_needs_a_docker_engine() {
    if !common::require_tool(NIX_INSTANTIATE) {
        return;
    }
    let enabled = json!({ "enable": true });
    // The module turns Docker on, as a default the user can override without a conflict.
    let r = eval_module(Module::NixOs, "2.35.2", enabled.clone()).unwrap();
    assert_eq!(
        get(&r["config"], &["virtualisation", "docker", "enable"]),
        Some(&json!(true))
    );
    let r = eval_module_with(
        Module::NixOs,
        "2.35.2",
        enabled.clone(),
        json!({ "virtualisation": { "docker": { "enable": false } } }),
        Some("{ virtualisation.docker.enable = false; }"),
    )
    .unwrap();
    assert_eq!(
        get(&r["config"], &["virtualisation", "docker", "enable"]),
        Some(&json!(false))
    );
    // ... but then there is no engine at all: a failed assertion that says what to do.
    let failed = r["failedAssertions"].as_array().unwrap();
    assert_eq!(failed.len(), 1, "{r}");
    let msg = failed[0].as_str().unwrap();
    assert!(
        msg.contains("Docker engine") && msg.contains("docker-host"),
        "{msg}"
    );

    // Podman, or an engine named in docker-host, is enough.
    let no_docker = json!({ "virtualisation": { "docker": { "enable": false } } });
    let podman = json!({ "virtualisation": { "docker": { "enable": false }, "podman": { "enable": true } } });
    for (nixdock, machine) in [
        (
            json!({ "enable": true, "settings": { "docker-host": "unix:///run/x.sock" } }),
            no_docker,
        ),
        (enabled.clone(), podman),
    ] {
        let r = eval_module_with(Module::NixOs, "2.35.2", nixdock, machine, None).unwrap();
        assert_eq!(r["failedAssertions"], json!([]), "{r}");
    }
}

#[test]
fn nixos_emulation_is_opt_in_with_the_fix_binary_flag() {
    if !common::require_tool(NIX_INSTANTIATE) {
        return;
    }
    let r = eval_module(Module::NixOs, "2.35.2", json!({ "enable": true })).unwrap();
    assert_eq!(get(&r["config"], &["boot"]), None, "no binfmt by default");

    let r = eval_module(
        Module::NixOs,
        "2.35.2",
        json!({ "enable": true, "emulatedSystems": ["aarch64-linux"] }),
    )
    .unwrap();
    let binfmt = get(&r["config"], &["boot", "binfmt"]).unwrap();
    assert_eq!(binfmt["emulatedSystems"], json!(["aarch64-linux"]));
    // F: the kernel opens the (static) emulator at registration, so it works in containers.
    assert_eq!(
        binfmt["registrations"]["aarch64-linux"]["fixBinary"], true,
        "{binfmt}"
    );
    assert_eq!(binfmt["preferStaticEmulators"], true, "{binfmt}");
    // In extra-platforms the host would build them itself and the hook would decline them.
    assert_eq!(binfmt["addEmulatedSystemsToNixSandbox"], false, "{binfmt}");

    let r = eval_module(
        Module::NixOs,
        "2.35.2",
        json!({ "enable": true, "emulatedSystems": ["aarch64-darwin"] }),
    )
    .unwrap();
    let failed = r["failedAssertions"].as_array().unwrap();
    assert!(
        failed.len() == 1 && failed[0].as_str().unwrap().contains("aarch64-darwin"),
        "{r}"
    );
}

#[test]
fn modules_refuse_an_unmanaged_nix() {
    if !common::require_tool(NIX_INSTANTIATE) {
        return;
    }
    for module in [Module::NixOs, Module::Darwin] {
        for version in ["2.26.3", "2.35.2"] {
            let mut machine = module.machine();
            machine["nix"] = json!({ "enable": false });
            let r = eval_module_with(module, version, json!({ "enable": true }), machine, None)
                .unwrap();
            let failed = r["failedAssertions"].as_array().unwrap();
            assert!(
                failed.len() == 1 && failed[0].as_str().unwrap().contains("nix.enable"),
                "{module:?}: {r}"
            );
            // Only the assertion speaks: no nix.* or daemon definitions to trip over.
            assert_eq!(get(&r["config"], &["nix"]), None, "{module:?} {version}");
            assert_eq!(
                get(&r["config"], module.daemon_env_path()),
                None,
                "{module:?} {version}"
            );
        }
    }
}

/// A wrapper given as `hook` is what Nix gets, wherever the version wants it.
#[test]
fn hook_option_reaches_nix() {
    if !common::require_tool(NIX_INSTANTIATE) {
        return;
    }
    let nixdock = json!({ "enable": true, "hook": "/opt/wrap/nixdock-hook" });
    for module in [Module::NixOs, Module::Darwin] {
        let r = eval_module(module, "2.35.2", nixdock.clone()).unwrap();
        assert_eq!(
            get(&r["config"], &["nix", "settings", "build-hook"]),
            Some(&json!("/opt/wrap/nixdock-hook")),
            "{module:?}"
        );
        let r = eval_module(module, "2.26.3", nixdock.clone()).unwrap();
        let env = get(&r["config"], module.daemon_env_path()).unwrap();
        assert_eq!(
            env["NIX_CONFIG"], "build-hook = /opt/wrap/nixdock-hook",
            "{module:?}"
        );
    }
}

/// On macOS the engine's socket is in a user's home, where the root hook never looks: the
/// nix-darwin module warns until `docker-host` names it, and the README's example (Docker
/// Desktop) reaches the config file.
#[test]
fn darwin_module_asks_for_docker_host() {
    if !common::require_tool(NIX_INSTANTIATE) {
        return;
    }
    let r = eval_module(Module::Darwin, "2.26.3", json!({ "enable": true })).unwrap();
    let warnings = r["config"]["warnings"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        warnings.len() == 1
            && warnings[0]
                .as_str()
                .unwrap()
                .contains("services.nixdock.settings.docker-host is not set"),
        "{r}"
    );
    let addr = "unix:///Users/alice/.docker/run/docker.sock";
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    assert!(
        readme.contains(&format!(
            "services.nixdock.settings.docker-host = \"{addr}\";"
        )),
        "the README's nix-darwin example names Docker Desktop's socket"
    );
    let r = eval_module(
        Module::Darwin,
        "2.26.3",
        json!({ "enable": true, "settings": { "docker-host": addr } }),
    )
    .unwrap();
    let warnings = r["config"]["warnings"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(warnings.is_empty(), "{r}");
    assert_eq!(
        module_config_file(&r).unwrap().docker_host.as_deref(),
        Some(addr)
    );
}

/// `services.nixdock.serve`: off by default; on, a service runs `nixdock serve --listen` with
/// the given address (a systemd unit on NixOS, a launchd daemon on nix-darwin).
#[test]
fn serve_service_is_opt_in() {
    if !common::require_tool(NIX_INSTANTIATE) {
        return;
    }
    for module in [Module::NixOs, Module::Darwin] {
        let unit_path: &[&str] = match module {
            Module::NixOs => &["systemd", "services", "nixdock-serve"],
            Module::Darwin => &["launchd", "daemons", "nixdock-serve"],
        };
        let r = eval_module(module, "2.35.2", json!({ "enable": true })).unwrap();
        assert_eq!(get(&r["config"], unit_path), None, "{module:?}: {r}");
        let r = eval_module(
            module,
            "2.35.2",
            json!({ "enable": true, "serve": { "enable": true, "listen": "127.0.0.2:22" } }),
        )
        .unwrap();
        let unit = get(&r["config"], unit_path).unwrap_or_else(|| panic!("{module:?}: {r}"));
        let command = match module {
            Module::NixOs => unit["serviceConfig"]["ExecStart"]
                .as_str()
                .unwrap()
                .to_string(),
            Module::Darwin => unit["serviceConfig"]["ProgramArguments"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect::<Vec<_>>()
                .join(" "),
        };
        assert!(
            command.ends_with("/bin/nixdock serve --listen 127.0.0.2:22"),
            "{module:?}: {command}"
        );
        // An address without a port is refused when evaluating.
        let bad = eval_module(
            module,
            "2.35.2",
            json!({ "enable": true, "serve": { "enable": true, "listen": "127.0.0.2" } }),
        );
        assert!(bad.is_err(), "{module:?}: {bad:?}");
    }
}
