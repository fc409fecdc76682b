//! The hook channel: read the parent's settings, answer each `try`, and after `# accept` run
//! the build. Everything the user must see goes out as `@nix` messages or fd-4 log lines; the
//! hook's own diagnostics go to its log file in the state dir.

pub mod copy_progress;
pub mod fault_points;
pub mod kept_dir;
pub mod parent;
pub mod remote_build;
pub mod signals;

use std::collections::BTreeSet;
use std::time::Instant;

use hook_protocol::derivation::Derivation;
use hook_protocol::hook::{
    HookRequest, Reply, Settings, TryRequest, read_accepted, read_request, read_settings,
};
use hook_protocol::log::LogLine;
use hook_protocol::machines::Machine;
use hook_protocol::store_path::StorePath;
use tokio::io::BufReader;

use crate::builder::lifecycle::Ready;
use crate::builder::pool::Pool as EnginePool;
use crate::builder::systems::{self, EmulationSupport};
use crate::builder::{BuilderSpec, slots};
use crate::config::{Config, Transport};
use crate::policy::{self, Decision, Pool, Target};
use crate::state::{StateDir, StateError};
use crate::static_machines;
use crate::transport::{RemoteStore, Reopen};

use parent::Parent;
use remote_build::liveness::{Expect, Liveness};
use remote_build::{Job, Outcome};

/// Everything loaded once per hook process, lazily: most hooks only decline.
struct Context {
    config: Config,
    state: StateDir,
    /// The engines, connected when first needed, and the builders they serve.
    engines: EnginePool,
    /// Derivations whose decline was explained to the user already: Nix asks again for the
    /// same one (each time a slot frees up), and one warning is enough.
    told: BTreeSet<StorePath>,
}

impl Context {
    fn load(state: &Result<StateDir, StateError>) -> Result<Context, ContextError> {
        let path = Config::path_from_env();
        let config = Config::load(&path)?;
        let state = match state {
            Ok(s) => s.clone(),
            Err(e) => return Err(ContextError::StateUnusable(e.to_string())),
        };
        let instance = state.instance_id()?;
        let engines = EnginePool::new(config.clone(), state.clone(), instance);
        Ok(Context {
            config,
            state,
            engines,
            told: BTreeSet::new(),
        })
    }

    fn served(&self) -> &[BuilderSpec] {
        &self.engines.served
    }
}

/// Why the hook cannot load its config and state, or reach its engine.
#[derive(Debug, thiserror::Error)]
enum ContextError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    /// The state directory the hook checked when it started was refused (the message says why).
    #[error("{0}")]
    StateUnusable(String),
}

