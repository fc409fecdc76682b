//! `nixdock image build`: a builder image `nixdock/builder:<system>` for machines without a
//! registry (the default image, `nixos/nix`, is pulled on the first build), either from
//! the official `nixos/nix` image plus OpenSSH (needs Docker Hub), or from Debian packages
//! with debootstrap (needs only a Debian mirror).
//!
//! Either way the image only has to hold Nix and OpenSSH's sshd: nixdock uploads the entry
//! script, keys and configuration into each container before it starts.

use anyhow::Context as _;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    BuildImageOptions, CreateContainerOptions, CreateImageOptions, LogsOptions,
    RemoveContainerOptions, StartContainerOptions, WaitContainerOptions,
};
use futures_util::StreamExt;
use tokio::io::AsyncReadExt;

use crate::builder::Engine;
use crate::builder::systems::{self, EmulationSupport};

use super::Env;
use super::{builders, engines, host};

const DEBIAN_SCRIPT: &str = include_str!("debian-image.sh");
const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

#[derive(Debug, clap::Subcommand)]
pub enum ImageCommand {
    /// Build a builder image nixdock/builder:<system> for each system (offline use)
    Build(BuildArgs),
}

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Recipes:
  default        FROM nixos/nix, plus OpenSSH (nix-env -iA openssh), built by
                 the engine. The base image comes from Docker Hub, so this
                 needs a registry.
  --from-debian  debootstrap a minimal Debian tree, apt-get install nix-bin
                 openssh-server in it, and import it into the engine. Needs
                 root, debootstrap and a Debian mirror, and for a foreign
                 system qemu-user-static with binfmt_misc (flag F). Takes a few
                 minutes natively, longer under emulation; the tools' output
                 goes to image-build/<system>.log in the state directory.
                 --suite bookworm has Nix 2.8, trixie Nix 2.26; --mirror
                 defaults to the Debian mirror of this machine's apt sources,
                 else http://deb.debian.org/debian.
The image is tagged nixdock/builder:<system> (or --tag). Builders use it once
the config names it (image under [builders.\"<system>\"]); without an image
there, they use the official nixos/nix image, pulled on the first build. So
this command is for machines without a registry. Builders made from an older
image are recreated at their next build.")]
pub struct BuildArgs {
    /// Build from Debian packages (no registry needed)
    #[arg(long)]
    pub from_debian: bool,
    /// System to build for (repeatable) [default: all served]
    #[arg(long = "system", value_name = "SYSTEM")]
    pub systems: Vec<String>,
    /// With --from-debian: Debian release
    #[arg(
        long,
        value_name = "SUITE",
        default_value = "bookworm",
        requires = "from_debian"
    )]
    pub suite: String,
    /// With --from-debian: the mirror [default: apt's]
    #[arg(long, value_name = "URL", requires = "from_debian")]
    pub mirror: Option<String>,
    /// Without --from-debian: nixos/nix tag
    #[arg(
        long,
        value_name = "TAG",
        default_value = "latest",
        conflicts_with = "from_debian"
    )]
    pub nix_tag: String,
    /// Tag it TAG instead (needs exactly one --system)
    #[arg(long, value_name = "TAG")]
    pub tag: Option<String>,
    /// Make it on pool engine NAME ([engines.NAME])
    #[arg(long, value_name = "NAME")]
    pub engine: Option<String>,
}

