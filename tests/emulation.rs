//! Emulated systems built by the native builder (issue 16, `emulation = "native-builder"`, the
//! default): the host's Nix 2.8, the real hook, real builder containers on the host's engine,
//! and aarch64 programs run by the kernel through binfmt_misc's qemu-aarch64 (flag F).
//!
//! The builder's `/bin/sh` is the native container's (x86_64), so a derivation that wants to
//! show it ran aarch64 code runs an aarch64 program: `uname` from the test bed's arm64 image,
//! with that image's dynamic loader and libc, added to the host's store as one input path.
//!
//! Each test has an installation of its own (its own instance id, so its own containers).

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

use common::output_text as text;

/// An installation of the test's own, with what these tests ask of it.
struct Install(common::OwnInstall);

impl std::ops::Deref for Install {
    type Target = common::OwnInstall;
    fn deref(&self) -> &common::OwnInstall {
        &self.0
    }
}

impl Install {
    fn new(config: &str) -> Install {
        Install(common::OwnInstall::new("emulation", config))
    }

    /// The names of this installation's containers.
    fn containers(&self) -> Vec<String> {
        common::docker_ok([
            "ps",
            "-a",
            "--format",
            "{{.Names}}",
            "--filter",
            &format!(
                "label=nixdock.instance={}",
                self.instance().expect("an instance id")
            ),
        ])
        .split_whitespace()
        .map(String::from)
        .collect()
    }
}

/// The aarch64 `uname` with its loader and libc, from the test bed's arm64 image, as a store
/// path of the host's store (added once per test binary).
fn aarch64_uname() -> &'static str {
    static P: OnceLock<String> = OnceLock::new();
    P.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(common::unique_name("aarch64-probe"))
            .join("aarch64-uname");
        std::fs::create_dir_all(&dir).unwrap();
        let name = common::unique_name("nixdock-test-arm64-files");
        let _guard = common::ContainerGuard(name.clone());
        common::docker_ok([
            "create",
            "--name",
            &name,
            &common::image("bookworm-arm64"),
            "/bin/true",
        ]);
        for f in [
            "/usr/lib/aarch64-linux-gnu/ld-linux-aarch64.so.1",
            "/usr/lib/aarch64-linux-gnu/libc.so.6",
            "/usr/bin/uname",
        ] {
            // -L: the library names are symlinks in the image.
            common::docker_ok(["cp", "-L", &format!("{name}:{f}"), dir.to_str().unwrap()]);
        }
        let o = Command::new("nix-store")
            .arg("--add")
            .arg(&dir)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    })
}

/// An aarch64-linux derivation that writes `uname -m` as its aarch64 program sees it, and
/// whether it sees the builder's `/usr/bin` (shell builtins only besides the program: a
/// sandboxed build has nothing else).
fn uname_expr(name: &str) -> String {
    let p = aarch64_uname();
    let script = format!(
        "{p}/ld-linux-aarch64.so.1 --library-path {p} {p}/uname -m > $out; \
         if [ -e /usr/bin ]; then echo usr-bin >> $out; else echo no-usr-bin >> $out; fi"
    );
    format!(
        "derivation {{ name = \"{name}\"; system = \"aarch64-linux\"; builder = \"/bin/sh\"; \
         args = [\"-c\" {script:?}]; probe = builtins.storePath \"{p}\"; nonce = \"{}\"; }}",
        common::unique_name("n")
    )
}

fn config(image: &str, top: &str, max_jobs: u32) -> String {
    format!(
        "{top}[builders.\"x86_64-linux\"]\nimage = \"{}\"\nidle-timeout = 120\nmax-jobs = \
         {max_jobs}\n[builders.\"aarch64-linux\"]\n",
        common::image(image)
    )
}

