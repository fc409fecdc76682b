//! Values exchanged in worker-protocol requests and replies, with their version-dependent
//! encodings (serialisers in `2.26.3:src/libstore/worker-protocol.cc` and
//! `common-protocol.cc`; `2.8.0:src/libstore/path-info.cc`, `remote-store.cc`, `daemon.cc`;
//! the `realisation-with-path-not-hash` form from `2.35.2:src/libstore/worker-protocol.cc`).
//!
//! Decoders read from any [`AsyncRead`] and return [`WireError`] for anything malformed;
//! encoders append to a [`BytesMut`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use bytes::BytesMut;
use tokio::io::AsyncRead;

use crate::hash::Hash;
use crate::store_path::{StorePath, put_store_path, read_store_path};
use crate::wire::{self, MAX_COLLECTION_LEN, WireError};

use super::ProtocolVersion;
use super::codec::{
    Bool, Codec, Ctx, LaxBool, LossyStr, NarHash, OptMicros, OptPath, OptStr, Path, PathSet,
    RegistrationTime, SomeStr, StartTime, StopTime, StringMap, StringSet, TrustedFlag, U64,
    VerboseBuild, WireDecode, wire_struct,
};

/// How to build (`BuildMode` in `src/libstore/store-api.hh`); a u64 on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum BuildMode {
    /// Build what is missing (0).
    #[default]
    Normal,
    /// Rebuild and replace corrupted paths (1). Trusted clients only.
    Repair,
    /// Build again and compare with the existing outputs (2).
    Check,
}

impl BuildMode {
    /// The wire code.
    pub fn code(self) -> u64 {
        match self {
            BuildMode::Normal => 0,
            BuildMode::Repair => 1,
            BuildMode::Check => 2,
        }
    }

    /// The mode for a wire code.
    pub fn from_code(v: u64) -> Option<Self> {
        match v {
            0 => Some(BuildMode::Normal),
            1 => Some(BuildMode::Repair),
            2 => Some(BuildMode::Check),
            _ => None,
        }
    }

    /// Reads a build mode (a u64).
    pub async fn read<R: AsyncRead + Unpin + ?Sized>(r: &mut R) -> Result<Self, WireError> {
        let v = wire::read_u64(r).await?;
        BuildMode::from_code(v).ok_or_else(|| WireError::bad("build mode", v))
    }

    /// Writes the build mode (a u64).
    pub fn write(self, buf: &mut BytesMut) {
        wire::put_u64(buf, self.code());
    }
}

/// Reads the optional trusted flag: 0 = unknown, 1 = trusted, 2 = not trusted.
pub async fn read_trusted_flag<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
) -> Result<Option<bool>, WireError> {
    match wire::read_u64(r).await? {
        0 => Ok(None),
        1 => Ok(Some(true)),
        2 => Ok(Some(false)),
        v => Err(WireError::bad("trusted flag", v)),
    }
}

/// Writes the optional trusted flag (see [`read_trusted_flag`]).
pub fn put_trusted_flag(buf: &mut BytesMut, v: Option<bool>) {
    wire::put_u64(
        buf,
        match v {
            None => 0,
            Some(true) => 1,
            Some(false) => 2,
        },
    );
}

/// What the daemon sends after the version handshake (`ClientHandshakeInfo`): its Nix
/// version (≥1.33) and whether it trusts us (≥1.35).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientHandshakeInfo {
    /// The daemon's Nix version string (≥1.33).
    pub daemon_nix_version: Option<String>,
    /// Whether the daemon trusts the client (≥1.35; `None`: it did not say).
    pub trusted: Option<bool>,
}

wire_struct!(ClientHandshakeInfo {
    daemon_nix_version: SomeStr, [33..];
    trusted: TrustedFlag, [35..];
});

impl ClientHandshakeInfo {
    /// Reads what the daemon sends at `version`.
    pub async fn read<R: AsyncRead + Unpin + Send + ?Sized>(
        r: &mut R,
        version: ProtocolVersion,
    ) -> Result<Self, WireError> {
        Self::decode_in(r, Ctx::new(version)).await
    }

