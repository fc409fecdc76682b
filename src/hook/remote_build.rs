//! One accepted build: copy the input closure the builder lacks, build with BuildDerivation
//! while streaming its log to the parent, then bring every missing output back into the local
//! store (written directly and registered with `--register-validity`, never through the
//! daemon, which would wait on the output locks the parent holds).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hook_protocol::derivation::Derivation;
use hook_protocol::hash::HashAlgo;
use hook_protocol::hook::{AcceptedWork, Settings};
use hook_protocol::log::LogLine;
use hook_protocol::nar::{DumpOptions, dump_path_unhashed};
use hook_protocol::store_path::StorePath;
use hook_protocol::worker::{
    BuildMode, BuildResult, BuildStatus, ClientSettings, LogEvent, NarSource, ValidPathInfo,
    WorkerError,
};
use tokio::io::AsyncWrite;

use crate::builder::lifecycle::{self, DaemonConnection};
use crate::local_daemon::LazyLocalDaemon;
use crate::local_store::content_address::check_references;
use crate::local_store::{ContentAddress, OutputImporter, PathInfo, deadlines};
use crate::transport::{Link, RemoteStore, Reopen};

mod build_log;
pub mod liveness;

use super::copy_progress::{CopyProgress, CountingWriter};
use super::fault_points;
use super::kept_dir::BuilderPlace;
use super::parent::Parent;
use liveness::{Expect, Liveness};

/// How a build ended, as the hook's exit status tells Nix (≤ 2.28 maps 100 and 101).
#[derive(Debug)]
pub enum Outcome {
    Built,
    Failed {
        exit: i32,
        message: String,
    },
    /// The failure was the connection holder's, not the builder's: the holder that carried the
    /// job's connections ended (killed, or gone with the container it ran in) while the builder
    /// still runs. Nothing was registered; the job may run again on connections of its own.
    HolderGone {
        message: String,
    },
}

pub const EXIT_PERMANENT: i32 = 100;
pub const EXIT_TIMEOUT: i32 = 101;

pub struct Job<'a> {
    pub parent: &'a Parent,
    pub settings: &'a Settings,
    pub drv_path: StorePath,
    pub drv: Derivation,
    pub work: AcceptedWork,
    pub machine: String,
    /// The Docker builder it runs on (none for a user's machine), for `--keep-failed`.
    pub place: Option<BuilderPlace>,
    /// The builder collects garbage by itself (`max-store-size`): the inputs are made temporary
    /// roots on the build's connection before asking which it has, so a collection running
    /// meanwhile cannot take one that is then not copied. (A round trip per input, so only
    /// there.)
    pub root_inputs: bool,
    /// The Docker builder's container, watched while the build uses it (none for a user's
    /// machine, whose SSH keepalives serve instead).
    pub liveness: Option<Liveness>,
    /// A connection to the builder closed under the job (set where that is seen): only such
    /// a failure can be its connection holder's.
    pub lost: AtomicBool,
    /// How long earlier attempts spent building: a second attempt (after its connection
    /// holder ended) gets what is left of the caller's `timeout`, not all of it again. Only
    /// building counts, as for Nix's `timeout`, not the copies around it.
    pub built_for: std::sync::Mutex<Duration>,
}

/// Why a build's wait ended without a result.
enum Stop {
    Daemon(WorkerError),
    Watchdog(String),
}

fn fail(message: String) -> Outcome {
    Outcome::Failed { exit: 1, message }
}

/// Reads `path` from the local store's file system: the hook runs as root or as the store's
/// owner, and a NAR made here is byte-identical to the daemon's.
struct FsNarSource<'a> {
    case_hack: bool,
    /// Shared by the parallel streams of one copy.
    progress: &'a CopyProgress<'a>,
}

impl NarSource for FsNarSource<'_> {
    async fn write_nar<W: AsyncWrite + Unpin + Send>(
        &mut self,
        info: &ValidPathInfo,
        out: &mut W,
    ) -> std::io::Result<()> {
        let p = info.path.to_absolute();
        tracing::info!("copying input {p} ({} bytes)", info.nar_size);
        // Unhashed: the builder's nix-daemon hashes every NAR it receives and refuses one that
        // does not match `info.nar_hash`; hashing here too cost a sixth of the hook's CPU.
        let mut path_progress = self.progress.path(&p, info.nar_size);
        let mut counting = CountingWriter {
            inner: out,
            progress: &mut path_progress,
        };
        let nar_size = dump_path_unhashed(
            Path::new(&p),
            &mut counting,
            DumpOptions {
                case_hack: self.case_hack,
            },
        )
        .await
        .map_err(|e| std::io::Error::other(format!("{p}: {e}")))?;
        if nar_size != info.nar_size {
            return Err(std::io::Error::other(format!(
                "{p} changed on disk: its NAR is {} bytes, the store says {}",
                nar_size, info.nar_size
            )));
        }
        path_progress.finish();
        Ok(())
    }
}