/// The default: an aarch64-linux derivation is built by the x86_64 builder, its program run
/// by the kernel as aarch64 (through binfmt_misc), with no aarch64 container anywhere; Nix's
/// syscall filter stays on (the daemon is native), and status says which container serves it.
#[test]
fn aarch64_is_built_by_the_native_builder() {
    if !common::require_bed() {
        return;
    }
    let i = Install::new(&config("bookworm-amd64", "", 4));
    let o = i.build(&uname_expr("emulated-native"));
    let out = std::fs::read_to_string(common::out_path(&o)).unwrap();
    assert_eq!(out, "aarch64\nusr-bin\n", "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("on 'nixdock aarch64-linux builder'"),
        "{}",
        text(&o)
    );
    let native = i.container("x86_64-linux");
    assert_eq!(
        i.containers(),
        std::slice::from_ref(&native),
        "one container, the native one"
    );
    let conf = common::docker_ok(["exec", &native, "cat", "/etc/nix/nix.conf"]);
    assert!(
        conf.lines().any(|l| l == "extra-platforms = aarch64-linux"),
        "{conf}"
    );
    assert!(!conf.contains("filter-syscalls"), "{conf}");
    let st = i.status("aarch64-linux");
    assert_eq!(st["container"], native.as_str(), "{st}");
    assert_eq!(st["served_by"], "x86_64-linux", "{st}");
    assert_eq!(st["emulated"], true, "{st}");
    assert_eq!(st["state"], "running", "{st}");
    let table = i.cli(&["status", "--no-size"]);
    assert!(
        text(&table).contains(&format!("aarch64-linux: built in {native}")),
        "{}",
        text(&table)
    );
}

/// With the native builder sandboxed (`sandbox = true`, the trixie image for its static
/// shell), an aarch64-linux build runs in Nix's sandbox too: its aarch64 program runs (binfmt's
/// F flag opened qemu when it was registered, so nothing of it needs to be in the sandbox) and
/// it sees no `/usr/bin`. Before, `sandbox = true` on an emulated builder was refused.
#[test]
fn aarch64_build_is_sandboxed_in_a_sandboxed_native_builder() {
    if !common::require_bed() {
        return;
    }
    let i = Install::new(&config("trixie-amd64", "sandbox = true\n", 4));
    let o = i.build(&uname_expr("emulated-sandboxed"));
    let out = std::fs::read_to_string(common::out_path(&o)).unwrap();
    assert_eq!(out, "aarch64\nno-usr-bin\n", "{}", text(&o));
    assert_eq!(i.containers(), [i.container("x86_64-linux")]);
    let st = i.status("aarch64-linux");
    assert_eq!(st["sandboxed"], true, "{st}");
}