    /// Writes it as a daemon would at `version`.
    pub fn write(&self, buf: &mut BytesMut, version: ProtocolVersion) {
        self.encode_in(buf, Ctx::new(version))
    }
}

/// A store path's metadata (`ValidPathInfo`). On the wire the "unkeyed" part follows the
/// path: `deriver ("" = none), narHash (base16, no algorithm prefix), references,
/// registrationTime, narSize`, and from 1.16 on `ultimate, sigs, ca ("" = none)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidPathInfo {
    /// The store path described.
    pub path: StorePath,
    /// The derivation that produced it, if known.
    pub deriver: Option<StorePath>,
    /// SHA-256 of the NAR serialisation.
    pub nar_hash: Hash,
    /// The store paths it refers to (itself included, if it does).
    pub references: BTreeSet<StorePath>,
    /// Seconds since the epoch (`time_t`); 0 lets the receiving store pick the time.
    pub registration_time: i64,
    /// Length of the NAR serialisation in bytes.
    pub nar_size: u64,
    /// Built locally rather than substituted. Untrusted senders have it forced to false.
    pub ultimate: bool,
    /// `keyname:base64sig` strings.
    pub sigs: BTreeSet<String>,
    /// Rendered content address, e.g. `fixed:r:sha256:<nix32>` or `text:sha256:<nix32>`.
    pub ca: Option<String>,
}

impl ValidPathInfo {
    /// Info with no deriver, references, signatures or content address.
    pub fn new(path: StorePath, nar_hash: Hash, nar_size: u64) -> Self {
        ValidPathInfo {
            path,
            deriver: None,
            nar_hash,
            references: BTreeSet::new(),
            registration_time: 0,
            nar_size,
            ultimate: false,
            sigs: BTreeSet::new(),
            ca: None,
        }
    }

    /// Reads a keyed `ValidPathInfo`: the path, then the unkeyed info.
    pub async fn read<R: AsyncRead + Unpin + Send + ?Sized>(
        r: &mut R,
        version: ProtocolVersion,
    ) -> Result<Self, WireError> {
        Self::decode_in(r, Ctx::new(version)).await
    }

    /// Reads an `UnkeyedValidPathInfo` (as in the `QueryPathInfo` reply) for `path`.
    pub async fn read_unkeyed<R: AsyncRead + Unpin + Send + ?Sized>(
        r: &mut R,
        path: StorePath,
        version: ProtocolVersion,
    ) -> Result<Self, WireError> {
        Self::decode_unkeyed_in(r, path, Ctx::new(version)).await
    }

    /// Writes the keyed form (path, then unkeyed info).
    pub fn write(&self, buf: &mut BytesMut, version: ProtocolVersion) {
        self.encode_in(buf, Ctx::new(version))
    }

    /// Writes the unkeyed form (everything but the path).
    pub fn write_unkeyed(&self, buf: &mut BytesMut, version: ProtocolVersion) {
        self.encode_unkeyed_in(buf, Ctx::new(version))
    }
}

wire_struct!(ValidPathInfo keyed by path: Path {
    deriver: OptPath;
    nar_hash: NarHash;
    references: PathSet;
    registration_time: RegistrationTime;
    nar_size: U64;
    ultimate: Bool, [16..];
    sigs: StringSet, [16..];
    ca: OptStr, [16..];
});