pub async fn run(env: &Env, cmd: ImageCommand) -> anyhow::Result<i32> {
    let ImageCommand::Build(args) = cmd;
    let config = env.config()?;
    // The top-level engine, or the pool engine named: its image store is where the builders it
    // serves look for their image (a remote engine cannot see this host's images).
    let (engine, served) = match &args.engine {
        None => (
            builders::engine(&config).await?,
            builders::served(&config, "none"),
        ),
        Some(name) => {
            let pe = engines::connect_all(&config, Some(name))
                .await?
                .pop()
                .with_context(|| format!("no engine {name}"))?;
            let served = pe.served(&config, "none");
            let engine = pe
                .engine
                .map_err(|e| anyhow::anyhow!("engine {name}: {e:#}"))?;
            (engine, served)
        }
    };
    if let Some(name) = &args.engine {
        println!("engine {name}: {}", engine.addr);
    }
    let systems = if args.systems.is_empty() {
        if served.is_empty() {
            anyhow::bail!("this engine serves no system here; name one with --system");
        }
        // The images the builders run: an emulated system the native builder serves needs
        // none of its own.
        let mut v: Vec<String> = Vec::new();
        for s in &served {
            if !v.iter().any(|x| x == s.container_system()) {
                v.push(s.container_system().to_string());
            }
        }
        v
    } else {
        args.systems.clone()
    };
    if args.tag.is_some() && systems.len() != 1 {
        anyhow::bail!("--tag needs exactly one --system");
    }
    let mut failed = 0;
    for system in &systems {
        let t = Instant::now();
        let tag = args.tag.clone().unwrap_or_else(|| offline_tag(system));
        let result = if args.from_debian {
            let mirror = args.mirror.clone().unwrap_or_else(debian_mirror);
            build_debian(&engine, env, system, &args.suite, &mirror, &tag).await
        } else {
            build_from_nixos(&engine, system, &args.nix_tag, &tag).await
        };
        match result {
            Ok(tag) => println!(
                "built {tag} in {:.0} s; builders use it with this in the nixdock config:\n  \
                 [builders.\"{system}\"]\n  image = \"{tag}\"",
                t.elapsed().as_secs_f64()
            ),
            Err(e) => {
                eprintln!("nixdock: {system}: {e:#}");
                failed += 1;
            }
        }
    }
    Ok(if failed > 0 { 1 } else { 0 })
}

pub use crate::builder::systems::docker_platform;

/// What `nixdock image build` tags its image for `system` unless told otherwise.
fn offline_tag(system: &str) -> String {
    format!("nixdock/builder:{system}")
}

/// Debian's architecture for a Nix system.
pub fn debian_arch(system: &str) -> Option<&'static str> {
    Some(match system {
        "x86_64-linux" | "i686-linux" => "amd64",
        "aarch64-linux" => "arm64",
        "armv7l-linux" | "armv6l-linux" => "armhf",
        "riscv64-linux" => "riscv64",
        "powerpc64le-linux" => "ppc64el",
        "s390x-linux" => "s390x",
        _ => return None,
    })
}

fn nixos_dockerfile(tag: &str) -> String {
    format!(
        "# nixdock builder image: Nix plus OpenSSH's sshd. nixdock uploads its entry script,\n\
         # keys and configuration into each container before it starts.\n\
         FROM nixos/nix:{tag}\n\
         RUN nix-env -f '<nixpkgs>' -iA openssh && nix-store --gc\n\
         LABEL nixdock.builder-image=nixos\n"
    )
}