/// Deadline of one metadata query during the output copy (local validity, the builder's
/// QueryPathInfo).
const QUERY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an input copy may stand still (no byte either way, no path finished) before it is
/// given up: as long as an output's NAR may (the daemon hashes and writes as it reads, so it
/// only ever lags by what the connection buffers).
const COPY_STALL: Duration = deadlines::NAR_IDLE;
/// How long a builder may take to say which inputs it has when it may substitute them first
/// (`builders-use-substitutes`: it downloads them meanwhile).
const SUBSTITUTE_PATIENCE: Duration = Duration::from_secs(3600);

/// Total input size from which a copy uses two streams.
const PARALLEL_COPY_MIN_BYTES: u64 = 16 << 20;

/// Groups `ordered` (references first) into waves: each path lands in the first wave after
/// every wave holding one of its references, so the paths of one wave can be sent in any order
/// and at once.
fn waves(ordered: &[ValidPathInfo]) -> Vec<Vec<&ValidPathInfo>> {
    let mut level: BTreeMap<&StorePath, usize> = BTreeMap::new();
    let mut waves: Vec<Vec<&ValidPathInfo>> = Vec::new();
    for i in ordered {
        let l = i
            .references
            .iter()
            .filter(|r| **r != i.path)
            .filter_map(|r| level.get(r))
            .map(|l| l + 1)
            .max()
            .unwrap_or(0);
        level.insert(&i.path, l);
        if waves.len() <= l {
            waves.resize_with(l + 1, Vec::new);
        }
        waves[l].push(i);
    }
    waves
}

/// Splits one wave into two parts of about equal NAR size (largest first, each to the lighter
/// part).
fn halves(mut wave: Vec<&ValidPathInfo>) -> (Vec<ValidPathInfo>, Vec<ValidPathInfo>) {
    wave.sort_by_key(|i| std::cmp::Reverse(i.nar_size));
    let (mut a, mut b) = (Vec::new(), Vec::new());
    let (mut sa, mut sb) = (0u64, 0u64);
    for i in wave {
        if sa <= sb {
            sa += i.nar_size;
            a.push(i.clone());
        } else {
            sb += i.nar_size;
            b.push(i.clone());
        }
    }
    (a, b)
}

/// Sorts `paths` so every path comes after the ones it references.
fn topo_sort(infos: BTreeMap<StorePath, ValidPathInfo>) -> Vec<ValidPathInfo> {
    let mut done: BTreeSet<StorePath> = BTreeSet::new();
    let mut out = Vec::with_capacity(infos.len());
    let mut remaining = infos;
    while !remaining.is_empty() {
        let ready: Vec<StorePath> = remaining
            .iter()
            .filter(|(p, i)| {
                i.references
                    .iter()
                    .all(|r| r == *p || done.contains(r) || !remaining.contains_key(r))
            })
            .map(|(p, _)| p.clone())
            .collect();
        // A cycle cannot happen in a valid store; if it does, send the rest as they are.
        let batch = if ready.is_empty() {
            remaining.keys().cloned().collect()
        } else {
            ready
        };
        for p in batch {
            if let Some(i) = remaining.remove(&p) {
                done.insert(p);
                out.push(i);
            }
        }
    }
    out
}

/// The builder's failure text without ANSI colours and without its own log tail (Nix prints
/// the tail from the lines we sent to fd 4).
pub fn remote_failure_summary(msg: &str) -> String {
    let mut plain = String::with_capacity(msg.len());
    let mut chars = msg.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for d in chars.by_ref() {
                    if d.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        plain.push(c);
    }
    let cut = plain.find(";\nlast ").unwrap_or(plain.len());
    plain[..cut].trim_end().to_string()
}

/// Another daemon connection to the same remote store, over the same SSH session (for
/// parallel copies): a builder container's way, or a static machine's command.
async fn open_second_daemon(
    builder: &RemoteStore,
    machine: &str,
) -> Result<DaemonConnection, SecondDaemonError> {
    let link = || builder.link.as_ref().ok_or(SecondDaemonError::NoSession);
    Ok(match &builder.reopen {
        Reopen::Builder => lifecycle::open_daemon(link()?, machine).await?,
        Reopen::Exec(command) => {
            crate::static_machines::open_daemon(link()?, command, machine).await?
        }
        Reopen::LocalSocket { socket, .. } => lifecycle::open_local_daemon(socket, machine).await?,
    })
}

