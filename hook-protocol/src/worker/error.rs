//! Errors of the worker-protocol client.

use std::fmt;
use std::io;

use crate::wire::WireError;

use super::ProtocolVersion;

/// Which operation (and which store path, if any) an error happened in. Displayed as a prefix
/// such as `QueryPathInfo /nix/store/…-foo: `, or nothing when unknown.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpContext {
    /// The operation's name (`QueryPathInfo`, `handshake`, …).
    pub op: Option<&'static str>,
    /// The store path it was about, if any.
    pub path: Option<String>,
}

impl OpContext {
    /// The context of operation `op` on `path`.
    pub fn new(op: &'static str, path: Option<String>) -> Self {
        OpContext { op: Some(op), path }
    }
}

impl fmt::Display for OpContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.op, &self.path) {
            (Some(op), Some(p)) => write!(f, "{op} {p}: "),
            (Some(op), None) => write!(f, "{op}: "),
            (None, Some(p)) => write!(f, "{p}: "),
            (None, None) => Ok(()),
        }
    }
}

/// An error talking to a Nix daemon over the worker protocol.
///
/// Every variant carries an [`OpContext`] naming the operation and path. After
/// [`Remote`](Self::Remote) the connection stays usable; after
/// [`Local`](Self::Local) it does whenever the daemon could be resynchronised (see
/// [`WorkerClient::is_broken`](super::WorkerClient::is_broken)); after anything else it is
/// marked broken and every later call fails with [`Broken`](Self::Broken).
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The daemon answered with `STDERR_ERROR`.
    #[error("{ctx}the Nix daemon reported: {message}{}", fmt_traces(.traces))]
    Remote {
        /// The operation and path it happened in.
        ctx: OpContext,
        /// The error text, possibly with ANSI escapes and several lines.
        message: String,
        /// Only in the pre-1.26 form.
        exit_status: Option<u64>,
        /// Only in the ≥1.26 form (verbosity of the error, normally 0).
        level: Option<u64>,
        /// Trace lines (≥1.26), outermost last, as Nix sends them.
        traces: Vec<String>,
    },
    /// The daemon closed the connection (EOF, broken pipe or reset) — typically it crashed,
    /// was killed, or rejected the connection and exited.
    #[error("{ctx}connection closed by the Nix daemon ({detail})")]
    ConnectionClosed {
        /// The operation and path it happened in.
        ctx: OpContext,
        /// The I/O error's text.
        detail: String,
    },
    /// A value from the daemon could not be decoded.
    #[error("{ctx}bad data from the Nix daemon: {source}")]
    Wire {
        /// The operation and path it happened in.
        ctx: OpContext,
        /// The decoding error.
        #[source]
        source: WireError,
    },
    /// An I/O error on the connection other than it being closed.
    #[error("{ctx}I/O error on the daemon connection: {source}")]
    Io {
        /// The operation and path it happened in.
        ctx: OpContext,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The daemon did something the protocol does not allow here (unknown stderr tag,
    /// unexpected `STDERR_READ`, …).
    #[error("{ctx}protocol error: {message}")]
    Protocol {
        /// The operation and path it happened in.
        ctx: OpContext,
        /// What the daemon did.
        message: String,
    },
    /// The daemon (or the requested client version) speaks a protocol version outside
    /// 1.21..=1.38.
    #[error("{ctx}unsupported worker protocol version {version} (supported: {min}..={max})")]
    UnsupportedVersion {
        /// The operation and path it happened in.
        ctx: OpContext,
        /// The version offered, as text.
        version: String,
        /// The oldest supported version.
        min: ProtocolVersion,
        /// The newest supported version.
        max: ProtocolVersion,
    },
    /// The operation needs a newer negotiated protocol version.
    #[error("{ctx}needs worker protocol {needed}, but {negotiated} was negotiated")]
    TooOld {
        /// The operation and path it happened in.
        ctx: OpContext,
        /// The version the operation needs.
        needed: ProtocolVersion,
        /// The version in use.
        negotiated: ProtocolVersion,
    },
    /// A caller-supplied source or sink (the NAR to upload, the writer a NAR is streamed
    /// into) failed, or supplied inconsistent data.
    #[error("{ctx}{message}: {source}")]
    Local {
        /// The operation and path it happened in.
        ctx: OpContext,
        /// What was being done.
        message: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// An argument cannot be expressed on the wire at the negotiated version.
    #[error("{ctx}{message}")]
    InvalidArgument {
        /// The operation and path it happened in.
        ctx: OpContext,
        /// Which argument, and why.
        message: String,
    },
    /// An earlier error left the connection in an unknown state.
    #[error("{ctx}the daemon connection is unusable after an earlier error")]
    Broken {
        /// The operation and path it happened in.
        ctx: OpContext,
    },
}

fn fmt_traces(traces: &[String]) -> String {
    let mut s = String::new();
    for t in traces {
        s.push_str("\n  … ");
        s.push_str(t);
    }
    s
}

impl WorkerError {
    /// The operation and path the error happened in.
    pub fn ctx(&self) -> &OpContext {
        match self {
            WorkerError::Remote { ctx, .. }
            | WorkerError::ConnectionClosed { ctx, .. }
            | WorkerError::Wire { ctx, .. }
            | WorkerError::Io { ctx, .. }
            | WorkerError::Protocol { ctx, .. }
            | WorkerError::UnsupportedVersion { ctx, .. }
            | WorkerError::TooOld { ctx, .. }
            | WorkerError::Local { ctx, .. }
            | WorkerError::InvalidArgument { ctx, .. }
            | WorkerError::Broken { ctx } => ctx,
        }
    }

    fn ctx_mut(&mut self) -> &mut OpContext {
        match self {
            WorkerError::Remote { ctx, .. }
            | WorkerError::ConnectionClosed { ctx, .. }
            | WorkerError::Wire { ctx, .. }
            | WorkerError::Io { ctx, .. }
            | WorkerError::Protocol { ctx, .. }
            | WorkerError::UnsupportedVersion { ctx, .. }
            | WorkerError::TooOld { ctx, .. }
            | WorkerError::Local { ctx, .. }
            | WorkerError::InvalidArgument { ctx, .. }
            | WorkerError::Broken { ctx } => ctx,
        }
    }

    /// Fills in the operation and path where not already set.
    pub(crate) fn with_context(mut self, op: &'static str, path: Option<&str>) -> Self {
        let ctx = self.ctx_mut();
        if ctx.op.is_none() {
            ctx.op = Some(op);
        }
        if ctx.path.is_none() {
            ctx.path = path.map(str::to_string);
        }
        self
    }

    /// True for `STDERR_ERROR` from the daemon.
    pub fn is_remote(&self) -> bool {
        matches!(self, WorkerError::Remote { .. })
    }

    /// True if the daemon closed the connection.
    pub fn is_connection_closed(&self) -> bool {
        matches!(self, WorkerError::ConnectionClosed { .. })
    }

    /// The daemon's message for [`Remote`](Self::Remote) errors.
    pub fn remote_message(&self) -> Option<&str> {
        match self {
            WorkerError::Remote { message, .. } => Some(message),
            _ => None,
        }
    }

    pub(crate) fn protocol(message: impl Into<String>) -> Self {
        WorkerError::Protocol {
            ctx: OpContext::default(),
            message: message.into(),
        }
    }

    pub(crate) fn local(message: impl Into<String>, source: io::Error) -> Self {
        WorkerError::Local {
            ctx: OpContext::default(),
            message: message.into(),
            source,
        }
    }

    pub(crate) fn invalid_argument(message: impl Into<String>) -> Self {
        WorkerError::InvalidArgument {
            ctx: OpContext::default(),
            message: message.into(),
        }
    }

    /// Classifies an I/O error on the daemon connection.
    pub(crate) fn conn_io(e: io::Error) -> Self {
        if is_closed_kind(e.kind()) {
            WorkerError::ConnectionClosed {
                ctx: OpContext::default(),
                detail: e.to_string(),
            }
        } else {
            WorkerError::Io {
                ctx: OpContext::default(),
                source: e,
            }
        }
    }

    /// Whether the connection must be considered out of sync after this error. `Local` errors
    /// are judged case by case where they happen.
    pub(crate) fn breaks_connection(&self) -> bool {
        !matches!(
            self,
            WorkerError::Remote { .. }
                | WorkerError::TooOld { .. }
                | WorkerError::InvalidArgument { .. }
                | WorkerError::Local { .. }
                | WorkerError::Broken { .. }
        )
    }
}

pub(crate) fn is_closed_kind(kind: io::ErrorKind) -> bool {
    matches!(
        kind,
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::NotConnected
    )
}

impl From<WireError> for WorkerError {
    fn from(e: WireError) -> Self {
        match e {
            WireError::Truncated(what) => WorkerError::ConnectionClosed {
                ctx: OpContext::default(),
                detail: format!("the stream ended in the middle of {what}"),
            },
            WireError::Io(e) => WorkerError::conn_io(e),
            other => WorkerError::Wire {
                ctx: OpContext::default(),
                source: other,
            },
        }
    }
}