/// `docker build` of the nixos/nix-based image through the Engine API, with its output as
/// progress.
pub async fn build_from_nixos(
    engine: &Engine,
    system: &str,
    nix_tag: &str,
    tag: &str,
) -> anyhow::Result<String> {
    let platform = docker_platform(system)
        .with_context(|| format!("nixdock cannot run {system} in a Linux container"))?;
    let tag = tag.to_string();
    println!("{system}: building {tag} from nixos/nix:{nix_tag} ({platform})");
    let dockerfile = nixos_dockerfile(nix_tag);
    let mut tar = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(dockerfile.len() as u64);
    h.set_mode(0o644);
    h.set_mtime(0);
    tar.append_data(&mut h, "Dockerfile", dockerfile.as_bytes())?;
    let context = tar.into_inner()?;
    let opts = BuildImageOptions {
        dockerfile: "Dockerfile".into(),
        t: Some(tag.clone()),
        rm: true,
        forcerm: true,
        platform: platform.into(),
        labels: Some(HashMap::from([(
            "nixdock.system".to_string(),
            system.to_string(),
        )])),
        ..Default::default()
    };
    let t0 = Instant::now();
    let mut stream =
        engine
            .docker
            .build_image(opts, None, Some(bollard::body_full(context.into())));
    let mut last_status = String::new();
    while let Some(item) = stream.next().await {
        let info = match item {
            Ok(i) => i,
            Err(e) => anyhow::bail!(explain_nixos_failure(system, &e.to_string())),
        };
        if let Some(err) = info.error_detail.and_then(|d| d.message) {
            anyhow::bail!(explain_nixos_failure(system, &err));
        }
        if let Some(s) = info.stream {
            for l in s.lines().filter(|l| !l.trim().is_empty()) {
                println!("  [{:4.0}s] {l}", t0.elapsed().as_secs_f64());
            }
        }
        if let Some(s) = info.status
            && s != last_status
        {
            println!("  [{:4.0}s] {s}", t0.elapsed().as_secs_f64());
            last_status = s;
        }
    }
    if engine.docker.inspect_image(&tag).await.is_err() {
        anyhow::bail!("the engine reported no error, but {tag} does not exist");
    }
    verify(engine, system, &tag).await?;
    Ok(tag)
}

fn explain_nixos_failure(system: &str, err: &str) -> String {
    let err = err.trim();
    let pull = [
        "pull", "registry", "dial tcp", "lookup", "manifest", "TLS", "timeout", "i/o",
    ];
    if pull.iter().any(|w| err.contains(w)) {
        format!(
            "cannot get the base image nixos/nix from its registry: {err}\nWithout a \
             registry, build the Debian-based image instead (as root): nixdock image build \
             --from-debian --system {system}"
        )
    } else {
        format!(
            "building the image failed: {err}\nThe Debian-based image is an alternative: \
             nixdock image build --from-debian --system {system}"
        )
    }
}

/// The Debian mirror this machine's apt uses, else Debian's CDN.
pub fn debian_mirror() -> String {
    let mut uris = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut files: Vec<PathBuf> = dir
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "sources"))
            .collect();
        files.sort();
        for f in files {
            let Ok(text) = std::fs::read_to_string(&f) else {
                continue;
            };
            for stanza in text.split("\n\n") {
                let field = |name: &str| {
                    stanza
                        .lines()
                        .find_map(|l| l.strip_prefix(name))
                        .map(str::trim)
                };
                let debs =
                    field("Types:").is_some_and(|t| t.split_whitespace().any(|x| x == "deb"));
                let security = field("Suites:").is_some_and(|s| s.contains("-security"));
                if let (true, false, Some(u)) = (debs, security, field("URIs:"))
                    && let Some(first) = u.split_whitespace().next()
                {
                    uris.push(first.to_string());
                }
            }
        }
    }
    if let Ok(text) = std::fs::read_to_string("/etc/apt/sources.list") {
        for l in text.lines() {
            let mut w = l.split_whitespace().filter(|x| !x.starts_with('['));
            if w.next() == Some("deb")
                && let (Some(u), Some(suite)) = (w.next(), w.next())
                && !suite.contains("-security")
            {
                uris.push(u.to_string());
            }
        }
    }
    uris.iter()
        .find(|u| u.trim_end_matches('/').ends_with("/debian"))
        .map(|u| u.trim_end_matches('/').to_string())
        .unwrap_or_else(|| DEFAULT_MIRROR.to_string())
}