/// Outputs of at least this many bytes in all go around a holder where the store has a way
/// for that (`RemoteStore::bulk`): its connection costs a process start in the builder (~0.1 s
/// on the test bed's second engine), its bytes ~0.3 s less per 200 MB.
const BULK_BYTES: u64 = 64 << 20;
/// How long that connection may take to open before the build's own is used instead.
const BULK_OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// A daemon connection over `link` for a large copy, or `None` (the build's connection then
/// carries it, as it can).
async fn open_bulk_daemon(link: &Link, machine: &str) -> Option<DaemonConnection> {
    match tokio::time::timeout(BULK_OPEN_TIMEOUT, lifecycle::open_daemon(link, machine)).await {
        Ok(Ok(d)) => Some(d),
        Ok(Err(e)) => {
            tracing::debug!(%machine, "outputs through the build's own connection: {e}");
            None
        }
        Err(_) => {
            tracing::debug!(%machine, "outputs through the build's own connection: no other within {BULK_OPEN_TIMEOUT:?}");
            None
        }
    }
}

/// Why no second connection for parallel copies was opened (the copy then uses one).
#[derive(Debug, thiserror::Error)]
enum SecondDaemonError {
    #[error("no link to the builder")]
    NoSession,
    #[error(transparent)]
    Builder(#[from] lifecycle::BuilderError),
    #[error(transparent)]
    Static(#[from] crate::static_machines::StaticError),
}

impl Job<'_> {
    pub async fn run(
        &self,
        builder: &mut RemoteStore,
        local: &mut LazyLocalDaemon,
        nix_store: &Path,
    ) -> Outcome {
        match self.run_once(builder, local, nix_store).await {
            Outcome::Failed { exit: 1, message }
                if self.lost.load(Ordering::Relaxed) && self.holder_ended(builder).await =>
            {
                Outcome::HolderGone { message }
            }
            o => o,
        }
    }

    /// A daemon's error as the job's failure, noting a closed connection.
    fn remote_err(&self, what: &str, e: WorkerError) -> Outcome {
        if e.is_connection_closed() {
            self.lost.store(true, Ordering::Relaxed);
        }
        fail(format!("{what}: {e}"))
    }

    /// Whether the builder's connection holder ended under this job while the builder itself
    /// still runs (a builder that stopped takes its holder with it: that failure is the
    /// builder's, and stays one).
    async fn holder_ended(&self, builder: &RemoteStore) -> bool {
        let Some(Link::Holder(h)) = &builder.link else {
            return false;
        };
        if h.still_serving().await {
            return false;
        }
        match &self.liveness {
            Some(l) => l.is_running().await,
            None => false,
        }
    }

    async fn run_once(
        &self,
        builder: &mut RemoteStore,
        local: &mut LazyLocalDaemon,
        nix_store: &Path,
    ) -> Outcome {
        let t0 = Instant::now();
        // Outputs nixdock could not check are refused before anything is built.
        if let Err(o) = self.expected_outputs() {
            return o;
        }
        fault_points::reached("inputs").await;
        if let Err(o) = self
            .guarded("copying the inputs", self.copy_inputs(builder, local))
            .await
        {
            return o;
        }
        let t_copy = t0.elapsed();
        fault_points::reached("build").await;
        let (result, kept_dir) = match self.guarded("the build", self.build(builder)).await {
            Ok(r) => r,
            Err(o) => return o,
        };
        let t_build = t0.elapsed() - t_copy;
        if !result.status.is_success() {
            let exit = match result.status {
                BuildStatus::TimedOut => EXIT_TIMEOUT,
                BuildStatus::PermanentFailure
                | BuildStatus::OutputRejected
                | BuildStatus::NotDeterministic => EXIT_PERMANENT,
                _ => 1,
            };
            if self.settings.keep_failed() {
                self.tell_kept_dir(kept_dir.as_deref());
            }
            return Outcome::Failed {
                exit,
                message: format!(
                    "build of '{}' on '{}' failed: {}",
                    self.drv_path,
                    self.machine,
                    remote_failure_summary(&result.error_msg)
                ),
            };
        }
        fault_points::reached("outputs").await;
        let importer = match self
            .guarded("copying the outputs", self.copy_outputs(builder, local))
            .await
        {
            Ok(i) => i,
            Err(o) => return o,
        };
        // Registering needs nothing from the builder: not watched, and never cut off midway
        // (the commit runs in a task of its own).
        fault_points::reached("register").await;
        if let Some((importer, progress)) = importer {
            if let Err(e) = importer.commit_locked_invalid(nix_store).await {
                return fail(format!(
                    "registering the outputs of '{}': {e}",
                    self.drv_path
                ));
            }
            drop(progress);
        }
        tracing::info!(
            drv = %self.drv_path,
            copy_ms = t_copy.as_millis() as u64,
            build_ms = t_build.as_millis() as u64,
            total_ms = t0.elapsed().as_millis() as u64,
            "remote build done"
        );
        Outcome::Built
    }

    /// Runs one phase that talks to a Docker builder beside its liveness watch: a paused,
    /// stopped or removed container (or a silent engine carrying the connection) ends the phase
    /// within seconds, naming the cause; a phase that failed on its own gets what became of the
    /// container added to its error.
    async fn guarded<T>(
        &self,
        phase: &str,
        work: impl std::future::Future<Output = Result<T, Outcome>>,
    ) -> Result<T, Outcome> {
        let Some(l) = &self.liveness else {
            return work.await;
        };
        let r = tokio::select! {
            r = work => r,
            why = l.watch(Expect::Running) => {
                return Err(fail(format!(
                    "{phase} of '{}' on '{}' was given up: {why}",
                    self.drv_path, self.machine
                )));
            }
        };
        match r {
            Err(Outcome::Failed { exit, message }) => {
                let message = match l.explain().await {
                    Some(why) => format!("{message}\n{why}"),
                    None => message,
                };
                Err(Outcome::Failed { exit, message })
            }
            r => r,
        }
    }

    async fn copy_inputs(
        &self,
        builder: &mut RemoteStore,
        local: &mut LazyLocalDaemon,
    ) -> Result<(), Outcome> {
        let inputs = &self.work.inputs;
        if inputs.is_empty() {
            return Ok(());
        }
        // The builder's answers before the copy get the copy's patience, at most.
        let stall = fault_points::copy_stall(COPY_STALL);
        let patience = QUERY_TIMEOUT.min(stall);
        let silent = |what: &str| {
            fail(format!(
                "'{}' did not answer within {} s ({what})",
                self.machine,
                patience.as_secs()
            ))
        };
        if self.root_inputs {
            for p in inputs {
                let what = "keeping the inputs from the builder's garbage collection";
                tokio::time::timeout(patience, builder.daemon.add_temp_root(p, &mut |_| {}))
                    .await
                    .map_err(|_| silent(what))?
                    .map_err(|e| self.remote_err(what, e))?;
            }
        }
        let substitute = self.settings.builders_use_substitutes();
        let what = "asking the builder which inputs it has";
        // With builders-use-substitutes the builder downloads what it can first.
        let valid = tokio::time::timeout(
            if substitute {
                SUBSTITUTE_PATIENCE
            } else {
                patience
            },
            builder
                .daemon
                .query_valid_paths(inputs, substitute, &mut |_| {}),
        )
        .await
        .map_err(|_| {
            if substitute {
                fail(format!(
                    "'{}' did not answer within {} s ({what}, substituting)",
                    self.machine,
                    SUBSTITUTE_PATIENCE.as_secs()
                ))
            } else {
                silent(what)
            }
        })?
        .map_err(|e| self.remote_err(what, e))?;
        let missing: Vec<StorePath> = inputs.difference(&valid).cloned().collect();
        if missing.is_empty() {
            return Ok(());
        }
        let local = local
            .get()
            .await
            .map_err(|e| fail(format!("nixdock cannot open the local store: {e}")))?;
        let mut infos = BTreeMap::new();
        for p in &missing {
            let info = local
                .query_path_info(p, &mut |_| {})
                .await
                .map_err(|e| fail(format!("reading {p} from the local store: {e}")))?
                .ok_or_else(|| fail(format!("input {p} is not valid in the local store")))?;
            infos.insert(p.clone(), info);
        }
        let ordered = topo_sort(infos);
        let bytes: u64 = ordered.iter().map(|i| i.nar_size).sum();
        // Test-only: the copy itself, after the questions before it.
        fault_points::reached("input-copy").await;
        let progress = CopyProgress::start(
            self.parent,
            format!(
                "copying {} paths ({} MiB) to '{}'",
                ordered.len(),
                bytes >> 20,
                self.machine
            ),
            "local",
            &self.machine,
            ordered.len() as u64,
            bytes,
        );
        let source = || FsNarSource {
            case_hack: self.settings.use_case_hack(),
            progress: &progress,
        };
        let t = Instant::now();
        let what = format!("copying inputs to '{}'", self.machine);
        let copy = async {
            if builder.daemon.version().minor() >= 32 {
                return self
                    .add_in_waves(builder, &ordered, bytes, source, &what)
                    .await;
            }
            let daemon = &mut builder.daemon;
            // Before 1.32 there is no AddMultipleToStore: one AddToStoreNar per path.
            let mut r = Ok(());
            for info in &ordered {
                let (mut w, mut rd) = tokio::io::duplex(256 * 1024);
                let path = info.path.to_absolute();
                let case_hack = self.settings.use_case_hack();
                let dump = async move {
                    let r = dump_path_unhashed(Path::new(&path), &mut w, DumpOptions { case_hack })
                        .await;
                    drop(w);
                    r
                };
                let mut quiet = |_| {};
                let (d, a) = tokio::join!(
                    dump,
                    daemon.add_to_store_nar(info, &mut rd, false, true, &mut quiet)
                );
                if let Err(e) = d {
                    r = Err(fail(format!("{what}: reading {}: {e}", info.path)));
                    break;
                }
                if let Err(e) = a {
                    r = Err(self.remote_err(&what, e));
                    break;
                }
            }
            r
        };
        let r = tokio::select! {
            r = copy => r,
            () = progress.stalled(stall) => Err(stalled(&what, stall)),
        };
        drop(progress);
        if let Err(Outcome::Failed { exit, message }) = r {
            return Err(Outcome::Failed {
                exit,
                message: self.after_full_store(&missing, message),
            });
        }
        tracing::info!(
            paths = ordered.len(),
            bytes,
            ms = t.elapsed().as_millis() as u64,
            "inputs copied"
        );
        Ok(())
    }

    /// After an input copy that failed because the builder's store is full: removes what the
    /// builder kept of the inputs it did not finish (invalid, but on its disk; otherwise every
    /// later build on that builder fails the same way), and says so in the error.
    fn after_full_store(&self, missing: &[StorePath], message: String) -> String {
        let Some(l) = &self.liveness else {
            return message;
        };
        if !message.contains("No space left on device") {
            return message;
        }
        // Removed once this build's connection is closed (`run_accepted`).
        l.to_discard
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(missing.iter().map(|p| p.to_absolute()));
        format!(
            "{message}\nthe store of builder container {} is full; what it kept of the inputs it could not finish is removed from it",
            l.container
        )
    }

    /// Sends `ordered` (references first) with AddMultipleToStore: in waves whose paths refer
    /// only to earlier waves, each wave split over two connections when it is big enough, so
    /// that two daemon workers in the builder parse, hash and write at once (one is the
    /// bottleneck of a large copy).
    async fn add_in_waves<'s>(
        &self,
        builder: &mut RemoteStore,
        ordered: &[ValidPathInfo],
        bytes: u64,
        source: impl Fn() -> FsNarSource<'s>,
        what: &str,
    ) -> Result<(), Outcome> {
        let mut second: Option<DaemonConnection> = None;
        if bytes >= PARALLEL_COPY_MIN_BYTES && ordered.len() > 1 {
            match open_second_daemon(builder, &builder.name).await {
                Ok(d) => second = Some(d),
                Err(e) => tracing::debug!("one copy stream only: {e}"),
            }
        }
        let Some(mut second) = second else {
            return builder
                .daemon
                .add_multiple_to_store(ordered, &mut source(), false, true, &mut |_| {})
                .await
                .map_err(|e| self.remote_err(what, e));
        };
        for wave in waves(ordered) {
            let (a, b) = halves(wave);
            let (mut sa, mut sb) = (source(), source());
            let one = async {
                if a.is_empty() {
                    return Ok(());
                }
                builder
                    .daemon
                    .add_multiple_to_store(&a, &mut sa, false, true, &mut |_| {})
                    .await
            };
            let two = async {
                if b.is_empty() {
                    return Ok(());
                }
                second
                    .add_multiple_to_store(&b, &mut sb, false, true, &mut |_| {})
                    .await
            };
            let (r1, r2) = tokio::join!(one, two);
            r1.and(r2).map_err(|e| self.remote_err(what, e))?;
        }
        Ok(())
    }

