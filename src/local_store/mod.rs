//! Putting built outputs into the local Nix store without going through the daemon.
//!
//! While the hook runs, the parent Nix holds the lock of every output path, so any route that
//! goes through `addToStore` (the daemon's `AddToStoreNar`, `nix-store --import`, `nix copy`)
//! blocks forever (`DerivationGoal::tryToBuild` locks them,
//! `src/libstore/build/derivation-goal.cc`; `LocalStore::addToStore` waits for the same lock,
//! `src/libstore/local-store.cc`; both at 2.26.3).
//! What works on every Nix version is to write the trees into the
//! store directory ourselves and register them without path locks: the rows
//! `nix-store --register-validity --hash-given` would write, written into the database in one
//! transaction ([`ca_column::CaColumn::register`]; a process per build less), or, for a `.drv`
//! output, that command itself.
//!
//! [`OutputImporter::add`] unpacks each NAR into a private staging directory inside the store
//! directory (same file system, so the final move is a `rename`) and checks its SHA-256 and size
//! against what the builder claimed; for a fixed output it also hashes the content as it streams
//! by and checks it against the `.drv`'s `outputHash` ([`content_address`]), and refuses any
//! reference. [`OutputImporter::add_streamed`] runs the fetch beside it under the deadlines of
//! [`deadlines`]. [`OutputImporter::commit`] moves the trees into place and registers them all in
//! one transaction, with their hashes, derivers, references and the fixed outputs' content
//! addresses ([`ca_column`]). If anything fails before the registration, every path it
//! moved is removed again and nothing stays registered; dropping an importer removes its staging
//! directory. On the `nix-store` route (`.drv` outputs) the content addresses are written after
//! it; if only that write fails, the paths stay registered without it and the import fails
//! saying so (see [`ImportError::CaNotRecorded`]).
//!
//! If the process is killed in the middle (the parent may SIGKILL the hook), what can remain is
//! a `.nixdock-tmp-*` staging directory (with its `.nixdock-lock-*` file) and unregistered store
//! paths.
//! The next import sweeps the staging directories whose owner is gone ([`staging`]: each has a
//! lock file beside it that its owner holds an `flock` on for its whole life, and the kernel
//! drops that lock with the process), before it stages anything. Unregistered paths are harmless
//! to Nix (an invalid path is treated as absent and deleted before it is built or substituted)
//! and are replaced by the next import of the same path. Nix's garbage collector removes both
//! too: it deletes every entry of the store directory that is not a valid store path (checked
//! with Nix 2.8, where even `nix-store --gc --print-dead` removes a stale staging directory).
//! The flip side: a collection running during an import can remove its staging directory; the
//! import then fails with an I/O error, registers nothing, and the build can be retried.

pub mod ca_column;
pub mod content_address;
pub mod staging;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs::{self, Permissions};
use std::io::{self, Read};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hook_protocol::hash::{Hash, nix32_encode};
use hook_protocol::nar::{NarError, UnpackOptions, remove_tree, unpack_nar};
use hook_protocol::store_path::StorePath;
use hook_protocol::worker::ValidPathInfo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, DuplexStream, ReadBuf};
use tokio::process::Command;

use ca_column::{CaColumn, CaColumnError, NewPath};
use content_address::CaHasher;
pub use content_address::{CaError, ContentAddress};
use staging::StagingDir;

/// Prefix of the staging directories [`OutputImporter`] makes in the store directory.
pub const STAGING_PREFIX: &str = ".nixdock-tmp-";

/// What to register for one store path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    /// The path, its deriver, NAR hash (SHA-256) and size, and references (which may include
    /// itself and other paths of the same import), placed in the importer's store directory.
    /// Its `ca`, `sigs`, `registration_time` and `ultimate` are not registered: the content
    /// address registered is [`PathInfo::ca`], the one checked.
    pub info: ValidPathInfo,
    /// For a fixed output: the content address its `.drv` states. The content is checked
    /// against it while the NAR streams in, and it is registered with the path.
    pub ca: Option<ContentAddress>,
}

/// Why an import failed. After any of these, nothing of the import is left registered or on
/// disk (except what is still staged in a live importer, which its `Drop` removes).
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("the store directory '{}' is unusable: {reason}", path.display())]
    StoreDir { path: PathBuf, reason: String },
    #[error("'{0}' was added twice to the same import")]
    Duplicate(String),
    #[error("unpacking the NAR of '{path}': {source}")]
    Nar {
        path: String,
        #[source]
        source: NarError,
    },
    #[error(
        "the NAR received for '{path}' does not match its path info: expected {expected_size} bytes with SHA-256 {expected_hash}, got {got_size} bytes with SHA-256 {got_hash}"
    )]
    Mismatch {
        path: String,
        expected_size: u64,
        expected_hash: String,
        got_size: u64,
        got_hash: String,
    },
    #[error(
        "the NAR received for '{path}' is longer than the {expected_size} bytes its path info says"
    )]
    TooLong { path: String, expected_size: u64 },
    #[error("{op} '{}': {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot run '{}': {source}", program.display())]
    Spawn {
        program: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    NixStore {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("output '{path}' is not what its .drv specifies: {source}")]
    ContentAddress {
        path: String,
        #[source]
        source: CaError,
    },
    #[error(
        "the builder says fixed output '{path}' references {references}, but fixed-output derivations must not reference store paths"
    )]
    FixedWithReferences { path: String, references: String },
    #[error("cannot record content addresses in the local store's database: {0}")]
    CaColumn(#[source] CaColumnError),
    #[error(
        "registered {paths} (content checked against the .drv), but could not record their content address: {source}. They stay valid without it, so they are not self-certifying (`nix store verify --sigs-needed 1` rejects them). To redo it: `nix-store --delete {paths}`, then build again."
    )]
    CaNotRecorded {
        paths: String,
        #[source]
        source: CaColumnError,
    },
    #[error("copying '{path}' from the builder: {source}")]
    Fetch { path: String, source: FetchError },
    #[error("{what} did not finish within {after:?}")]
    TimedOut { what: String, after: Duration },
    #[error("copying '{path}' from the builder: no data for {idle:?}")]
    Stalled { path: String, idle: Duration },
    #[error("internal error: {0}")]
    Internal(String),
}

