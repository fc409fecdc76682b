//! The build-hook channel between a calling Nix (the "parent") and its build hook.
//!
//! The parent forks the hook with the toHook pipe on fd 0 and the fromHook pipe on fds 1 and 2
//! (`src/libstore/build/hook-instance.cc` in 2.8, `src/libstore/unix/build/hook-instance.cc`
//! in 2.26), then speaks this protocol:
//!
//! 1. the **settings preamble**: every global setting as `u64 1, name, value`, ended by `u64 0`
//!    ([`read_settings`]);
//! 2. any number of **`try` requests** (`DerivationGoal::tryBuildHook`), each answered by one
//!    [`Reply`] line on stderr ([`read_request`], [`Reply::to_bytes`]);
//! 3. after `# accept`, the **accepted work**: the input closure and the missing output names,
//!    then EOF ([`read_accepted`]).
//!
//! The byte formats are identical in Nix 2.8, 2.26 and 2.35. The values in the preamble are
//! each setting's `to_string()` rendering: booleans are `true`/`false`, lists and sets are
//! joined with single spaces, numbers are decimal.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::store_path::{self, StorePath};
use crate::wire::{self, WireError};

/// Most settings accepted in one preamble. Nix 2.8 sends about 90 and 2.26 about 150; the limit
/// only stops a runaway stream from growing memory without bound.
pub const MAX_SETTINGS: usize = 1 << 16;

/// Longest command word accepted where a command is expected (the only one is `try`).
const MAX_COMMAND_LEN: u64 = 256;

/// The parent's settings, as sent in the preamble: setting name → rendered value.
///
/// Names are UTF-8 (they are ASCII in every Nix); a value that is not UTF-8 is converted
/// lossily (U+FFFD), so such a value does not re-encode byte for byte.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings(pub BTreeMap<String, String>);

