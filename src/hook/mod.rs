//! The hook channel: read the parent's settings, answer each `try`, and after `# accept` run
//! the build. Everything the user must see goes out as `@nix` messages or fd-4 log lines; the
//! hook's own diagnostics go to its log file in the state dir.

pub mod copy_progress;
pub mod parent;
pub mod remote_build;

use std::time::Instant;

use hook_protocol::derivation::Derivation;
use hook_protocol::hook::{
    HookRequest, Reply, Settings, TryRequest, read_accepted, read_request, read_settings,
};
use hook_protocol::store_path::StorePath;
use tokio::io::BufReader;

use crate::builder::systems::{self, EmulationSupport};
use crate::builder::{BuilderSpec, Builders, Engine, slots};
use crate::config::Config;
use crate::policy::{self, Decision};
use crate::state::StateDir;

use parent::Parent;
use remote_build::{Job, Outcome};

/// Everything loaded once per hook process, lazily: most hooks only decline.
struct Context {
    config: Config,
    state: StateDir,
    served: Vec<BuilderSpec>,
    builders: Option<Builders>,
}

impl Context {
    fn load() -> Result<Context, String> {
        let path = Config::path_from_env();
        let config = Config::load(&path).map_err(|e| e.to_string())?;
        let state = StateDir::open(StateDir::default_path()).map_err(|e| e.to_string())?;
        let instance = state.instance_id().map_err(|e| e.to_string())?;
        let served = BuilderSpec::served(&config, &instance);
        Ok(Context {
            config,
            state,
            served,
            builders: None,
        })
    }

    async fn builders(&mut self) -> Result<&Builders, String> {
        if self.builders.is_none() {
            let engine = Engine::discover(self.config.docker_host.as_deref())
                .await
                .map_err(|e| e.to_string())?;
            self.builders =
                Some(Builders::new(engine, self.state.clone()).map_err(|e| e.to_string())?);
        }
        self.builders
            .as_ref()
            .ok_or_else(|| "no engine".to_string())
    }
}

/// Runs the hook; returns the process exit status.
pub async fn run(parent: &Parent) -> i32 {
    let mut stdin = BufReader::with_capacity(64 * 1024, tokio::io::stdin());
    let settings = match read_settings(&mut stdin).await {
        Ok(s) => s,
        Err(e) => {
            parent.error(&format!(
                "nixdock-hook: cannot read the settings from Nix: {e}"
            ));
            return 1;
        }
    };
    let mut ctx: Option<Context> = None;
    let mut offload_local: Option<bool> = None;
    loop {
        let req = match read_request(&mut stdin).await {
            Ok(HookRequest::Exit) => return 0,
            Ok(HookRequest::Try(t)) => t,
            Err(e) => {
                parent.error(&format!("nixdock-hook: bad request from Nix: {e}"));
                return 1;
            }
        };
        let t0 = Instant::now();
        // Declines for the host's own builds must stay instant: no config, no Docker.
        if policy::host_can_build(&req, &settings)
            && settings.max_jobs() != Some(0)
            && !*offload_local.get_or_insert_with(|| {
                Config::load(&Config::path_from_env()).is_ok_and(|c| c.offload_local)
            })
        {
            if let Err(e) = parent.reply(&Reply::Decline) {
                tracing::error!("cannot reply to Nix: {e}");
                return 1;
            }
            continue;
        }
        if ctx.is_none() {
            match Context::load() {
                Ok(c) => ctx = Some(c),
                Err(e) => {
                    parent.warn(&format!("nixdock-hook: {e}"));
                    if parent.reply(&Reply::Decline).is_err() {
                        return 1;
                    }
                    continue;
                }
            }
        }
        let Some(c) = ctx.as_mut() else { return 1 };
        match handle_try(c, parent, &settings, &req, &mut stdin).await {
            TryEnd::Answered => {
                tracing::debug!(drv = %req.drv_path, us = t0.elapsed().as_micros() as u64, "answered try");
            }
            TryEnd::Exit(code) => return code,
        }
    }
}

enum TryEnd {
    Answered,
    Exit(i32),
}