/// `BuildResult::Status`; the wire codes are the same in 2.8, 2.26 and 2.35.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BuildStatus {
    /// 0: built.
    Built,
    /// 1: substituted.
    Substituted,
    /// 2: the outputs were valid already.
    AlreadyValid,
    /// 3: the build failed (not transiently).
    PermanentFailure,
    /// 4: an input was rejected.
    InputRejected,
    /// 5: an output was rejected (a hash mismatch, for instance).
    OutputRejected,
    /// 6: a failure that may be transient.
    TransientFailure,
    /// 7: no longer produced by Nix.
    CachedFailure,
    /// 8: the build timed out.
    TimedOut,
    /// 9: another failure.
    MiscFailure,
    /// 10: a dependency failed.
    DependencyFailed,
    /// 11: the build log exceeded its limit.
    LogLimitExceeded,
    /// 12: a repeated build gave different outputs.
    NotDeterministic,
    /// 13: the resolved derivation's outputs were valid already.
    ResolvesToAlreadyValid,
    /// 14: no substituter could provide a path.
    NoSubstituters,
}

impl BuildStatus {
    /// Every status, in code order.
    pub const ALL: [BuildStatus; 15] = [
        BuildStatus::Built,
        BuildStatus::Substituted,
        BuildStatus::AlreadyValid,
        BuildStatus::PermanentFailure,
        BuildStatus::InputRejected,
        BuildStatus::OutputRejected,
        BuildStatus::TransientFailure,
        BuildStatus::CachedFailure,
        BuildStatus::TimedOut,
        BuildStatus::MiscFailure,
        BuildStatus::DependencyFailed,
        BuildStatus::LogLimitExceeded,
        BuildStatus::NotDeterministic,
        BuildStatus::ResolvesToAlreadyValid,
        BuildStatus::NoSubstituters,
    ];

    /// The wire code.
    pub fn code(self) -> u64 {
        self as u64
    }

    /// The status for a wire code.
    pub fn from_code(v: u64) -> Option<Self> {
        usize::try_from(v)
            .ok()
            .and_then(|i| BuildStatus::ALL.get(i).copied())
    }

    /// Built, Substituted, AlreadyValid or ResolvesToAlreadyValid.
    pub fn is_success(self) -> bool {
        matches!(
            self,
            BuildStatus::Built
                | BuildStatus::Substituted
                | BuildStatus::AlreadyValid
                | BuildStatus::ResolvesToAlreadyValid
        )
    }

    /// The name Nix uses (e.g. in JSON): `Built`, `OutputRejected`, …
    pub fn name(self) -> &'static str {
        match self {
            BuildStatus::Built => "Built",
            BuildStatus::Substituted => "Substituted",
            BuildStatus::AlreadyValid => "AlreadyValid",
            BuildStatus::PermanentFailure => "PermanentFailure",
            BuildStatus::InputRejected => "InputRejected",
            BuildStatus::OutputRejected => "OutputRejected",
            BuildStatus::TransientFailure => "TransientFailure",
            BuildStatus::CachedFailure => "CachedFailure",
            BuildStatus::TimedOut => "TimedOut",
            BuildStatus::MiscFailure => "MiscFailure",
            BuildStatus::DependencyFailed => "DependencyFailed",
            BuildStatus::LogLimitExceeded => "LogLimitExceeded",
            BuildStatus::NotDeterministic => "NotDeterministic",
            BuildStatus::ResolvesToAlreadyValid => "ResolvesToAlreadyValid",
            BuildStatus::NoSubstituters => "NoSubstituters",
        }
    }

    /// The status Nix names `s`.
    pub fn from_name(s: &str) -> Option<Self> {
        BuildStatus::ALL.into_iter().find(|b| b.name() == s)
    }
}

impl fmt::Display for BuildStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One built output in a [`BuildResult`].
///
/// In the usual (≥1.28) form the daemon sends `map<DrvOutputId, Realisation JSON>`; then `id`
/// is the key (`sha256:<hex>!<output>`) and `json` the document exactly as received, which is
/// what gets re-encoded. With the 2.35 `realisation-with-path-not-hash` feature only the path
/// and signatures travel, and both are `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Realisation {
    /// The `DrvOutputId` key it came with, if any.
    pub id: Option<String>,
    /// The output's store path.
    pub out_path: StorePath,
    /// Signatures, `keyname:base64sig`.
    pub signatures: BTreeSet<String>,
    /// The JSON document as received, if it came as one.
    pub json: Option<String>,
}