impl From<BTreeMap<String, String>> for Settings {
    fn from(map: BTreeMap<String, String>) -> Self {
        Settings(map)
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Settings {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Settings(
            iter.into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }
}

/// Splits a rendered list or set setting the way Nix's `tokenizeString` does.
fn words(s: &str) -> impl Iterator<Item = &str> {
    s.split([' ', '\t', '\n', '\r']).filter(|w| !w.is_empty())
}

/// Parses a rendered boolean as `BaseSetting<bool>::set` does (`src/libutil/config.cc`).
fn parse_bool(s: &str) -> Option<bool> {
    match s.trim() {
        "true" | "yes" | "1" => Some(true),
        "false" | "no" | "0" => Some(false),
        _ => None,
    }
}

impl Settings {
    /// The raw rendered value of any setting.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// Number of settings the parent sent.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the parent sent no settings.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Every setting as `(name, value)`, in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The settings as a map from name to rendered value.
    pub fn into_inner(self) -> BTreeMap<String, String> {
        self.0
    }

    fn get_words(&self, name: &str) -> impl Iterator<Item = &str> {
        words(self.get(name).unwrap_or(""))
    }

    fn get_u64(&self, name: &str) -> Option<u64> {
        self.get(name)?.trim().parse().ok()
    }

    fn get_bool(&self, name: &str) -> Option<bool> {
        parse_bool(self.get(name)?)
    }

    /// Seconds, where 0 (Nix's "no limit") and absence are `None`.
    fn get_secs(&self, name: &str) -> Option<Duration> {
        match self.get_u64(name)? {
            0 => None,
            s => Some(Duration::from_secs(s)),
        }
    }

    /// `system`: the parent's platform, e.g. `x86_64-linux`.
    pub fn system(&self) -> Option<&str> {
        self.get("system").map(str::trim)
    }

    /// `extra-platforms`: further platforms the parent can build for locally.
    pub fn extra_platforms(&self) -> Vec<String> {
        self.get_words("extra-platforms")
            .map(String::from)
            .collect()
    }

    /// `system-features`: the parent's local features (`kvm`, `big-parallel`, …).
    pub fn system_features(&self) -> BTreeSet<String> {
        self.get_words("system-features")
            .map(String::from)
            .collect()
    }

    /// `max-jobs`: the parent's local job limit. The parent renders a number (`auto` is
    /// resolved before the preamble is written); `auto` is still accepted and means the
    /// number of CPUs, as in Nix. `None` if absent or unparsable.
    pub fn max_jobs(&self) -> Option<u64> {
        let v = self.get("max-jobs")?.trim();
        if v == "auto" {
            return std::thread::available_parallelism()
                .ok()
                .map(|n| n.get() as u64);
        }
        v.parse().ok()
    }

    /// `store`: the parent's store URI (`auto`, `daemon`, `local?root=…`, …).
    pub fn store(&self) -> Option<&str> {
        self.get("store")
    }

    /// `builders`: the raw machines specification (often `@/etc/nix/machines`).
    pub fn builders(&self) -> Option<&str> {
        self.get("builders")
    }

    /// `builders-use-substitutes` (Nix default `false`).
    pub fn builders_use_substitutes(&self) -> bool {
        self.get_bool("builders-use-substitutes").unwrap_or(false)
    }

    /// `max-silent-time`; `None` means no limit (Nix's 0). The parent does not enforce it for
    /// hook builds: the hook has to.
    pub fn max_silent_time(&self) -> Option<Duration> {
        self.get_secs("max-silent-time")
    }

    /// `timeout` (its alias `build-timeout` is never sent, aliases are skipped by
    /// `Config::getSettings`, but it is read if `timeout` is absent). `None` means no limit.
    pub fn timeout(&self) -> Option<Duration> {
        match self.get("timeout") {
            Some(_) => self.get_secs("timeout"),
            None => self.get_secs("build-timeout"),
        }
    }

    /// `max-build-log-size` in bytes; `None` means no limit (Nix's 0).
    pub fn max_build_log_size(&self) -> Option<u64> {
        self.get_u64("max-build-log-size").filter(|&n| n != 0)
    }

    /// `keep-failed` (Nix default `false`).
    pub fn keep_failed(&self) -> bool {
        self.get_bool("keep-failed").unwrap_or(false)
    }

    /// `substituters`, in the parent's order.
    pub fn substituters(&self) -> Vec<String> {
        self.get_words("substituters").map(String::from).collect()
    }

    /// `experimental-features` (e.g. `ca-derivations`).
    pub fn experimental_features(&self) -> BTreeSet<String> {
        self.get_words("experimental-features")
            .map(String::from)
            .collect()
    }

    /// `use-case-hack` (an archive setting; default `false` except on macOS).
    pub fn use_case_hack(&self) -> bool {
        self.get_bool("use-case-hack").unwrap_or(false)
    }

    /// Encodes the preamble exactly as the parent does (sorted by name, `u64 0` at the end).
    pub fn write(&self, buf: &mut BytesMut) {
        for (name, value) in &self.0 {
            wire::put_u64(buf, 1);
            wire::put_str(buf, name);
            wire::put_str(buf, value);
        }
        wire::put_u64(buf, 0);
    }
}

/// Reads the settings preamble: `u64 1, name, value` pairs until `u64 0`. Any other tag is an
/// error (the stock hook only tests for non-zero; the parent only ever writes 1).
pub async fn read_settings<R: AsyncRead + Unpin>(r: &mut R) -> Result<Settings, WireError> {
    let mut map = BTreeMap::new();
    loop {
        match wire::read_u64(r).await? {
            0 => return Ok(Settings(map)),
            1 => {}
            tag => return Err(WireError::bad("settings tag", tag)),
        }
        if map.len() >= MAX_SETTINGS {
            return Err(WireError::TooLong {
                what: "settings preamble",
                len: map.len() as u64 + 1,
                max: MAX_SETTINGS as u64,
            });
        }
        let name = String::from_utf8(wire::read_bytes(r).await?)
            .map_err(|_| WireError::NotUtf8("a setting name"))?;
        let value = String::from_utf8_lossy(&wire::read_bytes(r).await?).into_owned();
        map.insert(name, value);
    }
}

/// A command from the parent where one is expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookRequest {
    /// `try`: the parent asks whether the hook will build a derivation.
    Try(TryRequest),
    /// The parent closed the pipe cleanly before a new command: the hook should exit 0.
    Exit,
}

/// `try`: "will you build this derivation?" (`DerivationGoal::tryBuildHook`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TryRequest {
    /// 1 iff the parent has a free local build slot (`getNrLocalBuilds() < max-jobs`); always
    /// false with `max-jobs = 0`.
    pub am_willing: bool,
    /// The derivation's `system` (e.g. `aarch64-linux`, or `builtin`).
    pub needed_system: String,
    /// The `.drv` in the parent's store; read as its full printed path and parsed once here.
    pub drv_path: StorePath,
    /// `requiredSystemFeatures` (plus `ca-derivations` for floating-CA derivations).
    pub required_features: BTreeSet<String>,
}

