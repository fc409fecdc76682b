//! `nixdock serve`: run the ssh-ng endpoint (`crate::serve`), authorise a client key, or print
//! the machines-file lines a client's Nix needs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;

use crate::serve::{self, Served, Shared, keys};

use super::Env;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:3022";

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Serves this installation's builders to any Nix over ssh-ng (stock build-remote,
Lix, Determinate Nix, other machines). The SSH user name selects the system:
ssh-ng://aarch64-linux@HOST. A session may only run `nix-daemon --stdio`, which
is bridged to that system's builder daemon; its client is a trusted user of
that daemon. Only keys in <state dir>/serve/authorized_keys are served
(add one with --authorize); password and keyboard-interactive are refused.

serve uses builders of its own (containers nixdock-<instance>-serve-<system>),
never the hook's, unless the config sets serve-shares-builders = true.

Stock Nix before 2.31 cannot put a port in an ssh-ng URI: listen on port 22 of
an address of its own, e.g. --listen 127.0.0.2:22, and the printed lines work
as they are:

  nixdock serve --authorize ~/.ssh/id_ed25519.pub
  nixdock serve --listen 127.0.0.2:22 &
  nix-build --builders \"$(nixdock serve --machines-line \\
      --key ~/.ssh/id_ed25519 --listen 127.0.0.2:22)\" …")]
pub struct Args {
    /// Where to listen
    #[arg(long, value_name = "ADDR:PORT", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Add KEY.pub to the served keys, then exit
    #[arg(long, value_name = "KEY.pub", conflicts_with = "machines_line")]
    pub authorize: Option<PathBuf>,
    /// Print a client's machines lines, then exit
    #[arg(long, requires = "key")]
    pub machines_line: bool,
    /// The client's key file, for the machines line
    #[arg(long, value_name = "CLIENT_KEY")]
    pub key: Option<PathBuf>,
    /// How long a session waits for a slot
    #[arg(long, value_name = "SECS", default_value_t = serve::SLOT_WAIT.as_secs())]
    pub slot_wait: u64,
}

pub async fn run(env: &Env, args: Args) -> anyhow::Result<i32> {
    let (state, instance) = env.instance()?;
    if let Some(pub_file) = &args.authorize {
        let added = keys::authorize(&state, pub_file)?;
        let path = keys::serve_dir(&state)?.join(keys::AUTHORIZED_KEYS_FILE);
        if added {
            eprintln!("added {} to {}", pub_file.display(), path.display());
        } else {
            eprintln!("{} is already in {}", pub_file.display(), path.display());
        }
        return Ok(0);
    }
    let config = env.config()?;
    let serve_instance = serve::serve_instance(&config, &instance);
    let served = Served::load(&config, &state, &serve_instance).await;
    for (name, why) in &served.unavailable {
        eprintln!("nixdock serve: engine {name} is not used: {why}");
    }
    if args.machines_line {
        let key = args.key.as_deref().context("--machines-line needs --key")?;
        print!("{}", machines_lines(&state, &served, &args.listen, key)?);
        return Ok(0);
    }
    if served.places.is_empty() {
        anyhow::bail!("no engine answered: nothing to serve");
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|source| serve::ServeError::Listen {
            addr: args.listen,
            source,
        })?;
    let host_key = keys::load_or_create_host_key(&state)?;
    eprintln!(
        "nixdock serve: listening on {} for {} (builders {}), host key {}",
        args.listen,
        served.systems().join(", "),
        if config.serve_shares_builders {
            "shared with the hook"
        } else {
            "of its own"
        },
        crate::transport::keys::fingerprint(host_key.public_key()),
    );
    let shared = Arc::new(Shared {
        config,
        state,
        served,
        slot_wait: std::time::Duration::from_secs(args.slot_wait),
    });
    let server = serve::run(shared, listener);
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = server => r?,
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::select! {
        r = server => r?,
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(0)
}

/// One machines-file line per system: `ssh-ng://<system>@<host>`, the system, the client key,
/// max-jobs, speed factor, supported features, no mandatory ones, and the host key's public
/// line in base64 (Nix writes it into a known_hosts file of its own for the ssh client).
pub fn machines_lines(
    state: &crate::state::StateDir,
    served: &Served,
    listen: &SocketAddr,
    key: &std::path::Path,
) -> anyhow::Result<String> {
    let key = std::path::absolute(key)
        .with_context(|| format!("cannot make {} absolute", key.display()))?;
    anyhow::ensure!(
        !key.to_string_lossy().contains(char::is_whitespace),
        "the key path {} has white space, which a machines line cannot carry",
        key.display()
    );
    let host_key = keys::load_or_create_host_key(state)?;
    let host_key_b64 = hook_protocol::hash::base64_encode(host_key.public_openssh().as_bytes());
    let ip = listen.ip();
    anyhow::ensure!(
        !ip.is_unspecified(),
        "--listen {listen} names no one address; give the address clients connect to"
    );
    let host = match (ip, listen.port()) {
        (std::net::IpAddr::V4(a), 22) => a.to_string(),
        (std::net::IpAddr::V6(a), 22) => a.to_string(),
        (std::net::IpAddr::V4(a), p) => format!("{a}:{p}"),
        (std::net::IpAddr::V6(a), p) => format!("[{a}]:{p}"),
    };
    if listen.port() != 22 {
        eprintln!(
            "nixdock serve: warning: port {} is in these URIs; Nix before 2.31 cannot use a \
             port in an ssh-ng URI (it takes `{host}` as a host name): for those, listen on \
             port 22 of an address of its own, e.g. --listen 127.0.0.2:22",
            listen.port()
        );
    }
    let mut out = String::new();
    for system in served.systems() {
        let specs: Vec<_> = served
            .places
            .iter()
            .filter(|p| p.spec.system == system)
            .map(|p| &p.spec)
            .collect();
        let max_jobs: u32 = specs.iter().map(|s| s.max_jobs).sum::<u32>().max(1);
        // Nix before 2.17 reads the speed factor as an unsigned integer.
        let speed = specs
            .iter()
            .map(|s| s.speed_factor)
            .fold(1.0_f32, f32::max)
            .round()
            .max(1.0) as u32;
        // Only what every builder of the system has: a session may land on any of them.
        let mut features: Vec<String> = specs[0].features.clone();
        features.retain(|f| specs.iter().all(|s| s.features.contains(f)));
        let features = if features.is_empty() {
            "-".to_string()
        } else {
            features.join(",")
        };
        out.push_str(&format!(
            "ssh-ng://{system}@{host} {system} {} {max_jobs} {speed} {features} - {host_key_b64}\n",
            key.display()
        ));
    }
    Ok(out)
}