impl Realisation {
    /// A realisation of `out_path` with no id, signatures or JSON.
    pub fn new(out_path: StorePath) -> Self {
        Realisation {
            id: None,
            out_path,
            signatures: BTreeSet::new(),
            json: None,
        }
    }

    /// Parses a Realisation JSON document (`Realisation::fromJSON`); only `outPath` is
    /// required, as 2.35 readers do. `signatures` may be strings or `{keyName, sig}` objects.
    /// Without an `id` argument the document's `id` is used, if any.
    pub fn from_json(id: Option<String>, json: &str) -> Result<Self, WireError> {
        let v: serde_json::Value =
            serde_json::from_str(json).map_err(|e| WireError::bad("realisation JSON", e))?;
        let id = id.or_else(|| v.get("id").and_then(|i| i.as_str()).map(str::to_string));
        let out = v
            .get("outPath")
            .and_then(|p| p.as_str())
            .ok_or_else(|| WireError::bad("realisation JSON", "no string 'outPath'"))?;
        let out_path = if out.starts_with('/') {
            StorePath::from_absolute(out)
        } else {
            StorePath::from_base_name(out)
        }
        .map_err(|e| WireError::bad("realisation outPath", e))?;
        let mut signatures = BTreeSet::new();
        if let Some(sigs) = v.get("signatures").and_then(|s| s.as_array()) {
            for s in sigs {
                if let Some(s) = s.as_str() {
                    signatures.insert(s.to_string());
                } else if let (Some(k), Some(sig)) = (
                    s.get("keyName").and_then(|k| k.as_str()),
                    s.get("sig").and_then(|k| k.as_str()),
                ) {
                    signatures.insert(format!("{k}:{sig}"));
                }
            }
        }
        Ok(Realisation {
            id,
            out_path,
            signatures,
            json: Some(json.to_string()),
        })
    }

    /// The JSON this realisation is sent as: `json` if present, else a document in the form
    /// Nix 2.8–2.26 write (`dependentRealisations`, `id`, `outPath`, `signatures`, compact,
    /// keys sorted).
    pub fn to_json(&self, id: &str) -> String {
        if let Some(j) = &self.json {
            return j.clone();
        }
        let mut m = serde_json::Map::new();
        m.insert(
            "dependentRealisations".into(),
            serde_json::Value::Object(serde_json::Map::new()),
        );
        m.insert("id".into(), serde_json::Value::String(id.to_string()));
        m.insert(
            "outPath".into(),
            serde_json::Value::String(self.out_path.base_name().to_string()),
        );
        m.insert(
            "signatures".into(),
            serde_json::Value::Array(
                self.signatures
                    .iter()
                    .map(|s| serde_json::Value::String(s.clone()))
                    .collect(),
            ),
        );
        serde_json::Value::Object(m).to_string()
    }
}

/// The output name of a `DrvOutputId` (`<hash>!<output>`).
fn output_of_id(id: &str) -> Result<&str, WireError> {
    match id.split_once('!') {
        Some((_, name)) if !name.is_empty() => Ok(name),
        _ => Err(WireError::bad("derivation output id", id)),
    }
}

/// The result of building one derivation (`BuildResult`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildResult {
    /// How the build ended.
    pub status: BuildStatus,
    /// The error message of a failed build (empty otherwise).
    pub error_msg: String,
    /// ≥1.29.
    pub times_built: u64,
    /// ≥1.29.
    pub is_non_deterministic: bool,
    /// ≥1.29, seconds since the epoch.
    pub start_time: i64,
    /// ≥1.29.
    pub stop_time: i64,
    /// ≥1.37, microseconds.
    pub cpu_user: Option<i64>,
    /// ≥1.37, microseconds.
    pub cpu_system: Option<i64>,
    /// ≥1.28, by output name.
    pub built_outputs: BTreeMap<String, Realisation>,
}