impl TryRequest {
    /// Encodes the request as the parent does (for tests and fake parents).
    pub fn write(&self, buf: &mut BytesMut) {
        wire::put_str(buf, "try");
        wire::put_bool(buf, self.am_willing);
        wire::put_str(buf, &self.needed_system);
        store_path::put_store_path(buf, &self.drv_path);
        wire::put_strings(buf, &self.required_features);
    }
}

/// Reads a full store path; an invalid one is [`WireError::BadValue`] naming `what` and the
/// whole path.
async fn read_path<R: AsyncRead + Unpin>(
    r: &mut R,
    what: &'static str,
) -> Result<StorePath, WireError> {
    let s = wire::read_string(r).await?;
    StorePath::from_absolute(&s).map_err(|e| WireError::bad(what, format!("'{s}' ({e})")))
}

/// Reads a u64, or `None` if the stream ends before its first byte.
async fn read_u64_or_eof<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<u64>, WireError> {
    let mut b = [0u8; 8];
    let mut got = 0;
    while got < b.len() {
        let n = r.read(&mut b[got..]).await.map_err(WireError::Io)?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(WireError::Truncated("a command"))
            };
        }
        got += n;
    }
    Ok(Some(u64::from_le_bytes(b)))
}

/// Reads the next command. EOF before its first byte is [`HookRequest::Exit`]; EOF anywhere
/// else is [`WireError::Truncated`]; a command other than `try` is [`WireError::BadValue`]
/// naming it.
pub async fn read_request<R: AsyncRead + Unpin>(r: &mut R) -> Result<HookRequest, WireError> {
    let Some(len) = read_u64_or_eof(r).await? else {
        return Ok(HookRequest::Exit);
    };
    if len > MAX_COMMAND_LEN {
        return Err(WireError::TooLong {
            what: "hook command",
            len,
            max: MAX_COMMAND_LEN,
        });
    }
    let mut cmd = vec![0u8; len as usize];
    r.read_exact(&mut cmd).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => WireError::Truncated("a command"),
        _ => WireError::Io(e),
    })?;
    wire::read_padding(r, len).await?;
    if cmd != b"try" {
        return Err(WireError::bad(
            "hook command",
            format!("{:?}", String::from_utf8_lossy(&cmd)),
        ));
    }
    let am_willing = wire::read_bool(r).await?;
    let needed_system = wire::read_string(r).await?;
    let drv_path = read_path(r, "derivation path").await?;
    let required_features = wire::read_string_set(r).await?;
    Ok(HookRequest::Try(TryRequest {
        am_willing,
        needed_system,
        drv_path,
        required_features,
    }))
}

/// The hook's answer to a `try`, written on stderr (fd 2; fd 1 is the same pipe).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `# accept\n<machine>\n`. The machine name is only displayed by the parent
    /// (`building '…' on '<machine>'`, field 1 of its `actBuild` activity).
    Accept {
        /// The machine name shown by the parent.
        machine: String,
    },
    /// `# decline\n`: the parent builds locally or fails; this hook gets the next `try`.
    Decline,
    /// `# decline-permanently\n`: no hook is asked again by this parent Worker; this hook is
    /// killed.
    DeclinePermanently,
    /// `# postpone\n`: the parent retries after `build-poll-interval` (5 s by default).
    Postpone,
}