/// Runs the hook with the state directory it opened (and checked) once at its start; returns
/// the process exit status.
pub async fn run(parent: &Parent, state: Result<StateDir, StateError>) -> i32 {
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
    let mut statics = Statics::from_settings(&settings);
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
        // Asked once per `try`; everything below is handed the answer.
        let host = policy::Host::of(&req, &settings);
        // Declines for the host's own builds must stay instant: no config, no Docker.
        if host.builds_it()
            && !statics.could_serve(&req)
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
            match Context::load(&state) {
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
        statics.warn_parse_error(parent);
        let t = Try {
            parent,
            settings: &settings,
            req: &req,
            host,
        };
        match handle_try(c, &mut statics, t, &mut stdin).await {
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

/// The user's own remote builders from `builders`, and which of them this process found
/// unusable (Nix's hook disables a machine for the rest of the process the same way).
struct Statics {
    machines: Vec<Machine>,
    disabled: BTreeSet<usize>,
    parse_error: Option<String>,
}

impl Statics {
    fn from_settings(settings: &Settings) -> Statics {
        match static_machines::from_settings(settings) {
            Ok(machines) => Statics {
                machines,
                disabled: BTreeSet::new(),
                parse_error: None,
            },
            Err(e) => Statics {
                machines: Vec::new(),
                disabled: BTreeSet::new(),
                parse_error: Some(format!(
                    "nixdock-hook: ignoring the remote builders in Nix's `builders` setting: {e}"
                )),
            },
        }
    }

    fn could_serve(&self, req: &TryRequest) -> bool {
        // On the decline path of every host build: no copies.
        let usable = self
            .machines
            .iter()
            .enumerate()
            .filter(|(i, _)| !self.disabled.contains(i))
            .map(|(_, m)| m);
        policy::any_static_serves(req, usable)
    }

    /// Says once per process that `builders` could not be parsed.
    fn warn_parse_error(&mut self, parent: &Parent) {
        if let Some(e) = self.parse_error.take() {
            parent.warn(&e);
        }
    }
}

/// One `try` request and what it is answered from.
#[derive(Clone, Copy)]
struct Try<'a> {
    parent: &'a Parent,
    settings: &'a Settings,
    req: &'a TryRequest,
    /// What the parent could build itself, asked once per `try`.
    host: policy::Host,
}

async fn handle_try(
    ctx: &mut Context,
    statics: &mut Statics,
    t: Try<'_>,
    stdin: &mut (impl tokio::io::AsyncRead + Unpin),
) -> TryEnd {
    let Try { parent, req, .. } = t;
    let reply = |r: Reply| match parent.reply(&r) {
        Ok(()) => TryEnd::Answered,
        Err(_) => TryEnd::Exit(1),
    };
    if ctx.engines.has_pending() {
        // Remote engines are asked once per hook process, all at once, each within a deadline;
        // one that does not answer is named and skipped (and skipped by every hook for a while).
        for why in ctx.engines.connect_pending().await {
            parent.warn(&format!("nixdock: {why}"));
        }
    }
    let load_dir = ctx.state.load_dir();
    let served = ctx.served();
    let busy = |t: Target| -> u32 {
        let (name, max) = match t {
            Target::Docker(i) => (served[i].container_name(), served[i].max_jobs),
            Target::Static(i) => (
                static_machines::slot_name(&statics.machines[i]),
                statics.machines[i].max_jobs,
            ),
        };
        slots::busy_count(&load_dir, &name, max).unwrap_or(0)
    };
    let disabled = statics.disabled.clone();
    let skip = |i: usize| disabled.contains(&i);
    let pool = Pool {
        docker: served,
        statics: &statics.machines,
        busy: &busy,
        skip: &skip,
    };
    let candidates = match policy::decide(req, t.host, ctx.config.offload_local, &pool) {
        Decision::DeclineLocal => return reply(Reply::Decline),
        Decision::Decline { reason, tell_user } => {
            if tell_user && ctx.told.insert(req.drv_path.clone()) {
                parent.warn(&reason);
            } else {
                tracing::info!("{reason}");
            }
            return reply(Reply::Decline);
        }
        Decision::Busy => return reply(busy_reply(ctx, t)),
        Decision::Offload { candidates } => candidates,
    };
    // Read and check the derivation before committing to it.
    let drv = match std::fs::read(req.drv_path.to_absolute())
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
    let mut raced = false;
    let mut failed = Vec::new();
    let n = candidates.len();
    for (k, target) in candidates.into_iter().enumerate() {
        let prepared = match target {
            Target::Docker(i) => prepare_docker(ctx, i, req).await,
            Target::Static(i) => prepare_static(statics, i, &load_dir).await,
        };
        let (slot, remote) = match prepared {
            Prepared::Ready { slot, remote } => (slot, remote),
            Prepared::Full => {
                raced = true;
                continue;
            }
            Prepared::Unusable(why) => {
                if k + 1 < n {
                    parent.warn(&format!("{why}; trying another builder"));
                } else {
                    parent.warn(&why);
                }
                failed.push(why);
                continue;
            }
        };
        return run_accepted(Accepted {
            ctx,
            t,
            stdin,
            slot,
            remote: *remote,
            drv,
            nix_store: &nix_store,
        })
        .await;
    }
    if raced {
        return reply(busy_reply(ctx, t));
    }
    if !t.host.builds_it() {
        parent.warn(&format!(
            "nixdock found no usable builder for '{}' ({} tried; see the warnings above)",
            req.drv_path,
            failed.len()
        ));
    }
    reply(Reply::Decline)
}

/// Every candidate is busy: wait for a slot (`# postpone`), unless the host would build it
/// itself meanwhile (Nix's hook declines then).
fn busy_reply(ctx: &Context, t: Try<'_>) -> Reply {
    if t.host.builds_it() && !ctx.config.offload_local {
        Reply::Decline
    } else {
        tracing::info!(system = %t.req.needed_system, "all slots busy; postponing");
        Reply::Postpone
    }
}

/// Where an accepted build will run, once `# accept` has gone out.
enum Remote {
    /// A Docker builder: started (if need be) after the accept, because that can be slow.
    Docker { spec: Box<BuilderSpec> },
    /// One of the user's machines, already connected (before the accept, so an unreachable
    /// one can be skipped as Nix's hook does).
    Static(Box<RemoteStore>),
}

enum Prepared {
    Ready {
        slot: slots::Slot,
        remote: Box<Remote>,
    },
    /// No free slot after all (another hook took it since the snapshot).
    Full,
    /// This target cannot build now; the message names it and says why.
    Unusable(String),
}

async fn prepare_docker(ctx: &mut Context, i: usize, req: &TryRequest) -> Prepared {
    let spec = ctx.served()[i].clone();
    // Emulation is checked where it can be: on this host, for the local default engine.
    if ctx.engines.is_local(&spec.engine)
        && let EmulationSupport::Missing(why) =
            systems::emulation_support(&spec.system, systems::host_arch(), systems::ENGINE_IS_LOCAL)
    {
        return Prepared::Unusable(format!("nixdock cannot build for {}: {why}", spec.system));
    }
    let load_dir = ctx.state.load_dir();
    let slot = match slots::try_acquire(&load_dir, &spec.container_name(), spec.max_jobs) {
        Ok((Some(slot), _)) => slot,
        Ok((None, _)) => return Prepared::Full,
        Err(e) => return Prepared::Unusable(format!("nixdock: {e}")),
    };
    // The engine must be there before we accept; everything slow — asking the engine,
    // starting the container, SSH — happens after `# accept`, because Nix's worker waits for
    // our answer and would serialise every build behind it (the local engine is only
    // connected to here; see `Pool::usable`).
    if let Err(e) = ctx.engines.usable(&spec.engine).await {
        return Prepared::Unusable(format!(
            "nixdock cannot build '{}' for {}: {e}",
            req.drv_path, spec.system
        ));
    }
    Prepared::Ready {
        slot,
        remote: Box::new(Remote::Docker {
            spec: Box::new(spec),
        }),
    }
}

async fn prepare_static(statics: &mut Statics, i: usize, load_dir: &std::path::Path) -> Prepared {
    let m = statics.machines[i].clone();
    if let Err(e) = static_machines::check_supported(&m) {
        statics.disabled.insert(i);
        return Prepared::Unusable(e.to_string());
    }
    let slot = match slots::try_acquire(load_dir, &static_machines::slot_name(&m), m.max_jobs) {
        Ok((Some(slot), _)) => slot,
        Ok((None, _)) => return Prepared::Full,
        Err(e) => return Prepared::Unusable(format!("nixdock: {e}")),
    };
    let t = Instant::now();
    let home = static_machines::home_dir();
    match static_machines::connect(&m, home.as_deref()).await {
        Ok(remote) => {
            tracing::info!(machine = %m.store_uri, slot = slot.index, ms = t.elapsed().as_millis() as u64, "remote builder ready");
            Prepared::Ready {
                slot,
                remote: Box::new(Remote::Static(Box::new(remote))),
            }
        }
        Err(e) => {
            statics.disabled.insert(i);
            // The error names the machine.
            Prepared::Unusable(e.to_string())
        }
    }
}

/// How the hook's messages name a Docker builder, and the machine name it gives Nix with
/// `# accept` (Nix shows it as "building '…' on '<name>'" and in its progress bar, and uses it
/// for nothing else, 2.8 to 2.34): the system, and in a pool the engine — what `nixdock shell`
/// and `nixdock logs` take — rather than a store URI that does not exist.
pub fn builder_name(spec: &BuilderSpec, pool: bool) -> String {
    if pool {
        format!("nixdock {} builder on engine {}", spec.system, spec.engine)
    } else {
        format!("nixdock {} builder", spec.system)
    }
}

/// The Docker builder for `spec` made ready (started or recreated as needed) and connected,
/// with the watch on its container; on failure the user has been told why.
async fn connect_docker(
    ctx: &mut Context,
    parent: &Parent,
    req: &TryRequest,
    spec: &BuilderSpec,
    slot: &slots::Slot,
) -> Result<(RemoteStore, Liveness), TryEnd> {
    let t = Instant::now();
    let direct = ctx.config.transport == Transport::Auto;
    let builders = match ctx.engines.builders(&spec.engine).await {
        Ok(b) => b,
        Err(e) => {
            parent.error(&format!(
                "nixdock cannot build '{}' for {}: {e}",
                req.drv_path, spec.system
            ));
            return Err(TryEnd::Exit(1));
        }
    };
    let ready = async {
        if direct && let Some(local) = builders.connect_local(spec).await {
            return Ok((
                RemoteStore {
                    name: spec.container_name(),
                    link: None,
                    daemon: local.daemon,
                    reopen: Reopen::LocalSocket {
                        socket: local.socket,
                        volume: local.volume,
                    },
                    bulk: None,
                },
                "local socket",
            ));
        }
        // Starting a builder takes a second or more: say so in Nix's progress.
        let step = parent.ids.next_id();
        parent.send(&LogLine::start_step(
            step,
            format!("getting the {} builder ready", spec.system),
        ));
        // A missing image is pulled first: shown as a download in Nix's progress.
        let pull = copy_progress::PullProgress::new(parent);
        let ready = if direct {
            builders.ensure_ready_local(spec, Some(slot), &pull).await
        } else {
            builders
                .ensure_ready_with(spec, Some(slot), &pull)
                .await
                .map(|r| Ready::Link(Box::new(r)))
        };
        parent.send(&LogLine::stop(step));
        let ready = match ready? {
            Ready::Local { conn, started } => {
                let conn = *conn;
                return Ok((
                    RemoteStore {
                        name: spec.container_name(),
                        link: None,
                        daemon: conn.daemon,
                        reopen: Reopen::LocalSocket {
                            socket: conn.socket,
                            volume: conn.volume,
                        },
                        bulk: None,
                    },
                    if started {
                        "local socket, cold"
                    } else {
                        "local socket"
                    },
                ));
            }
            Ready::Link(r) => *r,
        };
        let how = match (&ready.link, ready.started) {
            (crate::transport::Link::Ssh(_), true) => "ssh, cold",
            (crate::transport::Link::Ssh(_), false) => "ssh",
            (crate::transport::Link::Engine(_), true) => "engine exec, cold",
            (crate::transport::Link::Engine(_), false) => "engine exec",
            (crate::transport::Link::Holder(h), _) => match h.via() {
                crate::transport::holder::Via::Ssh { .. } => "ssh holder",
                crate::transport::holder::Via::Engine { .. } => "engine exec holder",
            },
        };
        let bulk = match &ready.link {
            crate::transport::Link::Holder(h)
                if matches!(h.via(), crate::transport::holder::Via::Engine { .. }) =>
            {
                Some(crate::transport::Link::Engine(
                    crate::transport::EngineExec::new(
                        builders.engine.docker.clone(),
                        ready.container.clone(),
                    ),
                ))
            }
            _ => None,
        };
        Ok::<_, crate::builder::BuilderError>((
            RemoteStore {
                name: ready.container,
                link: Some(ready.link),
                daemon: ready.daemon,
                reopen: Reopen::Builder,
                bulk,
            },
            how,
        ))
    };
    fault_points::reached("ready").await;
    let watch = Liveness {
        docker: builders.engine.docker.clone(),
        engine: format!("{} ({})", spec.engine, builders.engine.addr),
        container: spec.container_name(),
        to_discard: Default::default(),
        // Getting ready is asking the engine (and, on a remote one, reaching the
        // builder through it): a silent engine holds it whatever the transport.
        engine_carries_link: true,
    };
    // A paused builder (or a silent engine) would hold the readiness checks until
    // their own limits; the watch ends it within seconds.
    let ready = tokio::select! {
        r = ready => r,
        why = watch.watch(Expect::Starting) => Err(crate::builder::BuilderError::Broken {
            container: spec.container_name(),
            what: why,
        }),
    };
    let (remote, how) = match ready {
        Ok(r) => {
            ctx.engines.engine_served(&spec.engine);
            r
        }
        Err(e) => {
            ctx.engines.distrust(&spec.engine);
            parent.error(&format!(
                "nixdock could not start the {} builder for '{}': {e}",
                spec.system, req.drv_path
            ));
            return Err(TryEnd::Exit(1));
        }
    };
    tracing::info!(
        system = %spec.system,
        slot = slot.index,
        ms = t.elapsed().as_millis() as u64,
        via = how,
        drv = %req.drv_path,
        "builder ready"
    );
    let watch = Liveness {
        engine_carries_link: remote
            .link
            .as_ref()
            .is_some_and(crate::transport::Link::is_carried_by_engine),
        ..watch
    };
    Ok((remote, watch))
}

/// A `try` about to be accepted: the request, the slot taken, where it will run and the
/// derivation already read.
struct Accepted<'a, R> {
    ctx: &'a mut Context,
    t: Try<'a>,
    stdin: &'a mut R,
    slot: slots::Slot,
    remote: Remote,
    drv: Derivation,
    nix_store: &'a std::path::Path,
}

async fn run_accepted<R: tokio::io::AsyncRead + Unpin>(a: Accepted<'_, R>) -> TryEnd {
    let Accepted {
        ctx,
        t: Try {
            parent,
            settings,
            req,
            ..
        },
        stdin,
        slot,
        remote,
        drv,
        nix_store,
    } = a;
    let pool = !ctx.config.engines.is_empty();
    let machine = match &remote {
        Remote::Docker { spec } => builder_name(spec, pool),
        Remote::Static(r) => r.name.clone(),
    };
    if parent
        .reply(&Reply::Accept {
            machine: machine.clone(),
        })
        .is_err()
    {
        return TryEnd::Exit(1);
    }
    signals::accepted(&req.drv_path.to_string(), &machine);
    let work = match read_accepted(stdin).await {
        Ok(w) => w,
        Err(e) => {
            parent.error(&format!("nixdock-hook: bad post-accept data from Nix: {e}"));
            return TryEnd::Exit(1);
        }
    };
    let store = settings.store().unwrap_or("auto").to_string();
    let root_inputs = matches!(&remote, Remote::Docker { spec } if spec.max_store_bytes.is_some());
    let docker_place = match &remote {
        Remote::Docker { spec } => Some((spec.system.clone(), spec.engine.clone())),
        Remote::Static(_) => None,
    };
    let (mut remote, liveness, docker_spec) = match remote {
        Remote::Static(r) => (*r, None, None),
        Remote::Docker { spec } => match connect_docker(ctx, parent, req, &spec, &slot).await {
            Ok((remote, watch)) => (remote, Some(watch), Some(spec)),
            Err(end) => return end,
        },
    };
    // SAFETY: geteuid has no preconditions.
    let as_root = unsafe { libc::geteuid() } == 0;
    let place = docker_place.map(|(system, engine)| kept_dir::BuilderPlace {
        system,
        engine,
        container: remote.name.clone(),
        pool,
        cli_options: kept_dir::cli_options(&Config::path_from_env(), ctx.state.path(), as_root),
        as_root,
    });
    let mut local = crate::local_daemon::LazyLocalDaemon::new(&store);
    let mut job = Job {
        parent,
        settings,
        drv_path: req.drv_path.clone(),
        drv,
        work,
        machine,
        place,
        root_inputs,
        liveness,
        lost: Default::default(),
        built_for: Default::default(),
    };
    let mut outcome = job.run(&mut remote, &mut local, nix_store).await;
    end_connection(parent, remote, &job.liveness).await;
    // Once: a holder that ends again is not worked around a second time.
    if let (Outcome::HolderGone { message }, Some(spec)) = (&outcome, &docker_spec) {
        tracing::warn!(drv = %req.drv_path, "the connection holder ended under the build: {message}");
        parent.warn(&format!(
            "nixdock: the connection holder of builder container {} ended during the build of \
             '{}' (the builder still runs): building it again",
            spec.container_name(),
            req.drv_path
        ));
        let (mut again, watch) = match connect_docker(ctx, parent, req, spec, &slot).await {
            Ok(r) => r,
            Err(end) => return end,
        };
        job.liveness = Some(watch);
        job.lost = Default::default();
        outcome = job.run(&mut again, &mut local, nix_store).await;
        end_connection(parent, again, &job.liveness).await;
    }
    drop(slot);
    TryEnd::Exit(match outcome {
        Outcome::Built => 0,
        Outcome::Failed { exit, message } => {
            parent.error(&message);
            exit
        }
        Outcome::HolderGone { message } => {
            parent.error(&format!(
                "{message}\n(the builder's connection holder ended under the build again)"
            ));
            1
        }
    })
}

/// Closes the builder's connection, then removes the partial inputs a full store left there
/// (its daemon worker holds the locks of what it was writing until the connection closes).
async fn end_connection(parent: &Parent, remote: RemoteStore, liveness: &Option<Liveness>) {
    drop(remote);
    let Some(l) = liveness else {
        return;
    };
    let paths = std::mem::take(&mut *l.to_discard.lock().unwrap_or_else(|p| p.into_inner()));
    match l.discard_invalid(&paths).await {
        Ok(said) if !paths.is_empty() => {
            tracing::info!(container = %l.container, "removed partial inputs: {}", said.trim())
        }
        Ok(_) => {}
        Err(e) => parent.warn(&format!(
            "nixdock: could not remove the partial inputs from builder container {}: {e}",
            l.container
        )),
    }
}