impl BuildResult {
    /// A result with `status` and everything else empty or zero.
    pub fn new(status: BuildStatus) -> Self {
        BuildResult {
            status,
            error_msg: String::new(),
            times_built: 0,
            is_non_deterministic: false,
            start_time: 0,
            stop_time: 0,
            cpu_user: None,
            cpu_system: None,
            built_outputs: BTreeMap::new(),
        }
    }

    /// Whether the status is a success ([`BuildStatus::is_success`]).
    pub fn is_success(&self) -> bool {
        self.status.is_success()
    }

    /// Decodes the form used without the `realisation-with-path-not-hash` feature (all
    /// daemons nixdock negotiates with).
    pub async fn read<R: AsyncRead + Unpin + Send + ?Sized>(
        r: &mut R,
        version: ProtocolVersion,
    ) -> Result<Self, WireError> {
        Self::read_with(r, version, false).await
    }

    /// Decodes; `path_not_hash` says the 2.35 feature `realisation-with-path-not-hash` was
    /// negotiated, which changes `builtOutputs` to `map<output name, (path, signatures)>`.
    pub async fn read_with<R: AsyncRead + Unpin + Send + ?Sized>(
        r: &mut R,
        version: ProtocolVersion,
        path_not_hash: bool,
    ) -> Result<Self, WireError> {
        Self::decode_in(
            r,
            Ctx {
                version,
                path_not_hash,
            },
        )
        .await
    }

    /// Encodes the form without the `realisation-with-path-not-hash` feature.
    pub fn write(&self, buf: &mut BytesMut, version: ProtocolVersion) {
        self.write_with(buf, version, false)
    }

    /// Encodes; see [`read_with`](Self::read_with). In the JSON form an output without an `id`
    /// gets 2.35's dummy `sha256:000…0!<name>`.
    pub fn write_with(&self, buf: &mut BytesMut, version: ProtocolVersion, path_not_hash: bool) {
        self.encode_in(
            buf,
            Ctx {
                version,
                path_not_hash,
            },
        )
    }
}

wire_struct!(BuildResult {
    status: Status;
    error_msg: LossyStr;
    times_built: U64, [29..];
    is_non_deterministic: Bool, [29..];
    start_time: StartTime, [29..];
    stop_time: StopTime, [29..];
    cpu_user: OptMicros, [37..];
    cpu_system: OptMicros, [37..];
    built_outputs: BuiltOutputs;
});

/// [`BuildStatus`] as its u64 code.
struct Status;

impl Codec for Status {
    type Value = BuildStatus;

    fn put(v: &BuildStatus, buf: &mut BytesMut, _: Ctx) {
        wire::put_u64(buf, v.code());
    }

    async fn get<R: AsyncRead + Unpin + Send + ?Sized>(
        r: &mut R,
        _: Ctx,
    ) -> Result<BuildStatus, WireError> {
        let code = wire::read_u64(r).await?;
        BuildStatus::from_code(code).ok_or_else(|| WireError::bad("build status", code))
    }
}

/// `BuildResult::builtOutputs`: with the `realisation-with-path-not-hash` feature
/// `map<output name, (path, signatures)>` (the feature needs 1.38); otherwise from 1.28 on
/// `map<DrvOutputId, Realisation JSON>`, and nothing before.
struct BuiltOutputs;

impl Codec for BuiltOutputs {
    type Value = BTreeMap<String, Realisation>;