    /// Where the builder kept the failed build's directory, and how to get there.
    fn tell_kept_dir(&self, dir: Option<&str>) {
        let drv = self.drv_path.to_absolute();
        let msg = match (&self.place, dir) {
            (Some(place), dir) => place.kept_message(&drv, dir),
            (None, Some(dir)) => format!(
                "note: the build directory of '{drv}' is kept on '{}', not on this machine: {dir}",
                self.machine
            ),
            (None, None) => return,
        };
        // The directory's name is the builder's to say.
        let msg = crate::printable::message(&msg);
        tracing::info!("{msg}");
        // Error level, as Nix prints its own note, so it shows at every verbosity.
        self.parent
            .send(&LogLine::msg(hook_protocol::log::Verbosity::Error, msg));
    }

    async fn build(
        &self,
        builder: &mut RemoteStore,
    ) -> Result<(BuildResult, Option<String>), Outcome> {
        // Settings of this caller travel with the connection, never into the builder's nix.conf.
        let mut opts = ClientSettings {
            verbosity: 3,
            max_silent_time: self.settings.max_silent_time().map_or(0, |d| d.as_secs()),
            use_substitutes: self.settings.builders_use_substitutes(),
            keep_failed: self.settings.keep_failed(),
            ..Default::default()
        };
        opts.overrides.insert(
            "substituters".into(),
            self.settings.substituters().join(" "),
        );
        for (k, v) in build_log::OVERRIDES {
            opts.overrides.insert(k.into(), v.into());
        }
        // The builder stops where a local build would; Nix counts the relayed log again.
        if let Some(n) = self.settings.max_build_log_size() {
            opts.overrides
                .insert("max-build-log-size".into(), n.to_string());
        }
        let built_for = *self.built_for.lock().unwrap_or_else(|p| p.into_inner());
        let timeout = self.settings.timeout();
        if let Some(t) = timeout {
            let left = t.saturating_sub(built_for);
            if left.is_zero() {
                return Err(Outcome::Failed {
                    exit: EXIT_TIMEOUT,
                    message: format!(
                        "build of '{}' on '{}' timed out after {} seconds",
                        self.drv_path,
                        self.machine,
                        t.as_secs()
                    ),
                });
            }
            // Whole seconds, rounded up: never less than what is left.
            let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
            opts.overrides.insert("timeout".into(), secs.to_string());
        }
        builder
            .daemon
            .set_options(&opts, &mut |_| {})
            .await
            .map_err(|e| self.remote_err("setting the builder's options", e))?;

        // As Nix's own hook: with input derivations, the whole input closure becomes inputSrcs
        // (the builder does not have the .drv files).
        let srcs = if self.drv.input_drvs.is_empty() {
            None
        } else {
            Some(self.work.inputs.clone())
        };
        let basic = self.drv.to_basic(srcs);
        // The daemon's events only say that the builder ran; its raw output is relayed from
        // its log file, followed while the build runs (see `build_log`).
        let started = std::time::SystemTime::now();
        let capture = std::sync::Mutex::new(build_log::Capture::default());
        let last_output = std::sync::Mutex::new(Instant::now());
        let mut relay = |ev: LogEvent| {
            *last_output.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
            capture.lock().unwrap_or_else(|p| p.into_inner()).event(&ev);
        };
        let build =
            builder
                .daemon
                .build_derivation(&self.drv_path, &basic, BuildMode::Normal, &mut relay);
        let max_silent = self.settings.max_silent_time();
        let attempt = Instant::now();
        // Nix's parent does not enforce these for hook builds, so the hook does.
        let watchdog = async {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                if let Some(t) = timeout
                    && built_for + attempt.elapsed() > t
                {
                    return format!("timed out after {} seconds", t.as_secs());
                }
                if let Some(s) = max_silent {
                    let last = *last_output.lock().unwrap_or_else(|p| p.into_inner());
                    if last.elapsed() > s {
                        return format!("timed out after {} seconds of silence", s.as_secs());
                    }
                }
            }
        };
        let mut live = build_log::Live::new(
            self.parent,
            builder.link.as_ref(),
            &builder.reopen,
            &builder.name,
            &self.drv_path,
        );
        let follow = live.follow(&capture);
        let result = tokio::select! {
            never = follow => match never {},
            r = build => r.map_err(Stop::Daemon),
            why = watchdog => Err(Stop::Watchdog(why)),
        };
        *self.built_for.lock().unwrap_or_else(|p| p.into_inner()) += attempt.elapsed();
        let capture = capture.into_inner().unwrap_or_else(|p| p.into_inner());
        let kept_dir = capture.kept_dir.clone();
        match &result {
            // A builder killed by the watchdog may still be writing its log.
            Err(_) => live.abandon(capture),
            Ok(_) => live.finish(capture).await,
        }
        match result {
            Ok(r) => Ok((r, kept_dir)),
            Err(Stop::Watchdog(why)) => Err(Outcome::Failed {
                exit: EXIT_TIMEOUT,
                message: format!("build of '{}' on '{}' {why}", self.drv_path, self.machine),
            }),
            Err(Stop::Daemon(e)) if e.is_connection_closed() => {
                self.lost.store(true, Ordering::Relaxed);
                let mut message = format!(
                    "lost the connection to '{}' during the build of '{}': {e}",
                    self.machine, self.drv_path
                );
                // What the container said meanwhile: a daemon worker that died (an emulator's
                // crash, say) leaves the container running and nothing else to go on.
                if let Some(l) = &self.liveness
                    && let Some(log) = l.log_since(started).await
                {
                    message.push('\n');
                    message.push_str(&log);
                }
                Err(fail(message))
            }
            Err(Stop::Daemon(e)) => Err(self.remote_err(
                &format!("building '{}' on '{}'", self.drv_path, self.machine),
                e,
            )),
        }
    }

    /// What each output must be: its path and, for a fixed output, the content address its
    /// `.drv` states. Fails for outputs nixdock cannot check (floating, impure, git-hashed).
    fn expected_outputs(&self) -> Result<BTreeMap<StorePath, Option<ContentAddress>>, Outcome> {
        let drv_name = self
            .drv_path
            .name()
            .strip_suffix(".drv")
            .unwrap_or(self.drv_path.name());
        let mut outputs = BTreeMap::new();
        for (name, o) in &self.drv.outputs {
            let p = o
                .path()
                .ok_or_else(|| fail(format!("output '{name}' of '{}' has no known path (content-addressed outputs are not supported)", self.drv_path)))?;
            let ca = ContentAddress::of_output(drv_name, name, o)
                .map_err(|e| fail(format!("'{}': {e}", self.drv_path)))?;
            outputs.insert(p, ca);
        }
        Ok(outputs)
    }

    /// Brings the outputs the local store lacks from the builder. Every step has a deadline
    /// (`local_store::deadlines`); on any failure nothing is left staged or registered, and the
    /// builder connection must not be used again (a NAR may be cut off midway).
    ///
    /// Returns the importer holding them staged (with the copy's progress activity, ended
    /// once they are registered), or `None` when the local store has them all.
    async fn copy_outputs<'p>(
        &'p self,
        builder: &mut RemoteStore,
        local: &mut LazyLocalDaemon,
    ) -> Result<Option<(OutputImporter, CopyProgress<'p>)>, Outcome> {
        let expected = self.expected_outputs()?;
        let outputs: BTreeSet<StorePath> = expected.keys().cloned().collect();
        // A path that is not on disk is not valid; only ask the store about the others (an
        // invalid leftover, or an output that is there already).
        let on_disk: BTreeSet<StorePath> = outputs
            .iter()
            .filter(|p| std::fs::symlink_metadata(p.to_absolute()).is_ok())
            .cloned()
            .collect();
        let valid = if on_disk.is_empty() {
            BTreeSet::new()
        } else {
            let local = local
                .get()
                .await
                .map_err(|e| fail(format!("nixdock cannot open the local store: {e}")))?;
            tokio::time::timeout(
                QUERY_TIMEOUT,
                local.query_valid_paths(&on_disk, false, &mut |_| {}),
            )
            .await
            .map_err(|_| {
                fail(format!(
                    "the local store did not say within {QUERY_TIMEOUT:?} which outputs it has"
                ))
            })?
            .map_err(|e| fail(format!("asking the local store which outputs it has: {e}")))?
        };
        let missing: Vec<StorePath> = outputs.difference(&valid).cloned().collect();
        if missing.is_empty() {
            return Ok(None);
        }
        // References a builder may claim: the closure Nix sent and the derivation's outputs.
        let mut allowed: BTreeSet<StorePath> = self.work.inputs.clone();
        allowed.extend(outputs.iter().cloned());
        let store_dir = Path::new(hook_protocol::store_path::STORE_DIR);
        let mut importer =
            OutputImporter::new(store_dir, self.settings.use_case_hack()).map_err(|e| {
                fail(format!(
                    "preparing to write outputs into {}: {e}",
                    store_dir.display()
                ))
            })?;
        let daemon = &mut builder.daemon;
        let mut infos = Vec::with_capacity(missing.len());
        for p in &missing {
            let info = tokio::time::timeout(QUERY_TIMEOUT, daemon.query_path_info(p, &mut |_| {}))
                .await
                .map_err(|_| {
                    fail(format!(
                        "'{}' did not describe output {p} within {QUERY_TIMEOUT:?}",
                        self.machine
                    ))
                })?
                .map_err(|e| self.remote_err(&format!("reading output {p} on the builder"), e))?
                .ok_or_else(|| {
                    fail(format!(
                        "the builder says output {p} is not valid after a successful build"
                    ))
                })?;
            let ca = expected.get(p).copied().flatten();
            check_references(p, &info.references, ca.is_some(), &allowed).map_err(|e| {
                fail(format!(
                    "refusing the outputs of '{}' from '{}': {e}",
                    self.drv_path, self.machine
                ))
            })?;
            infos.push((p, info, ca));
        }
        let bytes: u64 = infos.iter().map(|(_, i, _)| i.nar_size).sum();
        let mut bulk = match &builder.bulk {
            Some(link) if bytes >= BULK_BYTES => open_bulk_daemon(link, &builder.name).await,
            _ => None,
        };
        if bulk.is_some() {
            tracing::info!(machine = %self.machine, bytes, "outputs over a daemon connection of their own, around the holder");
        }
        let daemon = match bulk.as_mut() {
            Some(d) => d,
            None => daemon,
        };
        let progress = CopyProgress::start(
            self.parent,
            format!("copying {} outputs from '{}'", missing.len(), self.machine),
            &self.machine,
            "local",
            infos.len() as u64,
            bytes,
        );
        self.fetch_outputs(infos, daemon, &mut importer, &progress)
            .await?;
        // `missing` was read just now, under the calling Nix's output locks: the caller
        // registers them without checking their validity again.
        Ok(Some((importer, progress)))
    }

    /// Streams each output's NAR from the builder into the importer, each under the
    /// importer's deadlines (no byte for `NAR_IDLE`, too slow for its size).
    async fn fetch_outputs(
        &self,
        infos: Vec<(&StorePath, ValidPathInfo, Option<ContentAddress>)>,
        daemon: &mut DaemonConnection,
        importer: &mut OutputImporter,
        progress: &CopyProgress<'_>,
    ) -> Result<(), Outcome> {
        let idle = fault_points::copy_stall(deadlines::NAR_IDLE);
        for (p, mut info, ca) in infos {
            if info.nar_hash.algo() != HashAlgo::Sha256 {
                return Err(fail(format!(
                    "output {p}: the builder's NAR hash is not SHA-256"
                )));
            }
            let nar_size = info.nar_size;
            info.deriver = Some(self.drv_path.clone());
            let pi = PathInfo { info, ca };
            let mut path_progress = progress.path(&p.to_absolute(), nar_size);
            let daemon = &mut *daemon;
            let machine = &self.machine;
            let lost = &self.lost;
            let fetch = |mut w: tokio::io::DuplexStream| {
                let path_progress = &mut path_progress;
                async move {
                    let mut counting = CountingWriter {
                        inner: &mut w,
                        progress: path_progress,
                    };
                    // Copied as it comes, not parsed: the importer parses, hashes and checks
                    // every byte against the same path info, and on a mismatch the build fails
                    // and this connection is not used again.
                    daemon
                        .nar_from_path_sized(p, nar_size, &mut counting, &mut |_| {})
                        .await
                        .map(|_| ())
                        .map_err(|source| {
                            if source.is_connection_closed() {
                                lost.store(true, Ordering::Relaxed);
                            }
                            FetchFailed {
                                machine: machine.clone(),
                                source,
                            }
                            .into()
                        })
                }
            };
            let overall = deadlines::nar_overall(nar_size);
            importer
                .add_streamed_within(pi, idle, overall, fetch)
                .await
                .map_err(|e| {
                    fail(format!(
                        "writing output {p} of '{}' into the local store: {e}",
                        self.drv_path
                    ))
                })?;
            path_progress.finish();
        }
        Ok(())
    }
}

