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

/// An error talking to a Nix daemon over the worker protocol: what went wrong
/// ([`kind`](Self::kind)) and in which operation, on which path ([`ctx`](Self::ctx)).
///
/// Displayed as the context followed by the kind, e.g. `QueryPathInfo /nix/store/…-foo:
/// connection closed by the Nix daemon (…)`. After [`WorkerErrorKind::Remote`] the
/// connection stays usable; after [`WorkerErrorKind::Local`] it does whenever the daemon
/// could be resynchronised (see [`WorkerClient::is_broken`](super::WorkerClient::is_broken));
/// after anything else it is marked broken and every later call fails with
/// [`WorkerErrorKind::Broken`].
#[derive(Debug)]
pub struct WorkerError {
    ctx: OpContext,
    kind: WorkerErrorKind,
}

/// What the daemon did that the protocol does not allow.
#[derive(Debug, thiserror::Error)]
pub enum Violation {
    /// A log field of a type Nix does not define.
    #[error("got unsupported field type {0:#x} from the Nix daemon")]
    FieldType(u64),
    /// `STDERR_ERROR` whose type string is not `Error`.
    #[error("STDERR_ERROR of type {0:?}, expected \"Error\"")]
    ErrorType(String),
    /// `STDERR_ERROR` (or one of its traces) with a position, which Nix never sends.
    #[error("{what} with position tag {tag}, expected 0")]
    Position {
        /// `STDERR_ERROR` or `error trace`.
        what: &'static str,
        /// The tag sent.
        tag: u64,
    },
    /// `STDERR_READ` for an operation that sends no data.
    #[error("the Nix daemon sent STDERR_READ, but this operation has no data to send")]
    UnexpectedRead,
    /// `STDERR_WRITE`, which no supported operation expects.
    #[error("the Nix daemon sent STDERR_WRITE, which no supported operation expects")]
    UnexpectedWrite,
    /// A stderr message type Nix does not define.
    #[error("got unknown message type {0:#x} from the Nix daemon")]
    MessageType(u64),
    /// The handshake's magic number is not the daemon's.
    #[error("protocol mismatch: expected daemon magic {expected:#x}, got {got:#x}")]
    Magic {
        /// What a daemon sends.
        expected: u64,
        /// What was received.
        got: u64,
    },
    /// A NAR was expected and something else began.
    #[error("expected a NAR from the daemon, got {0:02x?}")]
    NotANar([u8; 24]),
    /// The operation ended while its upload was still going.
    #[error("the daemon finished the operation before the upload was complete")]
    EarlyFinish,
    /// The NAR the daemon sent is malformed.
    #[error("the daemon sent a bad NAR: {0}")]
    BadNar(#[source] Box<crate::nar::NarError>),
}

/// What went wrong in a [`WorkerError`].
#[derive(Debug, thiserror::Error)]
pub enum WorkerErrorKind {
    /// The daemon answered with `STDERR_ERROR`.
    #[error("the Nix daemon reported: {message}{}", fmt_traces(.traces))]
    Remote {
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
    #[error("connection closed by the Nix daemon ({detail})")]
    ConnectionClosed {
        /// The I/O error's text.
        detail: String,
    },
    /// A value from the daemon could not be decoded.
    #[error("bad data from the Nix daemon: {0}")]
    Wire(#[source] WireError),
    /// An I/O error on the connection other than it being closed.
    #[error("I/O error on the daemon connection: {0}")]
    Io(#[source] io::Error),
    /// The daemon did something the protocol does not allow here (unknown stderr tag,
    /// unexpected `STDERR_READ`, …).
    #[error("protocol error: {0}")]
    Protocol(Violation),
    /// The daemon (or the requested client version) speaks a protocol version outside
    /// 1.21..=1.38.
    #[error("unsupported worker protocol version {version} (supported: {min}..={max})")]
    UnsupportedVersion {
        /// The version offered, as text.
        version: String,
        /// The oldest supported version.
        min: ProtocolVersion,
        /// The newest supported version.
        max: ProtocolVersion,
    },
    /// The operation needs a newer negotiated protocol version.
    #[error("needs worker protocol {needed}, but {negotiated} was negotiated")]
    TooOld {
        /// The version the operation needs.
        needed: ProtocolVersion,
        /// The version in use.
        negotiated: ProtocolVersion,
    },
    /// A caller-supplied source or sink (the NAR to upload, the writer a NAR is streamed
    /// into) failed, or supplied inconsistent data.
    #[error("{message}: {source}")]
    Local {
        /// What was being done.
        message: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// An argument cannot be expressed on the wire at the negotiated version.
    #[error("{0}")]
    InvalidArgument(String),
    /// An earlier error left the connection in an unknown state.
    #[error("the daemon connection is unusable after an earlier error")]
    Broken,
}

fn fmt_traces(traces: &[String]) -> String {
    let mut s = String::new();
    for t in traces {
        s.push_str("\n  … ");
        s.push_str(t);
    }
    s
}

impl fmt::Display for WorkerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.ctx, self.kind)
    }
}

impl std::error::Error for WorkerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.kind)
    }
}