async fn handle_try(
    ctx: &mut Context,
    parent: &Parent,
    settings: &Settings,
    req: &TryRequest,
    stdin: &mut (impl tokio::io::AsyncRead + Unpin),
) -> TryEnd {
    let reply = |r: Reply| match parent.reply(&r) {
        Ok(()) => TryEnd::Answered,
        Err(_) => TryEnd::Exit(1),
    };
    let builder = match policy::decide(req, settings, ctx.config.offload_local, &ctx.served) {
        Decision::DeclineLocal => return reply(Reply::Decline),
        Decision::Decline { reason, tell_user } => {
            if tell_user {
                parent.warn(&reason);
            } else {
                tracing::info!("{reason}");
            }
            return reply(Reply::Decline);
        }
        Decision::Offload { builder } => builder,
    };
    let spec = ctx.served[builder].clone();
    if let EmulationSupport::Missing(why) =
        systems::emulation_support(&spec.system, systems::host_arch(), systems::ENGINE_IS_LOCAL)
    {
        parent.warn(&format!("nixdock cannot build for {}: {why}", spec.system));
        return reply(Reply::Decline);
    }
    let load_dir = ctx.state.load_dir();
    let slot = match slots::try_acquire(&load_dir, &spec.container_name(), spec.max_jobs) {
        Ok((Some(slot), _)) => slot,
        Ok((None, busy)) => {
            tracing::info!(system = %spec.system, busy, "all slots busy; postponing");
            return reply(Reply::Postpone);
        }
        Err(e) => {
            parent.warn(&format!("nixdock: {e}"));
            return reply(Reply::Decline);
        }
    };
    // Read and check the derivation before committing to it.
    let drv_path = match StorePath::from_absolute(&req.drv_path) {
        Ok(p) => p,
        Err(e) => {
            parent.warn(&format!(
                "nixdock: bad derivation path '{}': {e}",
                req.drv_path
            ));
            return reply(Reply::Decline);
        }
    };
    let drv = match std::fs::read(&req.drv_path)
        .map_err(|e| e.to_string())
        .and_then(|b| Derivation::parse(&b).map_err(|e| e.to_string()))
    {
        Ok(d) => d,
        Err(e) => {
            parent.warn(&format!(
                "nixdock: cannot read derivation '{}': {e}",
                req.drv_path
            ));
            return reply(Reply::Decline);
        }
    };
    let nix_store = match crate::nix_tools::find("nix-store") {
        Ok(p) => p,
        Err(e) => {
            parent.warn(&format!("nixdock: {e}"));
            return reply(Reply::Decline);
        }
    };
    // The engine must answer before we accept (a few ms); everything slow — starting the
    // container, SSH — happens after `# accept`, because Nix's worker waits for our answer
    // and would serialise every build behind it.
    let builders = match ctx.builders().await {
        Ok(b) => b,
        Err(e) => {
            parent.warn(&format!(
                "nixdock cannot build '{}' for {}: {e}",
                req.drv_path, spec.system
            ));
            return reply(Reply::Decline);
        }
    };
    let machine = format!("nixdock-{}", spec.system);
    if parent
        .reply(&Reply::Accept {
            machine: machine.clone(),
        })
        .is_err()
    {
        return TryEnd::Exit(1);
    }
    let work = match read_accepted(stdin).await {
        Ok(w) => w,
        Err(e) => {
            parent.error(&format!("nixdock-hook: bad post-accept data from Nix: {e}"));
            return TryEnd::Exit(1);
        }
    };
    let store = settings.store().unwrap_or("auto").to_string();
    let t = Instant::now();
    let (ready, local) = tokio::join!(
        builders.ensure_ready(&spec, Some(&slot)),
        crate::local_daemon::connect(&store)
    );
    let mut ready = match ready {
        Ok(r) => r,
        Err(e) => {
            parent.error(&format!(
                "nixdock could not start the {} builder for '{}': {e}",
                spec.system, req.drv_path
            ));
            return TryEnd::Exit(1);
        }
    };
    let mut local = match local {
        Ok(l) => l,
        Err(e) => {
            parent.error(&format!("nixdock cannot open the local store: {e}"));
            return TryEnd::Exit(1);
        }
    };
    tracing::info!(
        system = %spec.system,
        slot = slot.index,
        ms = t.elapsed().as_millis() as u64,
        cold = ready.started,
        "builder ready"
    );
    let job = Job {
        parent,
        settings,
        drv_path,
        drv,
        work,
        machine,
    };
    let outcome = job.run(&mut ready, &mut local, &nix_store).await;
    drop(slot);
    TryEnd::Exit(match outcome {
        Outcome::Built => 0,
        Outcome::Failed { exit, message } => {
            parent.error(&message);
            exit
        }
    })
}
