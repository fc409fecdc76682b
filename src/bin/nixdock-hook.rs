//! `nixdock-hook`: Nix's build hook, served by Docker builders. Set `build-hook` to this
//! program; Nix runs it with the verbosity as its last argument.

use nixdock::hook::{self, parent::Parent};
use nixdock::state::StateDir;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // The SSH connection holder a hook started (its parameters come on stdin).
    if args.get(1).map(String::as_str) == Some("--ssh-holder") {
        std::process::exit(nixdock::transport::holder::server::main(holder_engine));
    }
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!(
            "nixdock-hook: a drop-in replacement for Nix's build hook.\n\n\
             Nix starts it itself; set `build-hook = {}` (see `nixdock install`).\n\
             It speaks the build-hook protocol on fds 0, 2 and 4 and is not meant to be run by hand.\n\n\
             Environment: NIXDOCK_CONFIG (default /etc/nixdock/nixdock.toml), NIXDOCK_STATE_DIR,\n\
             NIXDOCK_LOG (log filter for the hook's log file, e.g. debug).",
            std::env::current_exe()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| "/path/to/nixdock-hook".into())
        );
        return;
    }
    // The verbosity Nix passes is for its own messages; our log file has its own filter.
    let _verbosity = hook_protocol::hook::verbosity_from_args(&args[1..]);
    // The log goes only into a state directory that passed its checks (owner, 0700, no
    // foreign files). A bad or missing one is reported to Nix when a build would need it
    // (hook::run warns and declines), not here on every local build.
    let state = StateDir::locate().and_then(StateDir::open);
    if let Ok(state) = &state {
        nixdock::logfile::init(&state.log_path(), "info");
    }
    let parent = Parent::new();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            parent.error(&format!("nixdock-hook: cannot start: {e}"));
            std::process::exit(1);
        }
    };
    // A signal to stop (SIGTERM from Nix 2.35 or an init system, SIGINT, SIGHUP) is handled on
    // this same thread, so no other task of the hook runs once the handler starts
    // (`hook::signals`). The handler is polled first, so it is installed before the hook reads
    // anything, and it runs while the build's future is still alive: not `select!`, which drops
    // the other branch first (its destructors would remove staging directories and kill
    // children without any time bound).
    let code = rt.block_on(async {
        let stop = hook::signals::next();
        let run = hook::run(&parent, state);
        tokio::pin!(stop, run);
        std::future::poll_fn(|cx| {
            if let std::task::Poll::Ready(sig) = stop.as_mut().poll(cx) {
                hook::signals::stop(sig);
            }
            run.as_mut().poll(cx)
        })
        .await
    });
    // Do not wait for lingering tasks (a child daemon, an SSH reader): Nix takes EOF on our
    // stderr as the end of the build, so exit now with the status we mean.
    rt.shutdown_background();
    std::process::exit(code);
}

/// An engine holder's engine, found as a hook finds it: by its name in the config (the
/// holder inherits the hook's environment, so the same config file).
fn holder_engine(
    name: String,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<bollard::Docker, String>>>> {
    use nixdock::builder::engine::{Engine, EngineSettings};
    use nixdock::config::Config;
    Box::pin(async move {
        let cfg = Config::load(&Config::path_from_env()).map_err(|e| e.to_string())?;
        let settings = EngineSettings::pool(&cfg)
            .into_iter()
            .find(|s| s.name == name)
            .ok_or_else(|| format!("no engine named {name} in the config"))?;
        let engine = Engine::discover(&settings)
            .await
            .map_err(|e| e.to_string())?;
        Ok(engine.docker)
    })
}