impl From<WorkerErrorKind> for WorkerError {
    fn from(kind: WorkerErrorKind) -> Self {
        WorkerError {
            ctx: OpContext::default(),
            kind,
        }
    }
}

impl WorkerError {
    /// The operation and path the error happened in.
    pub fn ctx(&self) -> &OpContext {
        &self.ctx
    }

    /// What went wrong.
    pub fn kind(&self) -> &WorkerErrorKind {
        &self.kind
    }

    /// Splits the error into its context and kind.
    pub fn into_parts(self) -> (OpContext, WorkerErrorKind) {
        (self.ctx, self.kind)
    }

    /// Fills in the operation and path where not already set.
    pub(crate) fn with_context(mut self, op: &'static str, path: Option<&str>) -> Self {
        if self.ctx.op.is_none() {
            self.ctx.op = Some(op);
        }
        if self.ctx.path.is_none() {
            self.ctx.path = path.map(str::to_string);
        }
        self
    }

    /// True for `STDERR_ERROR` from the daemon.
    pub fn is_remote(&self) -> bool {
        matches!(self.kind, WorkerErrorKind::Remote { .. })
    }

    /// True if the daemon closed the connection.
    pub fn is_connection_closed(&self) -> bool {
        matches!(self.kind, WorkerErrorKind::ConnectionClosed { .. })
    }

    /// The daemon's message for [`Remote`](WorkerErrorKind::Remote) errors.
    pub fn remote_message(&self) -> Option<&str> {
        match &self.kind {
            WorkerErrorKind::Remote { message, .. } => Some(message),
            _ => None,
        }
    }

    pub(crate) fn protocol(violation: Violation) -> Self {
        WorkerErrorKind::Protocol(violation).into()
    }

    pub(crate) fn local(message: impl Into<String>, source: io::Error) -> Self {
        WorkerErrorKind::Local {
            message: message.into(),
            source,
        }
        .into()
    }

    pub(crate) fn invalid_argument(message: impl Into<String>) -> Self {
        WorkerErrorKind::InvalidArgument(message.into()).into()
    }

    pub(crate) fn connection_closed(detail: impl Into<String>) -> Self {
        WorkerErrorKind::ConnectionClosed {
            detail: detail.into(),
        }
        .into()
    }

    /// Classifies an I/O error on the daemon connection.
    pub(crate) fn conn_io(e: io::Error) -> Self {
        if is_closed_kind(e.kind()) {
            Self::connection_closed(e.to_string())
        } else {
            WorkerErrorKind::Io(e).into()
        }
    }

    /// Whether the connection must be considered out of sync after this error. `Local` errors
    /// are judged case by case where they happen.
    pub(crate) fn breaks_connection(&self) -> bool {
        !matches!(
            self.kind,
            WorkerErrorKind::Remote { .. }
                | WorkerErrorKind::TooOld { .. }
                | WorkerErrorKind::InvalidArgument(_)
                | WorkerErrorKind::Local { .. }
                | WorkerErrorKind::Broken
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
            WireError::Truncated(what) => {
                WorkerError::connection_closed(format!("the stream ended in the middle of {what}"))
            }
            WireError::Io(e) => WorkerError::conn_io(e),
            other => WorkerErrorKind::Wire(other).into(),
        }
    }
}