    fn put(v: &Self::Value, buf: &mut BytesMut, ctx: Ctx) {
        if ctx.path_not_hash {
            wire::put_u64(buf, v.len() as u64);
            for (name, real) in v {
                wire::put_str(buf, name);
                put_store_path(buf, &real.out_path);
                wire::put_strings(buf, &real.signatures);
            }
        } else if ctx.version.minor() >= 28 {
            // Nix keys this map by DrvOutput, i.e. sorted by id.
            let mut entries: Vec<(String, String)> = v
                .iter()
                .map(|(name, real)| {
                    let id = real
                        .id
                        .clone()
                        .unwrap_or_else(|| format!("sha256:{}!{name}", "0".repeat(64)));
                    let json = real.to_json(&id);
                    (id, json)
                })
                .collect();
            entries.sort();
            wire::put_u64(buf, entries.len() as u64);
            for (id, json) in &entries {
                wire::put_str(buf, id);
                wire::put_str(buf, json);
            }
        }
    }

    async fn get<R: AsyncRead + Unpin + Send + ?Sized>(
        r: &mut R,
        ctx: Ctx,
    ) -> Result<Self::Value, WireError> {
        let mut out = BTreeMap::new();
        if ctx.path_not_hash {
            let n = wire::read_len(r, "built outputs", MAX_COLLECTION_LEN).await?;
            for _ in 0..n {
                let name = wire::read_string(r).await?;
                let out_path = read_store_path(r).await?;
                let signatures = wire::read_string_set(r).await?;
                out.insert(
                    name,
                    Realisation {
                        id: None,
                        out_path,
                        signatures,
                        json: None,
                    },
                );
            }
        } else if ctx.version.minor() >= 28 {
            let n = wire::read_len(r, "built outputs", MAX_COLLECTION_LEN).await?;
            for _ in 0..n {
                let id = wire::read_string(r).await?;
                let json = wire::read_string(r).await?;
                let name = output_of_id(&id)?.to_string();
                let real = Realisation::from_json(Some(id), &json)?;
                out.insert(name, real);
            }
        }
        Ok(out)
    }
}

/// Which outputs of a derivation are wanted.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OutputsSpec {
    /// Every output (`*`).
    All,
    /// Non-empty.
    Names(BTreeSet<String>),
}

/// Something to build or fetch: a plain store path, or outputs of a derivation.
///
/// Wire form (a string): from 1.30 `path`, `drv!out1,out2` or `drv!*`; before 1.30 (the old
/// `StorePathWithOutputs`) a bare `.drv` means all outputs and a plain `.drv` file cannot be
/// requested. Dynamic derivations (`a.drv!out!x`) are not supported.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DerivedPath {
    /// A store path as it is.
    Opaque(StorePath),
    /// Outputs of a derivation.
    Built {
        /// The `.drv`.
        drv_path: StorePath,
        /// Which of its outputs.
        outputs: OutputsSpec,
    },
}

impl DerivedPath {
    /// The wire string at `version`; fails for what older protocols cannot express.
    pub fn to_wire_string(&self, version: ProtocolVersion) -> Result<String, WireError> {
        match self {
            DerivedPath::Opaque(p) => {
                if version.minor() < 30 && p.is_derivation() {
                    return Err(WireError::bad(
                        "derived path",
                        format!(
                            "'{p}' is a derivation file, which protocol {version} (< 1.30) \
                             cannot request"
                        ),
                    ));
                }
                Ok(p.to_absolute())
            }
            DerivedPath::Built { drv_path, outputs } => match outputs {
                OutputsSpec::All if version.minor() >= 30 => Ok(format!("{drv_path}!*")),
                OutputsSpec::All => Ok(drv_path.to_absolute()),
                OutputsSpec::Names(names) => {
                    if names.is_empty() {
                        return Err(WireError::bad("derived path", "empty output set"));
                    }
                    let v: Vec<&str> = names.iter().map(String::as_str).collect();
                    Ok(format!("{drv_path}!{}", v.join(",")))
                }
            },
        }
    }