/// Makes a machine name safe for the one line the parent reads after `# accept`: every
/// control character (`\n`, `\r`, …) becomes a space.
pub fn sanitize_machine_name(machine: &str) -> String {
    machine
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

impl Reply {
    /// The complete reply. For `Accept` both lines are in this one buffer: the parent reads the
    /// line right after `# accept` raw as the machine name, so nothing may come in between —
    /// write it with a single `write_all` and flush (see [`write_reply`]).
    pub fn to_bytes(&self) -> Vec<u8> {
        match self {
            Reply::Accept { machine } => {
                format!("# accept\n{}\n", sanitize_machine_name(machine)).into_bytes()
            }
            Reply::Decline => b"# decline\n".to_vec(),
            Reply::DeclinePermanently => b"# decline-permanently\n".to_vec(),
            Reply::Postpone => b"# postpone\n".to_vec(),
        }
    }
}

/// Writes a reply in one `write_all`, then flushes.
pub async fn write_reply<W: AsyncWrite + Unpin>(w: &mut W, reply: &Reply) -> std::io::Result<()> {
    w.write_all(&reply.to_bytes()).await?;
    w.flush().await
}

/// What the parent sends after `# accept`, just before closing the pipe.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AcceptedWork {
    /// The input closure to copy to the builder (without the `.drv` files), each path parsed
    /// once here.
    pub inputs: BTreeSet<StorePath>,
    /// Output *names* whose paths are not valid yet (all outputs under `--check`). The stock
    /// hook calls them `wantedOutputs`.
    pub wanted_outputs: BTreeSet<String>,
}

impl AcceptedWork {
    /// Encodes the data as the parent does (for tests and fake parents).
    pub fn write(&self, buf: &mut BytesMut) {
        store_path::put_store_path_set(buf, &self.inputs);
        wire::put_strings(buf, &self.wanted_outputs);
    }
}

/// Reads the post-accept data: a store path set, then a string set of output names.
pub async fn read_accepted<R: AsyncRead + Unpin>(r: &mut R) -> Result<AcceptedWork, WireError> {
    let n = wire::read_len(r, "input path set", wire::MAX_COLLECTION_LEN).await?;
    let mut inputs = BTreeSet::new();
    for _ in 0..n {
        inputs.insert(read_path(r, "input path").await?);
    }
    let wanted_outputs = wire::read_string_set(r).await?;
    Ok(AcceptedWork {
        inputs,
        wanted_outputs,
    })
}

/// The verbosity the parent passed: its **last** argument (2.8 passes `build-remote <v>`, 2.26+
/// `<program> [extra args from build-hook…] <v>`). Defaults to 3 (info) when absent or not a
/// number; clamped to 0..=7.
pub fn verbosity_from_args(args: &[String]) -> u8 {
    args.last()
        .and_then(|a| a.trim().parse::<i64>().ok())
        .map(|v| v.clamp(0, 7) as u8)
        .unwrap_or(3)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbosity_takes_last_argument() {
        let a =
            |v: &[&str]| verbosity_from_args(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(a(&[]), 3);
        assert_eq!(a(&["build-remote", "4"]), 4);
        assert_eq!(a(&["nix", "__build-remote", "0"]), 0);
        assert_eq!(a(&["hook", "99"]), 7);
        assert_eq!(a(&["hook", "-2"]), 0);
        assert_eq!(a(&["hook"]), 3);
        assert_eq!(a(&["hook", "x"]), 3);
    }

    #[tokio::test]
    async fn non_try_command_is_named() {
        let mut b = BytesMut::new();
        wire::put_str(&mut b, "exit");
        let err = read_request(&mut &b[..]).await.unwrap_err();
        assert!(err.to_string().contains("\"exit\""), "{err}");
    }

    #[test]
    fn accessors_follow_nix_renderings() {
        let s: Settings = [
            ("max-jobs", "auto"),
            ("timeout", "0"),
            ("build-timeout", "9"),
            ("max-silent-time", "30"),
            ("keep-failed", "yes"),
            ("system-features", "kvm  big-parallel\tkvm"),
        ]
        .into_iter()
        .collect();
        assert!(s.max_jobs().unwrap() >= 1);
        assert_eq!(s.timeout(), None);
        assert_eq!(s.max_silent_time(), Some(Duration::from_secs(30)));
        assert!(s.keep_failed());
        assert_eq!(s.system_features().len(), 2);
        assert_eq!(s.max_build_log_size(), None);
        let s: Settings = [("build-timeout", "9")].into_iter().collect();
        assert_eq!(s.timeout(), Some(Duration::from_secs(9)));
    }
}