/// `emulation = "container"` keeps the old way: an aarch64 container of its own from the arm64
/// image, everything in it under qemu-user, and no sandbox there.
#[test]
fn emulation_container_gives_the_system_its_own_container() {
    if !common::require_bed() {
        return;
    }
    let i = Install::new(&format!(
        "{}image = \"{}\"\nemulation = \"container\"\nidle-timeout = 120\n",
        config("bookworm-amd64", "", 4),
        common::image("bookworm-arm64")
    ));
    let o = i.build(&uname_expr("emulated-container"));
    let out = std::fs::read_to_string(common::out_path(&o)).unwrap();
    assert_eq!(out, "aarch64\nusr-bin\n", "{}", text(&o));
    let own = i.container("aarch64-linux");
    assert_eq!(i.containers(), std::slice::from_ref(&own));
    assert_eq!(
        common::docker_ok(["exec", &own, "uname", "-m"]).trim(),
        "aarch64"
    );
    let st = i.status("aarch64-linux");
    assert_eq!(st["container"], own.as_str(), "{st}");
    assert!(st["served_by"].is_null(), "{st}");

    // Back to the default: the native builder builds it, and the old aarch64 container is
    // shown as what it now is — no system's builder — and `gc --volumes` removes it by name.
    std::fs::write(&i.config, config("bookworm-amd64", "", 4)).unwrap();
    let o = i.build(&uname_expr("emulated-after-switch"));
    let out = std::fs::read_to_string(common::out_path(&o)).unwrap();
    assert_eq!(out, "aarch64\nusr-bin\n", "{}", text(&o));
    let st = i.status("aarch64-linux");
    assert_eq!(
        st["container"],
        i.container("x86_64-linux").as_str(),
        "{st}"
    );
    let old = i.status(&own);
    assert_eq!(old["configured"], false, "{old}");
    let o = i.cli(&["gc", "--volumes", &own]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(i.containers(), [i.container("x86_64-linux")]);
}

/// The CLI acts on the container that serves an emulated system: `shell` runs in the native
/// builder, `doctor` says which builder serves it and that its own table's container settings
/// are not used, `stop` stops the native builder (once, also when both systems are named).
#[test]
fn cli_commands_act_on_the_serving_container() {
    if !common::require_bed() {
        return;
    }
    let i = Install::new(&format!(
        "{}max-jobs = 3\n",
        config("bookworm-amd64", "", 4)
    ));
    let o = i.cli(&["shell", "aarch64-linux", "--", "cat", "/etc/nix/nix.conf"]);
    assert!(o.status.success(), "{}", text(&o));
    let native = i.container("x86_64-linux");
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("extra-platforms = aarch64-linux"),
        "{}",
        text(&o)
    );
    assert_eq!(i.containers(), std::slice::from_ref(&native));
    assert_eq!(i.status("aarch64-linux")["slots"], 4);

    let o = i.cli(&["doctor", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let checks = v["checks"].as_array().unwrap();
    let detail = |name: &str| -> Vec<String> {
        checks
            .iter()
            .filter(|c| c["name"] == name)
            .map(|c| format!("{} {} {}", c["status"], c["detail"], c["fix"]))
            .collect()
    };
    assert!(
        detail("aarch64-linux")
            .iter()
            .any(|d| d.contains("in the x86_64-linux builder")),
        "{v}"
    );
    let unused = detail("settings aarch64-linux");
    assert!(
        unused.iter().any(|d| d.starts_with("\"warn\"")
            && d.contains("max-jobs")
            && d.contains("emulation = \\\"container\\\"")),
        "{unused:?}"
    );

    let o = i.cli(&["stop", "aarch64-linux", "x86_64-linux"]);
    assert!(o.status.success(), "{}", text(&o));
    let said = String::from_utf8_lossy(&o.stdout);
    assert_eq!(said.lines().count(), 1, "stopped once: {said}");
    assert_eq!(i.status("aarch64-linux")["state"], "exited");
}

/// An x86_64 and an aarch64 build share the native builder's slots: with `max-jobs = 2` they
/// run at once in it, with `max-jobs = 1` one waits for the other.
#[test]
fn x86_64_and_aarch64_builds_share_the_native_builders_slots() {
    if !common::require_bed() {
        return;
    }
    for (max_jobs, at_once) in [(2, true), (1, false)] {
        let i = Install::new(&config("bookworm-amd64", "", max_jobs));
        // Each build records when it ran (the unsandboxed builder's `date`), for 4 s.
        let expr = |system: &str| {
            format!(
                "derivation {{ name = \"slots-{system}\"; system = \"{system}\"; \
                 builder = \"/bin/sh\"; args = [\"-c\" \"/usr/bin/date +%s.%N > $out; /usr/bin/sleep 4; \
                 /usr/bin/date +%s.%N >> $out\"]; nonce = \"{}\"; }}",
                common::unique_name("n")
            )
        };
        let both = format!("[ ({}) ({}) ]", expr("x86_64-linux"), expr("aarch64-linux"));
        let o = i.build(&both);
        assert!(o.status.success(), "{}", text(&o));
        let spans: Vec<(f64, f64)> = String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|p| {
                let t: Vec<f64> = std::fs::read_to_string(p)
                    .unwrap()
                    .lines()
                    .map(|l| l.parse().unwrap())
                    .collect();
                (t[0], t[1])
            })
            .collect();
        assert_eq!(spans.len(), 2, "{}", text(&o));
        let overlap = spans[0].0 < spans[1].1 && spans[1].0 < spans[0].1;
        assert_eq!(
            overlap,
            at_once,
            "max-jobs = {max_jobs}: {spans:?}\n{}",
            text(&o)
        );
        assert_eq!(i.containers(), [i.container("x86_64-linux")]);
    }
}