/// How long each phase of writing outputs into the local store may take (ARCHITECTURE.md,
/// "Deadlines of the output copy").
pub mod deadlines {
    use std::time::Duration;

    /// A NAR stream with no byte for this long is abandoned.
    pub const NAR_IDLE: Duration = Duration::from_secs(120);
    /// Every NAR stream may take this long plus [`NAR_MIN_RATE`]'s share of its size.
    pub const NAR_BASE: Duration = Duration::from_secs(300);
    /// Bytes per second below which a NAR stream is too slow to wait for.
    pub const NAR_MIN_RATE: u64 = 1 << 20;
    /// `nix-store --register-validity`, and each `--check-validity` around it (they wait for
    /// SQLite's lock with Nix's own retries, so a long garbage collection can hold them up).
    pub const NIX_STORE: Duration = Duration::from_secs(300);
    /// The write of the content addresses, lock waits included.
    pub const CA_WRITE: Duration = Duration::from_secs(60);

    /// The overall bound of one NAR stream of `nar_size` bytes.
    pub fn nar_overall(nar_size: u64) -> Duration {
        NAR_BASE + Duration::from_secs(nar_size / NAR_MIN_RATE)
    }
}

pub type Result<T, E = ImportError> = std::result::Result<T, E>;

/// Why the fetch beside [`OutputImporter::add_streamed`] failed: whatever the transport says.
pub type FetchError = Box<dyn std::error::Error + Send + Sync>;

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ImportError + 'a {
    move |source| ImportError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// Passes a NAR through, feeding the fixed-output hasher (if any) and noting when bytes last
/// arrived (for the idle deadline).
struct Tee<'a, R> {
    inner: R,
    hasher: Option<&'a mut CaHasher>,
    last_read: Option<&'a AtomicU64>,
    epoch: Instant,
}

impl<R: AsyncRead + Unpin> AsyncRead for Tee<'_, R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        let new = &buf.filled()[before..];
        if !new.is_empty() {
            if let Some(h) = this.hasher.as_deref_mut() {
                h.update(new);
            }
            if let Some(l) = this.last_read {
                l.store(this.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
            }
        }
        r
    }
}

struct Staged {
    info: PathInfo,
    /// `info.info.path` in the importer's store directory.
    path: String,
    /// `<store_dir>/<hash>-<name>`.
    dest: PathBuf,
    /// Where it was unpacked, inside the staging directory.
    tmp: PathBuf,
}

/// Writes store paths into the local store directory and registers them (see the module docs).
pub struct OutputImporter {
    store_dir: PathBuf,
    case_hack: bool,
    /// Nix's state directory, whose `db/` holds the database content addresses go into.
    state_dir: PathBuf,
    /// Created by the first `add`.
    staging: Option<StagingDir>,
    staged: Vec<Staged>,
    /// Whether this importer has swept its store directory for dead importers' leftovers.
    swept: bool,
}

impl OutputImporter {
    /// `store_dir` is the real store directory (`/nix/store`); `case_hack` is the parent's
    /// `use-case-hack` setting.
    pub fn new(store_dir: &Path, case_hack: bool) -> Result<Self> {
        let bad = |reason: String| ImportError::StoreDir {
            path: store_dir.to_owned(),
            reason,
        };
        if !store_dir.is_absolute() {
            return Err(bad("it is not an absolute path".into()));
        }
        match fs::metadata(store_dir) {
            Ok(md) if md.is_dir() => {}
            Ok(_) => return Err(bad("it is not a directory".into())),
            Err(e) => return Err(bad(e.to_string())),
        }
        Ok(OutputImporter {
            store_dir: store_dir.to_owned(),
            case_hack,
            state_dir: ca_column::nix_state_dir(),
            staging: None,
            staged: Vec::new(),
            swept: false,
        })
    }

    /// Nix's state directory, whose `db/db.sqlite` receives content addresses; by default
    /// `NIX_STATE_DIR` or `/nix/var/nix`, as `nix-store` finds it.
    pub fn set_state_dir(&mut self, dir: &Path) {
        self.state_dir = dir.to_owned();
    }

    /// Checks that `path` is `<store_dir>/<valid store path base name>`; returns the base name.
    /// `p` in this importer's store directory. A `StorePath`'s base name has no `/`, newline
    /// or other odd character, so this is directly inside it and fit for the registration input.
    fn abs(&self, p: &StorePath) -> String {
        abs_in(&self.store_dir, p)
    }

    fn ensure_staging(&mut self) -> Result<PathBuf> {
        if let Some(s) = &self.staging {
            return Ok(s.path().to_owned());
        }
        for _ in 0..16 {
            match StagingDir::create(&self.store_dir, &random_suffix()) {
                Ok(dir) => {
                    let path = dir.path().to_owned();
                    self.staging = Some(dir);
                    return Ok(path);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(io_err("creating a staging directory in", &self.store_dir)(
                        e,
                    ));
                }
            }
        }
        Err(ImportError::Internal(
            "could not find an unused staging directory name".into(),
        ))
    }