/// Builds `nixdock/builder:<system>` from Debian packages: debootstrap + apt in a chroot
/// (the embedded script), then an import through the Engine API.
pub async fn build_debian(
    engine: &Engine,
    env: &Env,
    system: &str,
    suite: &str,
    mirror: &str,
    tag: &str,
) -> anyhow::Result<String> {
    let arch =
        debian_arch(system).with_context(|| format!("Debian has no architecture for {system}"))?;
    if !host::is_root() {
        anyhow::bail!("--from-debian needs root (debootstrap, chroot and mount)");
    }
    if crate::nix_tools::find_in(
        "debootstrap",
        &[
            PathBuf::from("/usr/sbin"),
            PathBuf::from("/sbin"),
            PathBuf::from("/usr/bin"),
        ],
    )
    .is_err()
    {
        anyhow::bail!("debootstrap is not installed: apt-get install debootstrap");
    }
    if let EmulationSupport::Missing(why) =
        systems::emulation_support(system, host::host_arch(), host::ENGINE_IS_LOCAL)
    {
        anyhow::bail!("this machine cannot run {system} programs: {why}");
    }
    let tag = tag.to_string();
    // In the state directory, so private like the rest of it (0700, the log 0600).
    let logs_dir = crate::state::StateDir::open(&env.state_path)
        .and_then(|s| s.private_subdir("image-build"))?;
    let log = logs_dir.join(format!("{system}.log"));
    let _ = std::fs::remove_file(&log);
    crate::state::create_private_file(&log)
        .with_context(|| format!("cannot create {}", log.display()))?;
    let base = std::env::var_os("TMPDIR").map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from);
    let work = WorkDir(base.join(format!("nixdock-image-{}", crate::state::random_id(10)?)));
    std::fs::create_dir_all(work.path())
        .with_context(|| format!("cannot create {}", work.path().display()))?;
    let script = work.path().join("debian-image.sh");
    std::fs::write(&script, DEBIAN_SCRIPT)?;
    let out = work.path().join("rootfs.tar");
    println!(
        "{system}: building {tag} from Debian {suite}/{arch} (log: {})",
        log.display()
    );
    let status = tokio::process::Command::new("bash")
        .arg(&script)
        .args([suite, arch, mirror])
        .arg(work.path())
        .arg(&out)
        .arg(&log)
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .status()
        .await
        .context("cannot run bash")?;
    if !status.success() {
        anyhow::bail!(
            "building the root file system failed (log: {})",
            log.display()
        );
    }
    println!("  importing into the engine as {tag}");
    import_tar(engine, &out, &tag).await?;
    drop(work);
    verify(engine, system, &tag).await?;
    Ok(tag)
}

/// A work directory, removed on drop (never while something is mounted below it).
struct WorkDir(PathBuf);

impl WorkDir {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if let Err(e) = wipe(&self.0) {
            eprintln!("nixdock: left {} behind: {e}", self.0.display());
        }
    }
}

/// Removes a directory tree, refusing while anything is mounted below it.
fn wipe(dir: &Path) -> std::io::Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let d = dir.to_string_lossy();
    if mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .any(|m| m == d || m.starts_with(&format!("{d}/")))
    {
        return Err(std::io::Error::other(format!(
            "something is still mounted below {d}"
        )));
    }
    std::fs::remove_dir_all(dir)
}

/// `docker import` of a tar file through the Engine API (`POST /images/create?fromSrc=-`).
async fn import_tar(engine: &Engine, tar: &Path, tag: &str) -> anyhow::Result<()> {
    let (repo, tagname) = tag.rsplit_once(':').unwrap_or((tag, "latest"));
    let file = tokio::fs::File::open(tar)
        .await
        .with_context(|| format!("cannot open {}", tar.display()))?;
    let body = futures_util::stream::unfold(file, |mut f| async move {
        let mut buf = vec![0u8; 1 << 20];
        match f.read(&mut buf).await {
            Ok(0) | Err(_) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((bytes::Bytes::from(buf), f))
            }
        }
    });
    let opts = CreateImageOptions {
        from_src: Some("-".into()),
        repo: Some(repo.into()),
        tag: Some(tagname.into()),
        ..Default::default()
    };
    let mut s = engine
        .docker
        .create_image(Some(opts), Some(bollard::body_stream(body)), None);
    while let Some(item) = s.next().await {
        item.with_context(|| format!("importing {tag}"))?;
    }
    engine
        .docker
        .inspect_image(tag)
        .await
        .map(|_| ())
        .with_context(|| format!("importing {tag} left no image"))
}