    /// Parses the wire string at `version`.
    pub(crate) fn parse_wire(s: &str, version: ProtocolVersion) -> Result<Self, WireError> {
        let bad = |why: &str| WireError::bad("derived path", format!("{s:?}: {why}"));
        let path_of = |p: &str| StorePath::from_absolute(p).map_err(|e| bad(&e.to_string()));
        match s.split_once('!') {
            None => {
                let p = path_of(s)?;
                if version.minor() < 30 && p.is_derivation() {
                    Ok(DerivedPath::Built {
                        drv_path: p,
                        outputs: OutputsSpec::All,
                    })
                } else {
                    Ok(DerivedPath::Opaque(p))
                }
            }
            Some((drv, outs)) => {
                if outs.contains('!') {
                    return Err(bad("dynamic derivations are not supported"));
                }
                let drv_path = path_of(drv)?;
                let outputs = if outs == "*" && version.minor() >= 30 {
                    OutputsSpec::All
                } else {
                    let names: BTreeSet<String> = outs
                        .split(',')
                        .filter(|n| !n.is_empty())
                        .map(str::to_string)
                        .collect();
                    if names.is_empty() {
                        return Err(bad("no output names"));
                    }
                    OutputsSpec::Names(names)
                };
                Ok(DerivedPath::Built { drv_path, outputs })
            }
        }
    }

    /// Reads the wire string at `version`.
    pub async fn read<R: AsyncRead + Unpin + ?Sized>(
        r: &mut R,
        version: ProtocolVersion,
    ) -> Result<Self, WireError> {
        let s = wire::read_string(r).await?;
        Self::parse_wire(&s, version)
    }

    /// Writes the wire string at `version`; fails for what it cannot express.
    pub fn write(&self, buf: &mut BytesMut, version: ProtocolVersion) -> Result<(), WireError> {
        wire::put_str(buf, &self.to_wire_string(version)?);
        Ok(())
    }
}

impl fmt::Display for DerivedPath {
    /// The ≥1.30 form.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.to_wire_string(ProtocolVersion::LATEST) {
            Ok(s) => f.write_str(&s),
            Err(_) => write!(f, "{self:?}"),
        }
    }
}

/// A [`BuildResult`] with the [`DerivedPath`] it is for (`BuildPathsWithResults` replies).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyedBuildResult {
    /// What was built.
    pub path: DerivedPath,
    /// How it went.
    pub result: BuildResult,
}

impl KeyedBuildResult {
    /// Reads the path and its result, without the `realisation-with-path-not-hash` feature.
    pub async fn read<R: AsyncRead + Unpin + Send + ?Sized>(
        r: &mut R,
        version: ProtocolVersion,
    ) -> Result<Self, WireError> {
        Self::read_with(r, version, false).await
    }

    /// Reads the path and its result; see [`BuildResult::read_with`].
    pub async fn read_with<R: AsyncRead + Unpin + Send + ?Sized>(
        r: &mut R,
        version: ProtocolVersion,
        path_not_hash: bool,
    ) -> Result<Self, WireError> {
        let path = DerivedPath::read(r, version).await?;
        let result = BuildResult::read_with(r, version, path_not_hash).await?;
        Ok(KeyedBuildResult { path, result })
    }

    /// Writes the path and its result, without the `realisation-with-path-not-hash` feature.
    pub fn write(&self, buf: &mut BytesMut, version: ProtocolVersion) -> Result<(), WireError> {
        self.write_with(buf, version, false)
    }

    /// Writes the path and its result; see [`BuildResult::write_with`].
    pub fn write_with(
        &self,
        buf: &mut BytesMut,
        version: ProtocolVersion,
        path_not_hash: bool,
    ) -> Result<(), WireError> {
        self.path.write(buf, version)?;
        self.result.write_with(buf, version, path_not_hash);
        Ok(())
    }
}