    /// Once per importer, before it stages anything: removes the staging directories of
    /// importers that died (see [`staging`]). Failures are only logged.
    async fn sweep_once(&mut self) {
        if std::mem::replace(&mut self.swept, true) {
            return;
        }
        let store_dir = self.store_dir.clone();
        match tokio::task::spawn_blocking(move || staging::sweep(&store_dir)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(
                "could not sweep '{}' for staging leftovers: {e}",
                self.store_dir.display()
            ),
            Err(e) => tracing::warn!("sweeping staging leftovers: {e}"),
        }
    }

    /// Unpacks one path's NAR (read up to its end, no further) into the staging directory and
    /// checks it against `info`'s NAR hash and size, and a fixed output's content against its
    /// content address. On error nothing of this path remains; paths added before stay staged.
    pub async fn add(&mut self, info: PathInfo, nar: impl AsyncRead + Unpin) -> Result<()> {
        self.add_inner(info, nar, None).await
    }

    async fn add_inner(
        &mut self,
        info: PathInfo,
        mut nar: impl AsyncRead + Unpin,
        last_read: Option<(&AtomicU64, Instant)>,
    ) -> Result<()> {
        let base = info.info.path.base_name().to_owned();
        let path = self.abs(&info.info.path);
        if info.ca.is_some() && !info.info.references.is_empty() {
            return Err(ImportError::FixedWithReferences {
                path,
                references: info
                    .info
                    .references
                    .iter()
                    .map(|r| format!("'{}'", self.abs(r)))
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        if self
            .staged
            .iter()
            .any(|s| s.info.info.path == info.info.path)
        {
            return Err(ImportError::Duplicate(path));
        }
        let nar_size = info.info.nar_size;
        self.sweep_once().await;
        let staging = self.ensure_staging()?;
        let tmp = staging.join(&base);
        let opts = UnpackOptions {
            case_hack: self.case_hack,
        };
        let mut hasher = info.ca.map(CaHasher::new);
        // Never read (and write to disk) more than the size the builder announced.
        let mut limited = Tee {
            inner: (&mut nar).take(nar_size),
            hasher: hasher.as_mut(),
            last_read: last_read.map(|(l, _)| l),
            epoch: last_read.map_or_else(Instant::now, |(_, e)| e),
        };
        let unpacked = unpack_nar(&mut limited, &tmp, opts).await;
        let all_read = limited.inner.limit() == 0;
        let summary = match unpacked {
            Ok(s) => s,
            Err(source) => {
                // unpack_nar has removed what it created.
                self.remove_staging_if_unused();
                if source.is_truncated() && all_read {
                    return Err(ImportError::TooLong {
                        path,
                        expected_size: nar_size,
                    });
                }
                return Err(ImportError::Nar { path, source });
            }
        };
        let got = Hash::sha256(summary.nar_sha256);
        if got != info.info.nar_hash || summary.nar_size != nar_size {
            remove_tree_logged(&tmp).await;
            self.remove_staging_if_unused();
            return Err(ImportError::Mismatch {
                path,
                expected_size: nar_size,
                expected_hash: info.info.nar_hash.to_string(),
                got_size: summary.nar_size,
                got_hash: Hash::sha256(summary.nar_sha256).to_string(),
            });
        }
        if let Some(h) = hasher
            && let Err(source) = h.finish()
        {
            remove_tree_logged(&tmp).await;
            self.remove_staging_if_unused();
            return Err(ImportError::ContentAddress { path, source });
        }
        tracing::debug!(path = %path, nar_size = summary.nar_size, "staged store path");
        self.staged.push(Staged {
            dest: self.store_dir.join(&base),
            info,
            path,
            tmp,
        });
        Ok(())
    }

    /// [`add`](Self::add) with the NAR coming from `fetch`, which writes it into the stream it
    /// is given and then drops it. Both run at once under the deadlines of
    /// [`deadlines`]: no byte for [`deadlines::NAR_IDLE`], or longer than
    /// [`deadlines::nar_overall`] of the claimed size, and the copy is abandoned. As soon as
    /// the import fails (a NAR longer than claimed, a wrong hash, …) `fetch` is dropped in the
    /// middle, so a peer that keeps sending cannot hold it up; the caller must then drop the
    /// connection `fetch` used (its stream is out of step). Nothing of this path stays staged
    /// after an error.
    pub async fn add_streamed<F, Fut>(&mut self, info: PathInfo, fetch: F) -> Result<()>
    where
        F: FnOnce(DuplexStream) -> Fut,
        Fut: Future<Output = std::result::Result<(), FetchError>>,
    {
        let overall = deadlines::nar_overall(info.info.nar_size);
        self.add_streamed_within(info, deadlines::NAR_IDLE, overall, fetch)
            .await
    }

    /// [`add_streamed`](Self::add_streamed) with the deadlines given.
    pub async fn add_streamed_within<F, Fut>(
        &mut self,
        info: PathInfo,
        idle: Duration,
        overall: Duration,
        fetch: F,
    ) -> Result<()>
    where
        F: FnOnce(DuplexStream) -> Fut,
        Fut: Future<Output = std::result::Result<(), FetchError>>,
    {
        let store_path = info.info.path.clone();
        let path = self.abs(&store_path);
        let tick_every = (idle / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        let (w, r) = tokio::io::duplex(1 << 20);
        let epoch = Instant::now();
        let last_read = AtomicU64::new(0);
        let (outcome, added, fetched) = {
            let fetch = fetch(w);
            // The reader is moved in, so it is dropped the moment the import ends: a fetch still
            // writing then fails at once instead of filling the pipe and waiting forever.
            let add = self.add_inner(info, r, Some((&last_read, epoch)));
            tokio::pin!(fetch, add);
            let mut fetched: Option<std::result::Result<(), FetchError>> = None;
            let mut added: Option<Result<()>> = None;
            let mut tick = tokio::time::interval(tick_every);
            let outcome = loop {
                match (&added, &fetched) {
                    (Some(Err(_)), _) | (Some(Ok(())), Some(_)) => break None,
                    _ => {}
                }
                tokio::select! {
                    a = &mut add, if added.is_none() => added = Some(a),
                    f = &mut fetch, if fetched.is_none() => fetched = Some(f),
                    _ = tick.tick() => {
                        let last = Duration::from_millis(last_read.load(Ordering::Relaxed));
                        if epoch.elapsed() > overall {
                            break Some(ImportError::TimedOut {
                                what: format!("copying '{path}' from the builder"),
                                after: overall,
                            });
                        }
                        if epoch.elapsed().saturating_sub(last) > idle {
                            break Some(ImportError::Stalled { path: path.clone(), idle });
                        }
                    }
                }
            };
            // Dropping the futures here cancels whichever is still running.
            (outcome, added, fetched)
        };
        if let Some(e) = outcome {
            // The import may have been cancelled midway: remove what it unpacked.
            self.discard_partial(&store_path).await;
            return Err(e);
        }
        match (added, fetched) {
            // The fetch's own error says what went wrong first (a broken connection shows in
            // the import as a truncated NAR).
            (Some(Err(e @ ImportError::Nar { .. })), Some(Err(f))) => {
                tracing::debug!("import of '{path}' failed after its fetch: {e}");
                Err(ImportError::Fetch { path, source: f })
            }
            (Some(Err(e)), _) => Err(e),
            (Some(Ok(())), Some(Err(f))) => {
                // Everything arrived and matched, but the peer's stream did not end cleanly:
                // refuse it all the same.
                self.discard_partial(&store_path).await;
                Err(ImportError::Fetch { path, source: f })
            }
            (Some(Ok(())), Some(Ok(()))) => Ok(()),
            _ => Err(ImportError::Internal(format!(
                "the copy of '{path}' ended in an impossible state"
            ))),
        }
    }

    /// Removes whatever of `path` is in the staging directory, staged or half unpacked.
    async fn discard_partial(&mut self, path: &StorePath) {
        self.staged.retain(|s| s.info.info.path != *path);
        if let Some(staging) = &self.staging {
            let tmp = staging.path().join(path.base_name());
            if fs::symlink_metadata(&tmp).is_ok() {
                remove_tree_logged(&tmp).await;
            }
        }
        self.remove_staging_if_unused();
    }

    fn remove_staging_if_unused(&mut self) {
        if !self.staged.is_empty() {
            return;
        }
        // Nothing of this importer's is in it: dropping it removes it and its lock file.
        drop(self.staging.take());
    }

    /// Moves every staged path into the store (replacing invalid leftovers, skipping paths that
    /// are already valid) and registers them with one
    /// `<nix_store_bin> --register-validity --hash-given`. On failure, removes what it moved and
    /// returns the error (with nix-store's stderr).
    ///
    /// The work runs in a task of its own, so it completes (or rolls back) even if the future
    /// returned here is dropped.
    pub async fn commit(self, nix_store_bin: &Path) -> Result<()> {
        self.commit_inner(nix_store_bin, true).await
    }

    /// [`commit`](Self::commit) for paths the caller has just found invalid while the calling
    /// Nix holds their output locks, so nobody can have made them valid since: skips the
    /// validity check (a `nix-store` process start).
    pub async fn commit_locked_invalid(self, nix_store_bin: &Path) -> Result<()> {
        self.commit_inner(nix_store_bin, false).await
    }

    async fn commit_inner(mut self, nix_store_bin: &Path, check_validity: bool) -> Result<()> {
        let staged = std::mem::take(&mut self.staged);
        let staging = self.staging.take();
        let nix_store = nix_store_bin.to_owned();
        let state_dir = self.state_dir.clone();
        let store_dir = self.store_dir.clone();
        let task = tokio::spawn(async move {
            let result = if staged.is_empty() {
                Ok(())
            } else {
                commit_staged(&nix_store, &store_dir, &state_dir, staged, check_validity).await
            };
            if let Some(s) = staging {
                // Dropping it removes the directory (blocking), then its lock file.
                let _ = tokio::task::spawn_blocking(move || drop(s)).await;
            }
            result
        });
        task.await
            .map_err(|e| ImportError::Internal(format!("the commit task failed: {e}")))?
    }
}

async fn commit_staged(
    nix_store: &Path,
    store_dir: &Path,
    state_dir: &Path,
    staged: Vec<Staged>,
    check_validity: bool,
) -> Result<()> {
    let all: Vec<String> = staged.iter().map(|s| s.path.clone()).collect();
    let invalid = if check_validity {
        query_invalid(nix_store, &all).await?
    } else {
        all.iter().cloned().collect()
    };
    let mut to_move: Vec<&Staged> = Vec::new();
    for s in &staged {
        if invalid.contains(&s.path) {
            to_move.push(s);
        } else {
            tracing::info!(path = %s.path, "already valid in the local store; keeping it");
        }
    }
    if to_move.is_empty() {
        return Ok(());
    }

    // Registration writes the database directly (`CaColumn::register`: the rows
    // `nix-store --register-validity` writes, plus a fixed output's `ca`, in one transaction),
    // which saves starting a nix-store process per build — the most CPU a small build costs
    // this host. Derivations (their registration also fills `DerivationOutputs`) and a database
    // that cannot be opened go through `nix-store --register-validity` as before, with the
    // content addresses written after it. The database is opened (and its schema checked)
    // first, so that one the hook cannot write fails with nothing registered.
    let ca_rows: Vec<(String, String)> = to_move
        .iter()
        .filter_map(|s| Some((s.path.clone(), s.info.ca?.render())))
        .collect();
    let direct = to_move.iter().all(|s| !s.path.ends_with(".drv"));
    let mut ca_column = if ca_rows.is_empty() && !direct {
        None
    } else {
        let dir = state_dir.to_owned();
        let c = tokio::task::spawn_blocking(move || CaColumn::open(&dir, deadlines::CA_WRITE))
            .await
            .map_err(|e| ImportError::Internal(format!("opening the Nix database: {e}")))?;
        match c {
            Ok(c) => Some(c),
            Err(e) if ca_rows.is_empty() => {
                tracing::debug!("registering through nix-store: {e}");
                None
            }
            Err(e) => return Err(ImportError::CaColumn(e)),
        }
    };
    let direct = direct && ca_column.is_some();

    // Move into place.
    let mut moved: Vec<PathBuf> = Vec::new();
    let mut to_register: Vec<&Staged> = Vec::new();
    for s in to_move {
        if let Err(e) = move_into_place(&s.tmp, &s.dest).await {
            remove_all(&moved).await;
            return Err(e);
        }
        moved.push(s.dest.clone());
        to_register.push(s);
    }

    if direct && let Some(mut c) = ca_column.take() {
        let rows: Vec<NewPath> = to_register
            .iter()
            .map(|s| {
                let i = &s.info.info;
                NewPath {
                    path: s.path.clone(),
                    nar_hash_base16: i.nar_hash.to_base16(),
                    nar_size: i.nar_size,
                    deriver: i.deriver.as_ref().map(|d| abs_in(store_dir, d)),
                    references: i.references.iter().map(|r| abs_in(store_dir, r)).collect(),
                    ca: s.info.ca.map(|ca| ca.render()),
                }
            })
            .collect();
        let dests = moved.clone();
        let registered = tokio::task::spawn_blocking(move || {
            // What `--register-validity` canonicalises that the unpacking does not: the
            // mtime of symbolic links.
            for d in &dests {
                canonicalise_symlink_mtimes(d)?;
            }
            c.register(&rows).map_err(ImportError::CaColumn)
        })
        .await
        .map_err(|e| ImportError::Internal(format!("registering: {e}")))
        .and_then(|r| r);
        let err = match registered {
            Ok(()) => {
                tracing::debug!(paths = ?all, "registered store paths");
                return Ok(());
            }
            Err(e) => e,
        };
        // Nothing of the transaction stays; remove what was moved.
        return Err(roll_back(nix_store, &to_register, moved, err).await);
    }

    // Register them all at once.
    let input = registration_input(
        store_dir,
        &to_register.iter().map(|s| &s.info.info).collect::<Vec<_>>(),
    );
    let command = format!("{} --register-validity --hash-given", nix_store.display());
    let res = run_nix_store(
        nix_store,
        &["--register-validity", "--hash-given"],
        input.as_bytes(),
    )
    .await;
    let err = match res {
        Ok(out) if out.status.success() => {
            tracing::debug!(paths = ?all, "registered store paths");
            let Some(mut c) = ca_column.take() else {
                return Ok(());
            };
            // The paths are valid now, with content checked against the .drv. If their
            // content address cannot be written, the build fails but they stay valid: taking
            // them out of the database again by hand would be the hand-made registration this
            // module avoids, and the parent's locks keep Nix's own deletion away.
            let rows = ca_rows.clone();
            let set = tokio::task::spawn_blocking(move || c.set(&rows))
                .await
                .map_err(|e| ImportError::Internal(format!("writing content addresses: {e}")))?;
            return match set {
                Ok(()) => {
                    tracing::debug!(rows = ?ca_rows, "recorded content addresses");
                    Ok(())
                }
                Err(source) => Err(ImportError::CaNotRecorded {
                    paths: ca_rows
                        .iter()
                        .map(|(p, _)| p.as_str())
                        .collect::<Vec<_>>()
                        .join(" "),
                    source,
                }),
            };
        }
        Ok(out) => ImportError::NixStore {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        },
        Err(e) => e,
    };

    Err(roll_back(nix_store, &to_register, moved, err).await)
}

/// After a failed registration: removes the moved paths that are not valid, and returns `err`.
async fn roll_back(
    nix_store: &Path,
    to_register: &[&Staged],
    moved: Vec<PathBuf>,
    err: ImportError,
) -> ImportError {
    // The registration is one SQLite transaction, so normally none of the paths are
    // valid now; only remove what is confirmed invalid, so as never to leave a valid path
    // without its files.
    let moved_paths: Vec<String> = to_register.iter().map(|s| s.path.clone()).collect();
    match query_invalid(nix_store, &moved_paths).await {
        Ok(still_invalid) => {
            let (remove, keep): (Vec<_>, Vec<_>) = moved
                .into_iter()
                .zip(moved_paths)
                .partition(|(_, p)| still_invalid.contains(p));
            for (_, p) in keep {
                tracing::warn!(path = %p, "registration failed but the path is valid; keeping it");
            }
            remove_all(&remove.into_iter().map(|(d, _)| d).collect::<Vec<_>>()).await;
        }
        Err(e) => {
            tracing::warn!("could not check validity after a failed registration: {e}");
            remove_all(&moved).await;
        }
    }
    err
}

/// Sets the mtime of every symbolic link in the tree at `root` (itself included) to 1, keeping
/// its atime, as Nix's `canonicaliseTimestampAndPermissions` does (`lutimes`).
fn canonicalise_symlink_mtimes(root: &Path) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let md = fs::symlink_metadata(root).map_err(io_err("checking", root))?;
    if md.file_type().is_symlink() {
        let c = std::ffi::CString::new(root.as_os_str().as_bytes())
            .map_err(|_| ImportError::Internal(format!("a NUL in {}", root.display())))?;
        let times = [
            libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_OMIT,
            },
            libc::timespec {
                tv_sec: 1,
                tv_nsec: 0,
            },
        ];
        // SAFETY: a NUL-terminated path and two timespecs, as utimensat requires.
        let r = unsafe {
            libc::utimensat(
                libc::AT_FDCWD,
                c.as_ptr(),
                times.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if r != 0 {
            return Err(io_err("setting the mtime of", root)(
                io::Error::last_os_error(),
            ));
        }
    } else if md.is_dir() {
        for e in fs::read_dir(root).map_err(io_err("listing", root))? {
            let e = e.map_err(io_err("listing", root))?;
            canonicalise_symlink_mtimes(&e.path())?;
        }
    }
    Ok(())
}

/// `nix-store --register-validity --hash-given` input (`decodeValidPathInfo` in
/// `src/libstore/store-api.cc`): per path, lines `path`, `sha256:<base16>`, `narSize`,
/// `deriver` (empty if none), the number of references, and the references.
fn registration_input(store_dir: &Path, infos: &[&ValidPathInfo]) -> String {
    let mut s = String::new();
    for i in infos {
        let _ = writeln!(s, "{}", abs_in(store_dir, &i.path));
        // Only SHA-256 NAR hashes are staged (`add` compares with one).
        let _ = writeln!(s, "sha256:{}", i.nar_hash.to_base16());
        let _ = writeln!(s, "{}", i.nar_size);
        let deriver = i.deriver.as_ref().map(|d| abs_in(store_dir, d));
        let _ = writeln!(s, "{}", deriver.unwrap_or_default());
        let _ = writeln!(s, "{}", i.references.len());
        for r in &i.references {
            let _ = writeln!(s, "{}", abs_in(store_dir, r));
        }
    }
    s
}

fn abs_in(store_dir: &Path, p: &StorePath) -> String {
    format!("{}/{}", store_dir.display(), p.base_name())
}

/// Which of `paths` the local store does not consider valid.
async fn query_invalid(nix_store: &Path, paths: &[String]) -> Result<BTreeSet<String>> {
    let mut args = vec!["--check-validity", "--print-invalid"];
    args.extend(paths.iter().map(String::as_str));
    let out = run_nix_store(nix_store, &args, b"").await?;
    if !out.status.success() {
        return Err(ImportError::NixStore {
            command: format!("{} --check-validity --print-invalid …", nix_store.display()),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect())
}

/// Runs `nix-store ARGS` with `stdin`, killed after [`deadlines::NIX_STORE`] (an interrupted
/// registration is rolled back by SQLite).
async fn run_nix_store(
    nix_store: &Path,
    args: &[&str],
    stdin: &[u8],
) -> Result<std::process::Output> {
    let mut child = Command::new(nix_store)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| ImportError::Spawn {
            program: nix_store.to_owned(),
            source,
        })?;
    let mut child_stdin = child.stdin.take().expect("stdin is piped");
    let write = async move {
        let r = child_stdin.write_all(stdin).await;
        drop(child_stdin);
        r
    };
    let run = async { tokio::join!(write, child.wait_with_output()) };
    let (written, output) = tokio::time::timeout(deadlines::NIX_STORE, run)
        .await
        .map_err(|_| ImportError::TimedOut {
            what: format!("`{} {}`", nix_store.display(), args.join(" ")),
            after: deadlines::NIX_STORE,
        })?;
    let output = output.map_err(|source| ImportError::Spawn {
        program: nix_store.to_owned(),
        source,
    })?;
    // A write error (nix-store exited early) shows in its status and stderr.
    match written {
        Err(e) if output.status.success() => Err(ImportError::Spawn {
            program: nix_store.to_owned(),
            source: e,
        }),
        _ => Ok(output),
    }
}

/// Replaces whatever is at `dest` (an invalid leftover) with the staged tree at `tmp`.
async fn move_into_place(tmp: &Path, dest: &Path) -> Result<()> {
    let (tmp, dest) = (tmp.to_owned(), dest.to_owned());
    tokio::task::spawn_blocking(move || {
        match fs::symlink_metadata(&dest) {
            Ok(_) => {
                tracing::info!(path = %dest.display(), "removing an invalid leftover");
                remove_tree(&dest).map_err(io_err("removing invalid leftover", &dest))?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("checking", &dest)(e)),
        }
        // Moving a directory to another parent rewrites its "..", which needs write permission
        // on it (for anyone but root). Modes and mtime are set through a descriptor opened in
        // the private staging directory, never through the path in the shared store.
        let is_dir = fs::symlink_metadata(&tmp)
            .map_err(io_err("checking", &tmp))?
            .is_dir();
        let dir = if is_dir {
            let f = fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
                .open(&tmp)
                .map_err(io_err("opening", &tmp))?;
            f.set_permissions(Permissions::from_mode(0o755))
                .map_err(io_err("setting permissions of", &tmp))?;
            Some(f)
        } else {
            None
        };
        fs::rename(&tmp, &dest).map_err(io_err("moving a staged path to", &dest))?;
        if let Some(f) = dir {
            f.set_permissions(Permissions::from_mode(0o555))
                .map_err(io_err("setting permissions of", &dest))?;
            // The chmod did not touch the mtime, but be explicit: Nix's canonical mtime is 1.
            f.set_times(
                fs::FileTimes::new()
                    .set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1)),
            )
            .map_err(io_err("setting the mtime of", &dest))?;
        }
        Ok(())
    })
    .await
    .map_err(|e| ImportError::Internal(format!("moving into place: {e}")))?
}

async fn remove_all(paths: &[PathBuf]) {
    for p in paths {
        remove_tree_logged(p).await;
    }
}

async fn remove_tree_logged(p: &Path) {
    let p = p.to_owned();
    let res = tokio::task::spawn_blocking({
        let p = p.clone();
        move || remove_tree(&p)
    })
    .await;
    match res {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("could not remove '{}': {e}", p.display()),
        Err(e) => tracing::warn!("could not remove '{}': {e}", p.display()),
    }
}

/// 20 random bytes (from the kernel, else from time and pid) in nix32.
fn random_suffix() -> String {
    let mut b = [0u8; 20];
    if fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_err()
    {
        use sha2::{Digest, Sha256};
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let mut h = Sha256::new();
        h.update(now.as_nanos().to_le_bytes());
        h.update(std::process::id().to_le_bytes());
        h.update((&b as *const _ as usize).to_le_bytes());
        b.copy_from_slice(&h.finalize()[..20]);
    }
    nix32_encode(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_input_format() {
        let p = |s: &str| StorePath::from_absolute(s).unwrap();
        let mut a = ValidPathInfo::new(
            p("/nix/store/00000000000000000000000000000000-a"),
            Hash::sha256([0xab; 32]),
            120,
        );
        a.deriver = Some(p("/nix/store/11111111111111111111111111111111-a.drv"));
        a.references = [
            p("/nix/store/00000000000000000000000000000000-a"),
            p("/nix/store/22222222222222222222222222222222-b"),
        ]
        .into();
        let b = ValidPathInfo::new(
            p("/nix/store/22222222222222222222222222222222-b"),
            Hash::sha256([0; 32]),
            8,
        );
        let s = registration_input(Path::new("/nix/store"), &[&a, &b]);
        let expected = format!(
            "/nix/store/00000000000000000000000000000000-a\nsha256:{}\n120\n\
             /nix/store/11111111111111111111111111111111-a.drv\n2\n\
             /nix/store/00000000000000000000000000000000-a\n\
             /nix/store/22222222222222222222222222222222-b\n\
             /nix/store/22222222222222222222222222222222-b\nsha256:{}\n8\n\n0\n",
            "ab".repeat(32),
            "00".repeat(32)
        );
        assert_eq!(s, expected);
    }

    /// A NAR of one small file and its path info.
    async fn small_nar(_store: &Path, content: &[u8]) -> (Vec<u8>, PathInfo) {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("f");
        fs::write(&f, content).unwrap();
        let mut nar = Vec::new();
        let s = hook_protocol::nar::dump_path(&f, &mut nar, Default::default())
            .await
            .unwrap();
        let info = PathInfo {
            info: ValidPathInfo::new(
                StorePath::from_base_name("00000000000000000000000000000000-a").unwrap(),
                Hash::sha256(s.nar_sha256),
                s.nar_size,
            ),
            ca: None,
        };
        (nar, info)
    }

    fn staging_dirs(store: &Path) -> Vec<PathBuf> {
        fs::read_dir(store)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect()
    }

    /// Guards against a hang (the bug this tests): the import must end long before this.
    const HANG: Duration = Duration::from_secs(120);

    /// A peer whose NAR is longer than the size it claimed, and that keeps sending after it:
    /// the import fails as too long and the fetch is cut off instead of blocking on a full
    /// pipe (it used to wait forever).
    #[tokio::test]
    async fn a_nar_longer_than_claimed_ends_the_fetch() {
        let store = tempfile::tempdir().unwrap();
        let (nar, mut info) = small_nar(store.path(), &[3u8; 3 << 20]).await;
        info.info.nar_size -= 8;
        let mut imp = OutputImporter::new(store.path(), false).unwrap();
        let fetch = |mut w: DuplexStream| async move {
            w.write_all(&nar).await.map_err(|e| e.to_string())?;
            loop {
                w.write_all(&[0u8; 65536])
                    .await
                    .map_err(|e| e.to_string())?;
            }
        };
        let r = tokio::time::timeout(HANG, imp.add_streamed(info, fetch))
            .await
            .expect("the import hung on a peer that kept sending");
        assert!(matches!(r, Err(ImportError::TooLong { .. })), "{r:?}");
        drop(imp);
        assert!(staging_dirs(store.path()).is_empty());
    }

    /// The same when the NAR's file claims more content than the path info's size (the
    /// fetch's own NAR parser would wait for all of it).
    #[tokio::test]
    async fn a_nar_bigger_inside_than_claimed_ends_the_fetch() {
        let store = tempfile::tempdir().unwrap();
        let (mut nar, mut info) = small_nar(store.path(), &[1u8; 4096]).await;
        info.info.nar_size = 200;
        nar.truncate(200);
        let mut imp = OutputImporter::new(store.path(), false).unwrap();
        let fetch = |mut w: DuplexStream| async move {
            loop {
                w.write_all(&nar).await.map_err(|e| e.to_string())?;
            }
        };
        let r = tokio::time::timeout(HANG, imp.add_streamed(info, fetch))
            .await
            .expect("the import hung on a peer that kept sending");
        assert!(matches!(r, Err(ImportError::TooLong { .. })), "{r:?}");
        assert!(staging_dirs(store.path()).is_empty());
    }

    /// Shorter than claimed: the fetch ends early, the import fails, nothing stays staged.
    #[tokio::test]
    async fn a_nar_shorter_than_claimed_fails() {
        let store = tempfile::tempdir().unwrap();
        let (nar, mut info) = small_nar(store.path(), b"hello").await;
        info.info.nar_size += 8;
        let mut imp = OutputImporter::new(store.path(), false).unwrap();
        let fetch =
            |mut w: DuplexStream| async move { w.write_all(&nar).await.map_err(Into::into) };
        let r = tokio::time::timeout(HANG, imp.add_streamed(info, fetch))
            .await
            .expect("hung");
        assert!(r.is_err(), "{r:?}");
        assert!(staging_dirs(store.path()).is_empty());
    }

    /// A peer that stops sending midway hits the idle deadline (short here), and one that
    /// trickles hits the overall one.
    #[tokio::test]
    async fn a_stalled_nar_hits_the_idle_deadline() {
        let store = tempfile::tempdir().unwrap();
        let (nar, info) = small_nar(store.path(), &[2u8; 1000]).await;
        let mut imp = OutputImporter::new(store.path(), false).unwrap();
        let head = nar[..300].to_vec();
        let fetch = |mut w: DuplexStream| async move {
            w.write_all(&head).await.map_err(|e| e.to_string())?;
            std::future::pending::<()>().await;
            Ok(())
        };
        let r = imp
            .add_streamed_within(info.clone(), Duration::from_millis(300), HANG, fetch)
            .await;
        assert!(matches!(r, Err(ImportError::Stalled { .. })), "{r:?}");
        assert!(staging_dirs(store.path()).is_empty());

        let fetch = |mut w: DuplexStream| async move {
            for b in &nar {
                w.write_all(std::slice::from_ref(b))
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(())
        };
        let r = imp
            .add_streamed_within(info, HANG, Duration::from_millis(500), fetch)
            .await;
        assert!(matches!(r, Err(ImportError::TimedOut { .. })), "{r:?}");
        drop(imp);
        assert!(staging_dirs(store.path()).is_empty());
    }

    /// A fetch that fails after sending everything still fails the import, and nothing of the
    /// path stays staged.
    #[tokio::test]
    async fn a_failed_fetch_after_a_complete_nar_is_refused() {
        let store = tempfile::tempdir().unwrap();
        let (nar, info) = small_nar(store.path(), b"x").await;
        let mut imp = OutputImporter::new(store.path(), false).unwrap();
        let fetch = |mut w: DuplexStream| async move {
            w.write_all(&nar).await.map_err(|e| e.to_string())?;
            Err("the peer said something odd".into())
        };
        let r = imp.add_streamed(info.clone(), fetch).await;
        assert!(matches!(r, Err(ImportError::Fetch { .. })), "{r:?}");
        assert!(staging_dirs(store.path()).is_empty());
        // And a good one goes through.
        let (nar, _) = small_nar(store.path(), b"x").await;
        let fetch =
            |mut w: DuplexStream| async move { w.write_all(&nar).await.map_err(Into::into) };
        imp.add_streamed(info, fetch).await.unwrap();
        assert_eq!(imp.staged.len(), 1);
    }

    /// A fixed output whose content is not what the .drv says stays out of the staging area.
    #[tokio::test]
    async fn wrong_fixed_content_is_refused_before_staging() {
        use hook_protocol::hash::HashAlgo;
        use hook_protocol::store_path::ContentAddressMethod;
        let store = tempfile::tempdir().unwrap();
        let (nar, mut info) = small_nar(store.path(), b"tampered").await;
        let digest = |b: &[u8]| Hash::sha256_of(b);
        info.ca = Some(ContentAddress {
            method: ContentAddressMethod::Flat,
            hash: digest(b"original"),
        });
        let mut imp = OutputImporter::new(store.path(), false).unwrap();
        let e = imp.add(info.clone(), &nar[..]).await.unwrap_err();
        assert!(
            matches!(
                e,
                ImportError::ContentAddress {
                    source: CaError::Mismatch { .. },
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("sha256-"), "{e}");
        assert!(staging_dirs(store.path()).is_empty());
        // The right content passes, for every algorithm.
        for algo in [
            HashAlgo::Md5,
            HashAlgo::Sha1,
            HashAlgo::Sha256,
            HashAlgo::Sha512,
        ] {
            info.ca = Some(ContentAddress {
                method: ContentAddressMethod::Flat,
                hash: content_address::hash_of(algo, b"tampered"),
            });
            let mut imp = OutputImporter::new(store.path(), false).unwrap();
            imp.add(info.clone(), &nar[..]).await.unwrap();
        }
        // A fixed output with a reference is refused.
        info.info.references = [info.info.path.clone()].into();
        let mut imp = OutputImporter::new(store.path(), false).unwrap();
        assert!(matches!(
            imp.add(info, &nar[..]).await,
            Err(ImportError::FixedWithReferences { .. })
        ));
    }

    /// Paths are `StorePath`s (a valid base name, checked where they were parsed), placed
    /// directly inside the importer's store directory.
    #[test]
    fn store_path_checks() {
        let t = tempfile::tempdir().unwrap();
        let imp = OutputImporter::new(t.path(), false).unwrap();
        let store = t.path().display().to_string();
        let p = StorePath::from_base_name("00000000000000000000000000000000-a").unwrap();
        assert_eq!(
            imp.abs(&p),
            format!("{store}/00000000000000000000000000000000-a")
        );
        assert!(OutputImporter::new(Path::new("relative"), false).is_err());
        assert!(OutputImporter::new(&t.path().join("missing"), false).is_err());
    }
}