/// The error of a copy that stood still for `limit`.
fn stalled(what: &str, limit: Duration) -> Outcome {
    fail(format!(
        "{what}: given up after {} s without a byte moving either way (the builder's daemon \
         stopped reading or answering; the container runs and its engine answers)",
        limit.as_secs()
    ))
}

/// A NAR fetch from a builder that failed (the importer's error names the path).
#[derive(Debug, thiserror::Error)]
#[error("from '{machine}': {source}")]
struct FetchFailed {
    machine: String,
    source: hook_protocol::worker::WorkerError,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str, size: u64, refs: &[&str]) -> ValidPathInfo {
        let p = |n: &str| {
            StorePath::from_absolute(&format!("/nix/store/{}-{n}", "a".repeat(32))).unwrap()
        };
        let mut i = ValidPathInfo::new(p(name), hook_protocol::hash::Hash::sha256([0; 32]), size);
        i.references = refs.iter().map(|r| p(r)).collect();
        i
    }

    #[test]
    fn waves_put_every_path_after_its_references() {
        // c -> b -> a, d -> a, e alone, f refers to itself.
        let ordered = vec![
            info("a", 1, &[]),
            info("e", 1, &[]),
            info("f", 1, &["f"]),
            info("b", 1, &["a"]),
            info("d", 1, &["a", "d"]),
            info("c", 1, &["b", "a"]),
        ];
        let names: Vec<Vec<&str>> = waves(&ordered)
            .iter()
            .map(|w| w.iter().map(|i| i.path.name()).collect())
            .collect();
        assert_eq!(names, vec![vec!["a", "e", "f"], vec!["b", "d"], vec!["c"]]);
    }

    #[test]
    fn halves_balance_nar_size() {
        let wave = [
            info("a", 50, &[]),
            info("b", 30, &[]),
            info("c", 20, &[]),
            info("d", 10, &[]),
            info("e", 10, &[]),
        ];
        let (a, b) = halves(wave.iter().collect());
        let sum = |v: &[ValidPathInfo]| v.iter().map(|i| i.nar_size).sum::<u64>();
        assert_eq!(a.len() + b.len(), 5);
        assert_eq!((sum(&a), sum(&b)), (60, 60));
        let (a, b) = halves(vec![&wave[0]]);
        assert_eq!((a.len(), b.len()), (1, 0));
    }

    #[test]
    fn failure_summary_drops_colours_and_tail() {
        let m = "\x1b[0mbuilder for '\x1b[35;1m/nix/store/x.drv\x1b[0m' failed with exit code 127;\nlast 2 log lines:\n> a\n> b\nFor full logs, run 'nix log'.";
        assert_eq!(
            remote_failure_summary(m),
            "builder for '/nix/store/x.drv' failed with exit code 127"
        );
        assert_eq!(remote_failure_summary("plain"), "plain");
    }
}
