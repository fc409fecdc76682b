//! Client side of Nix's daemon worker protocol (`unix://` sockets, `nix-daemon --stdio`,
//! `ssh-ng://`), protocol versions 1.21 to 1.38.
//!
//! Sources (read, not copied): `2.8.0:src/libstore/{remote-store,daemon,path-info}.cc`,
//! `2.26.3:src/libstore/{worker-protocol,worker-protocol-connection,remote-store,daemon}.cc`,
//! `2.35.2:src/libstore/worker-protocol.cc`, `src/libutil/serialise.{hh,cc}`.
//!
//! [`WorkerClient`] runs over any pair of byte streams (a unix socket's halves, a child's
//! stdout/stdin, an SSH channel) and gates every encoding on the negotiated version, which is
//! the minimum of ours (1.38) and the daemon's. While an operation runs, the daemon's log
//! messages and activity events are handed to the caller as [`LogEvent`]s; `STDERR_ERROR`
//! becomes [`WorkerErrorKind::Remote`].

mod client;
mod codec;
mod error;
mod stderr;
mod types;

use std::fmt;

pub use crate::log::{ActivityType, Code, Field, ResultType, Verbosity};
pub use client::{NarSource, WorkerClient};
pub use codec::{WireDecode, WireEncode};
pub use error::{OpContext, Violation, WorkerError, WorkerErrorKind};
pub use stderr::{
    LogEvent, STDERR_ERROR, STDERR_LAST, STDERR_NEXT, STDERR_READ, STDERR_RESULT,
    STDERR_START_ACTIVITY, STDERR_STOP_ACTIVITY, STDERR_WRITE, discard_logs,
};
pub use types::{
    BuildMode, BuildResult, BuildStatus, ClientHandshakeInfo, ClientSettings, DerivedPath,
    KeyedBuildResult, Missing, OutputsSpec, Realisation, ValidPathInfo, put_trusted_flag,
    read_trusted_flag,
};

/// First word of the handshake, client → daemon ("cxin").
pub const WORKER_MAGIC_1: u64 = 0x6e69_7863;
/// Daemon's reply ("oixd").
pub const WORKER_MAGIC_2: u64 = 0x6478_696f;

/// The 2.35 feature that changes how `BuildResult::builtOutputs` is encoded. nixdock never
/// offers it, so daemons never use it with us.
pub(crate) const FEATURE_REALISATION_WITH_PATH_NOT_HASH: &str = "realisation-with-path-not-hash";

/// A worker protocol version, `major.minor`, sent as the u64 `major << 8 | minor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProtocolVersion {
    major: u8,
    minor: u8,
}

impl ProtocolVersion {
    /// What nixdock offers: 1.38 (Nix 2.26 and 2.35).
    pub const LATEST: ProtocolVersion = ProtocolVersion::new(1, 38);
    /// The oldest daemon nixdock talks to (1.21: `AddToStoreNar` via `STDERR_READ`).
    pub const MIN: ProtocolVersion = ProtocolVersion::new(1, 21);

    /// The version `major.minor`.
    pub const fn new(major: u8, minor: u8) -> Self {
        ProtocolVersion { major, minor }
    }

    /// The major version (1 for every daemon this crate talks to).
    pub const fn major(self) -> u8 {
        self.major
    }

    /// The minor version.
    pub const fn minor(self) -> u8 {
        self.minor
    }

    /// The u64 sent on the wire: `major << 8 | minor`.
    pub const fn to_wire(self) -> u64 {
        ((self.major as u64) << 8) | self.minor as u64
    }

    /// Splits a wire value; `None` if it has bits above the major byte.
    pub const fn from_wire(v: u64) -> Option<Self> {
        if v > 0xffff {
            None
        } else {
            Some(ProtocolVersion::new((v >> 8) as u8, (v & 0xff) as u8))
        }
    }
}

impl fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// Worker protocol opcodes (`WorkerProto::Op`) this client sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u64)]
pub(crate) enum Op {
    IsValidPath = 1,
    BuildPaths = 9,
    AddTempRoot = 11,
    SetOptions = 19,
    QueryPathInfo = 26,
    QueryValidPaths = 31,
    BuildDerivation = 36,
    NarFromPath = 38,
    AddToStoreNar = 39,
    QueryMissing = 40,
    AddMultipleToStore = 44,
    BuildPathsWithResults = 46,
}

impl Op {
    pub fn code(self) -> u64 {
        self as u64
    }

    /// The oldest protocol version that has the operation.
    pub fn since(self) -> ProtocolVersion {
        match self {
            Op::AddMultipleToStore => ProtocolVersion::new(1, 32),
            Op::BuildPathsWithResults => ProtocolVersion::new(1, 34),
            _ => ProtocolVersion::MIN,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Op::IsValidPath => "IsValidPath",
            Op::BuildPaths => "BuildPaths",
            Op::AddTempRoot => "AddTempRoot",
            Op::SetOptions => "SetOptions",
            Op::QueryPathInfo => "QueryPathInfo",
            Op::QueryValidPaths => "QueryValidPaths",
            Op::BuildDerivation => "BuildDerivation",
            Op::NarFromPath => "NarFromPath",
            Op::AddToStoreNar => "AddToStoreNar",
            Op::QueryMissing => "QueryMissing",
            Op::AddMultipleToStore => "AddMultipleToStore",
            Op::BuildPathsWithResults => "BuildPathsWithResults",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
