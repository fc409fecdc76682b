//! `nixdock`, the operator's command: look at this installation's builders (`status`,
//! `logs`), work inside one (`shell`), stop them or reclaim their space (`stop`, `gc`), check
//! the whole chain from Nix to the engine (`doctor`), wire the hook into Nix (`install`, `uninstall`), make builder images
//! (`image build`) and show it all working (`demo`).
//!
//! Every command acts on this installation's builders only: the containers labelled with the
//! instance id from the state directory.

pub mod builders;
pub mod containers;
pub mod demo;
pub mod doctor;
pub mod engines;
pub mod format;
pub mod gc;
pub mod host;
pub mod image;
pub mod install;
pub mod logs;
mod nix_daemon_process;
pub mod nix_version;
pub mod serve;
pub mod shell;
pub mod status;
pub mod stop;
pub mod timestamps;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::state::StateDir;

const ABOUT: &str = "Operate nixdock: Nix builds for foreign systems in Docker builder containers";

const LONG_ABOUT: &str = "\
Operate nixdock: Nix builds for foreign systems in Docker builder containers.

nixdock-hook replaces Nix's build hook. When Nix wants a derivation built for a
system this machine cannot build (e.g. aarch64-linux on x86_64), the hook runs
it in a Docker container for that system, reached over SSH. This command looks
after those containers and checks that Nix really calls the hook.

Every command acts on this installation's builders only: the containers
labelled nixdock.instance=<id>, where <id> comes from the state directory.";

const AFTER_HELP: &str = "\
Environment:
  NIXDOCK_CONFIG     the config file, unless --config is given
                     (default /etc/nixdock/nixdock.toml)
  NIXDOCK_STATE_DIR  the state directory, unless --state-dir is given
                     (default /var/lib/nixdock for root, else
                     $XDG_STATE_HOME/nixdock or ~/.local/state/nixdock)
  NIXDOCK_LOG        filter for this command's diagnostics on stderr (warn)
  DOCKER_HOST        an engine address, tried after the config's docker-host

The hook run by nix-daemon has the daemon's environment, so usually the
defaults above as root: run this command as root to see the same builders.";

#[derive(Debug, Parser)]
#[command(
    name = "nixdock",
    version,
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_help = AFTER_HELP,
    propagate_version = true
)]
pub struct Cli {
    /// Config file [env: NIXDOCK_CONFIG]
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// State directory [env: NIXDOCK_STATE_DIR]
    #[arg(long, global = true, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show builders: state, uptime, port, store size, builds running
    Status(status::Args),
    /// Stop builders (they keep their store for the next build)
    Stop(stop::Args),
    /// Collect garbage in builders, or remove them (--volumes)
    Gc(gc::Args),
    /// Print a builder's container log, or the hook's log (--hook)
    Logs(logs::Args),
    /// A shell or a command inside a system's builder (starting it)
    Shell(shell::Args),
    /// Serve the builders to any Nix as an ssh-ng endpoint
    Serve(serve::Args),
    /// Check everything from Nix to the builders; print fixes
    Doctor(doctor::Args),
    /// Wire nixdock-hook into this machine's Nix (as root)
    Install(install::InstallArgs),
    /// Undo `nixdock install`, restoring every file byte for byte
    Uninstall(install::UninstallArgs),
    /// Build a tiny derivation per system through the real Nix
    Demo(demo::Args),
    /// Make builder images
    #[command(subcommand)]
    Image(image::ImageCommand),
}

/// Where this invocation's config and state live.
#[derive(Debug, Clone)]
pub struct Env {
    pub config_path: PathBuf,
    pub state_path: PathBuf,
}

impl Env {
    pub fn from_cli(cli: &Cli) -> Env {
        Env {
            config_path: cli.config.clone().unwrap_or_else(Config::path_from_env),
            state_path: cli.state_dir.clone().unwrap_or_else(StateDir::default_path),
        }
    }

    pub fn config(&self) -> anyhow::Result<Config> {
        Ok(Config::load(&self.config_path)?)
    }

    /// Opens (creating if needed) the state directory and reads this installation's id.
    pub fn instance(&self) -> anyhow::Result<(StateDir, String)> {
        let state = StateDir::open(&self.state_path)?;
        let id = state.instance_id()?;
        Ok((state, id))
    }
}

/// Parses the command line, runs the command and returns the process exit status.
pub fn main() -> i32 {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("NIXDOCK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,russh=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nixdock: cannot start: {e}");
            return 1;
        }
    };
    let env = Env::from_cli(&cli);
    let result = rt.block_on(run(cli.command, env));
    rt.shutdown_timeout(std::time::Duration::from_millis(200));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{}", error_report(&e));
            1
        }
    }
}

/// The error as the user sees it: what failed, then each cause on its own line (most errors
/// from the libraries already quote their cause, which is then not repeated).
fn error_report(e: &anyhow::Error) -> String {
    let mut out = format!("nixdock: error: {e}");
    let mut shown = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !shown.contains(&c) {
            out.push_str("\n  caused by: ");
            out.push_str(&c);
        }
        shown = c;
    }
    out
}

async fn run(command: Command, env: Env) -> anyhow::Result<i32> {
    match command {
        Command::Status(a) => status::run(&env, a).await,
        Command::Stop(a) => stop::run(&env, a).await,
        Command::Gc(a) => gc::run(&env, a).await,
        Command::Logs(a) => logs::run(&env, a).await,
        Command::Shell(a) => shell::run(&env, a).await,
        Command::Serve(a) => serve::run(&env, a).await,
        Command::Doctor(a) => doctor::run(&env, a).await,
        Command::Install(a) => install::install(&env, a).await,
        Command::Uninstall(a) => install::uninstall(&env, a),
        Command::Demo(a) => demo::run(&env, a).await,
        Command::Image(c) => image::run(&env, c).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn error_report_shows_each_cause_once() {
        use anyhow::Context as _;
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let e = Err::<(), _>(io)
            .context("cannot read /etc/nix/nix.conf")
            .context("cannot install")
            .unwrap_err();
        assert_eq!(
            error_report(&e),
            "nixdock: error: cannot install\n  caused by: cannot read /etc/nix/nix.conf\n  \
             caused by: no such file"
        );
        // A library error whose message already quotes its source does not repeat it.
        #[derive(Debug, thiserror::Error)]
        #[error("bad config: {0}")]
        struct Quoting(#[source] std::io::Error);
        let e = anyhow::Error::from(Quoting(std::io::Error::other("denied")));
        assert_eq!(error_report(&e), "nixdock: error: bad config: denied");
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