/// The `SetOptions` request (`ClientSettings` in `daemon.cc`). `Default` is what a stock Nix
/// client sends with default settings and no overrides.
///
/// What an untrusted client may override is limited by the daemon (2.26: `build-timeout`,
/// `max-silent-time`, `build-poll-interval`, `connect-timeout`, `builders=""`, trusted
/// substituters); other overrides are ignored with a warning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientSettings {
    /// `keep-failed`.
    pub keep_failed: bool,
    /// `keep-going`.
    pub keep_going: bool,
    /// `fallback`.
    pub try_fallback: bool,
    /// `Verbosity`: 0 error, 1 warn, 2 notice, 3 info, 4 talkative, 5 chatty, 6 debug,
    /// 7 vomit. The daemon drops log messages above it.
    pub verbosity: u64,
    /// `max-jobs`.
    pub max_build_jobs: u64,
    /// `max-silent-time`, seconds (0: none).
    pub max_silent_time: u64,
    /// Sent as `lvlError` (0) when true, `lvlVomit` (7) when false.
    pub verbose_build: bool,
    /// `cores`.
    pub build_cores: u64,
    /// `substitute`.
    pub use_substitutes: bool,
    /// Setting name → value (≥1.12).
    pub overrides: BTreeMap<String, String>,
}

impl Default for ClientSettings {
    fn default() -> Self {
        ClientSettings {
            keep_failed: false,
            keep_going: false,
            try_fallback: false,
            verbosity: 3,
            max_build_jobs: 1,
            max_silent_time: 0,
            verbose_build: true,
            build_cores: 0,
            use_substitutes: true,
            overrides: BTreeMap::new(),
        }
    }
}

wire_struct!(ClientSettings {
    keep_failed: LaxBool;
    keep_going: LaxBool;
    try_fallback: LaxBool;
    verbosity: U64;
    max_build_jobs: U64;
    max_silent_time: U64;
    _: U64 = 1; // obsolete useBuildHook
    verbose_build: VerboseBuild;
    _: U64 = 0; // obsolete logType
    _: U64 = 0; // obsolete printBuildTrace
    build_cores: U64;
    use_substitutes: LaxBool;
    overrides: StringMap, [12..];
});

impl ClientSettings {
    /// Writes the request body (after the opcode).
    pub fn write(&self, buf: &mut BytesMut, version: ProtocolVersion) {
        self.encode_in(buf, Ctx::new(version))
    }

    /// Reads the request body, as the daemon does.
    pub async fn read<R: AsyncRead + Unpin + Send + ?Sized>(
        r: &mut R,
        version: ProtocolVersion,
    ) -> Result<Self, WireError> {
        Self::decode_in(r, Ctx::new(version)).await
    }
}

/// The `QueryMissing` reply.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Missing {
    /// Derivations that would be built.
    pub will_build: BTreeSet<StorePath>,
    /// Paths that would be substituted.
    pub will_substitute: BTreeSet<StorePath>,
    /// Paths whose fate is unknown.
    pub unknown: BTreeSet<StorePath>,
    /// Bytes to download for the substitutions.
    pub download_size: u64,
    /// Unpacked size of the substitutions, in NAR bytes.
    pub nar_size: u64,
}

wire_struct!(Missing {
    will_build: PathSet;
    will_substitute: PathSet;
    unknown: PathSet;
    download_size: U64;
    nar_size: U64;
});

impl Missing {
    /// Reads the reply (the same in every version).
    pub async fn read<R: AsyncRead + Unpin + Send + ?Sized>(r: &mut R) -> Result<Self, WireError> {
        Self::decode_in(r, Ctx::new(ProtocolVersion::LATEST)).await
    }

    /// Writes the reply as a daemon would.
    pub fn write(&self, buf: &mut BytesMut) {
        self.encode_in(buf, Ctx::new(ProtocolVersion::LATEST))
    }
}

impl WireDecode for DerivedPath {
    async fn decode<R: AsyncRead + Unpin + Send + ?Sized>(
        r: &mut R,
        version: ProtocolVersion,
    ) -> Result<Self, WireError> {
        Self::read(r, version).await
    }
}

impl WireDecode for KeyedBuildResult {
    async fn decode<R: AsyncRead + Unpin + Send + ?Sized>(
        r: &mut R,
        version: ProtocolVersion,
    ) -> Result<Self, WireError> {
        Self::read(r, version).await
    }
}