/// Runs the new image once: the right architecture, a Nix, an sshd.
async fn verify(engine: &Engine, system: &str, tag: &str) -> anyhow::Result<()> {
    let name = format!("nixdock-verify-{}", crate::state::random_id(8)?);
    let probe = "uname -m; \
        for d in /root/.nix-profile/bin /nix/var/nix/profiles/default/bin /usr/bin /bin; do \
          if [ -x $d/nix-daemon ]; then $d/nix-daemon --version; break; fi; done; \
        for p in /root/.nix-profile/bin/sshd /usr/sbin/sshd /usr/bin/sshd; do \
          if [ -x $p ]; then echo sshd=$p; break; fi; done";
    let body = ContainerCreateBody {
        image: Some(tag.to_string()),
        entrypoint: Some(vec!["/bin/sh".into(), "-c".into()]),
        cmd: Some(vec![probe.into()]),
        host_config: Some(HostConfig {
            // As for builders: Podman's default rlimits may exceed what its root may grant.
            ulimits: engine
                .podman
                .then(crate::builder::lifecycle::grantable_ulimits),
            ..Default::default()
        }),
        ..Default::default()
    };
    let docker = &engine.docker;
    docker
        .create_container(
            Some(CreateContainerOptions {
                name: Some(name.clone()),
                ..Default::default()
            }),
            body,
        )
        .await
        .with_context(|| format!("cannot run {tag}"))?;
    let result = async {
        docker
            .start_container(&name, None::<StartContainerOptions>)
            .await
            .with_context(|| format!("cannot start {tag}"))?;
        let mut wait = docker.wait_container(&name, None::<WaitContainerOptions>);
        let _ = tokio::time::timeout(Duration::from_secs(120), wait.next()).await;
        let mut logs = docker.logs(
            &name,
            Some(LogsOptions {
                stdout: true,
                stderr: true,
                ..Default::default()
            }),
        );
        let mut out = String::new();
        while let Some(Ok(chunk)) = logs.next().await {
            out.push_str(&String::from_utf8_lossy(&chunk.into_bytes()));
        }
        anyhow::Ok(out)
    }
    .await;
    let _ = docker
        .remove_container(
            &name,
            Some(RemoveContainerOptions {
                force: true,
                ..Default::default()
            }),
        )
        .await;
    let out = result?;
    let mut lines = out.lines();
    let arch = lines.next().unwrap_or("").trim().to_string();
    let want = systems::container_arch(system).unwrap_or("?");
    if arch != want {
        anyhow::bail!("{tag} runs as {arch:?}, but {system} needs {want}; output:\n{out}");
    }
    let nix = out.lines().find(|l| l.contains("(Nix)"));
    let sshd = out.lines().find_map(|l| l.strip_prefix("sshd="));
    match (nix, sshd) {
        (Some(n), Some(s)) => {
            println!("  verified: {arch}, {}, sshd at {s}", n.trim());
            Ok(())
        }
        _ => Err(anyhow::anyhow!(
            "{tag} lacks nix-daemon or sshd; its probe said:\n{out}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms_and_arches() {
        assert_eq!(docker_platform("aarch64-linux"), Some("linux/arm64"));
        assert_eq!(debian_arch("x86_64-linux"), Some("amd64"));
        assert_eq!(debian_arch("x86_64-darwin"), None);
        assert!(nixos_dockerfile("latest").contains("FROM nixos/nix:latest\n"));
    }

    #[test]
    fn mirror_is_a_url() {
        assert!(debian_mirror().starts_with("http"));
    }
}
