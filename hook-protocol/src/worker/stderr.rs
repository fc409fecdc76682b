//! The daemon's stderr message loop (`processStderr` in `2.8.0:src/libstore/remote-store.cc`,
//! `processStderrReturn` in `2.26.3:src/libstore/worker-protocol-connection.cc`; error encoding
//! from `readError` in `src/libutil/serialise.cc`).
//!
//! After every request the daemon sends log messages, activity events and data requests,
//! ending in `STDERR_LAST` (the reply follows) or `STDERR_ERROR` (nothing follows).

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::log::{ActivityType, Code, Field, ResultType, Verbosity};
use crate::wire::{self, MAX_COLLECTION_LEN};

use super::ProtocolVersion;
use super::error::{Violation, WorkerError, WorkerErrorKind};

/// `STDERR_NEXT`: a log message follows.
pub const STDERR_NEXT: u64 = 0x6f6c_6d67;
/// `STDERR_READ`: the daemon asks for up to a number of bytes of the request's data.
pub const STDERR_READ: u64 = 0x6461_7461;
/// `STDERR_WRITE`: the daemon sends a chunk of data to the client.
pub const STDERR_WRITE: u64 = 0x6461_7416;
/// `STDERR_LAST`: the operation succeeded; its reply follows.
pub const STDERR_LAST: u64 = 0x616c_7473;
/// `STDERR_ERROR`: the operation failed; the error follows, and nothing after it.
pub const STDERR_ERROR: u64 = 0x6378_7470;
/// `STDERR_START_ACTIVITY`: an activity starts.
pub const STDERR_START_ACTIVITY: u64 = 0x5354_5254;
/// `STDERR_STOP_ACTIVITY`: an activity ends.
pub const STDERR_STOP_ACTIVITY: u64 = 0x5354_4f50;
/// `STDERR_RESULT`: an activity reports a result.
pub const STDERR_RESULT: u64 = 0x5253_4c54;

/// Largest chunk sent in answer to one `STDERR_READ` (the daemon asks for up to 64 KiB or so;
/// whatever it asks, we never allocate more than this).
const MAX_READ_REPLY: usize = 64 * 1024;

/// A message from the daemon's stderr channel, handed to the caller while an operation runs.
///
/// Texts, string fields included, are decoded lossily (invalid UTF-8 becomes U+FFFD), since
/// they can carry arbitrary build output. Type codes a newer Nix adds are kept as
/// [`Code::Unknown`]; levels above `Vomit` are `Vomit`, as Nix's own JSON logger reads them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogEvent {
    /// `STDERR_NEXT`: a log message, with trailing newlines removed.
    Next(String),
    /// `STDERR_START_ACTIVITY` (daemon → clients ≥1.20).
    StartActivity {
        /// The daemon's id for the activity.
        id: u64,
        /// Its verbosity.
        level: Verbosity,
        /// Its activity type.
        typ: Code<ActivityType>,
        /// Its description.
        text: String,
        /// Its fields; their layout depends on `typ`.
        fields: Vec<Field>,
        /// The daemon's id of the parent activity (0: none).
        parent: u64,
    },
    /// `STDERR_STOP_ACTIVITY`.
    StopActivity {
        /// The activity.
        id: u64,
    },
    /// `STDERR_RESULT`, e.g. a build log line or progress.
    Result {
        /// The activity.
        id: u64,
        /// The result type.
        typ: Code<ResultType>,
        /// The result's fields; their layout depends on `typ`.
        fields: Vec<Field>,
    },
}

impl LogEvent {
    /// The text if this event is a log line: a `Next` message or a build log line result
    /// (`resBuildLogLine`/`resPostBuildLogLine`).
    pub fn log_line(&self) -> Option<&str> {
        match self {
            LogEvent::Next(s) => Some(s),
            LogEvent::Result {
                typ: Code::Known(ResultType::BuildLogLine | ResultType::PostBuildLogLine),
                fields,
                ..
            } => match fields.first() {
                Some(Field::Str(s)) => Some(s),
                _ => None,
            },
            _ => None,
        }
    }
}

/// A log sink that drops everything.
pub fn discard_logs(_: LogEvent) {}

async fn read_lossy<R: AsyncRead + Unpin + ?Sized>(r: &mut R) -> Result<String, WorkerError> {
    let b = wire::read_bytes(r).await?;
    Ok(match String::from_utf8(b) {
        Ok(s) => s,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    })
}

async fn read_fields<R: AsyncRead + Unpin + ?Sized>(r: &mut R) -> Result<Vec<Field>, WorkerError> {
    let n = wire::read_len(r, "field list", MAX_COLLECTION_LEN).await?;
    let mut out = Vec::with_capacity(n.min(16));
    for _ in 0..n {
        match wire::read_u64(r).await? {
            0 => out.push(Field::Int(wire::read_u64(r).await?)),
            1 => out.push(Field::Str(read_lossy(r).await?)),
            t => {
                return Err(WorkerError::protocol(Violation::FieldType(t)));
            }
        }
    }
    Ok(out)
}

/// Reads the body of `STDERR_ERROR` and turns it into [`WorkerErrorKind::Remote`].
pub(crate) async fn read_error<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    version: ProtocolVersion,
) -> Result<WorkerError, WorkerError> {
    if version.minor() >= 26 {
        let typ = read_lossy(r).await?;
        if typ != "Error" {
            return Err(WorkerError::protocol(Violation::ErrorType(typ)));
        }
        let level = wire::read_u64(r).await?;
        let _name = read_lossy(r).await?; // obsolete, always "Error"
        let message = read_lossy(r).await?;
        let have_pos = wire::read_u64(r).await?;
        if have_pos != 0 {
            return Err(WorkerError::protocol(Violation::Position {
                what: "STDERR_ERROR",
                tag: have_pos,
            }));
        }
        let n = wire::read_len(r, "error trace list", MAX_COLLECTION_LEN).await?;
        let mut traces = Vec::with_capacity(n.min(16));
        for _ in 0..n {
            let have_pos = wire::read_u64(r).await?;
            if have_pos != 0 {
                return Err(WorkerError::protocol(Violation::Position {
                    what: "error trace",
                    tag: have_pos,
                }));
            }
            traces.push(read_lossy(r).await?);
        }
        Ok(WorkerErrorKind::Remote {
            message,
            exit_status: None,
            level: Some(level),
            traces,
        }
        .into())
    } else {
        let message = read_lossy(r).await?;
        let status = wire::read_u64(r).await?;
        Ok(WorkerErrorKind::Remote {
            message,
            exit_status: Some(status),
            level: None,
            traces: Vec::new(),
        }
        .into())
    }
}

/// Data for `STDERR_READ` requests: the writer to answer on and the source to read from.
pub(crate) struct ReadSource<'a, W: ?Sized, S: ?Sized> {
    pub w: &'a mut W,
    pub src: &'a mut S,
    /// The first error reading `src`; from then on the daemon is told EOF.
    pub failed: Option<std::io::Error>,
}

/// Runs the stderr loop until `STDERR_LAST` (→ `Ok`) or `STDERR_ERROR` (→ `Err(Remote)`),
/// handing everything else to `logs`. `STDERR_READ` is an error unless `source` is given.
pub(crate) async fn process_stderr<R, L>(
    r: &mut R,
    version: ProtocolVersion,
    logs: &mut L,
) -> Result<(), WorkerError>
where
    R: AsyncRead + Unpin + ?Sized,
    L: FnMut(LogEvent) + ?Sized,
{
    process_stderr_with_source::<R, tokio::io::Sink, tokio::io::Empty, L>(r, None, version, logs)
        .await
}

pub(crate) async fn process_stderr_with_source<R, W, S, L>(
    r: &mut R,
    mut source: Option<&mut ReadSource<'_, W, S>>,
    version: ProtocolVersion,
    logs: &mut L,
) -> Result<(), WorkerError>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
    S: AsyncRead + Unpin + ?Sized,
    L: FnMut(LogEvent) + ?Sized,
{
    loop {
        let tag = wire::read_u64(r).await?;
        match tag {
            STDERR_LAST => return Ok(()),
            STDERR_ERROR => return Err(read_error(r, version).await?),
            STDERR_NEXT => {
                let mut s = read_lossy(r).await?;
                let keep = s.trim_end_matches(['\n', '\r']).len();
                s.truncate(keep);
                logs(LogEvent::Next(s));
            }
            STDERR_START_ACTIVITY => {
                let id = wire::read_u64(r).await?;
                let level = Verbosity::from_code(wire::read_u64(r).await?);
                let typ = Code::from_code(wire::read_u64(r).await?);
                let text = read_lossy(r).await?;
                let fields = read_fields(r).await?;
                let parent = wire::read_u64(r).await?;
                logs(LogEvent::StartActivity {
                    id,
                    level,
                    typ,
                    text,
                    fields,
                    parent,
                });
            }
            STDERR_STOP_ACTIVITY => {
                let id = wire::read_u64(r).await?;
                logs(LogEvent::StopActivity { id });
            }
            STDERR_RESULT => {
                let id = wire::read_u64(r).await?;
                let typ = Code::from_code(wire::read_u64(r).await?);
                let fields = read_fields(r).await?;
                logs(LogEvent::Result { id, typ, fields });
            }
            STDERR_READ => {
                let len = wire::read_u64(r).await?;
                let Some(rs) = source.as_deref_mut() else {
                    return Err(WorkerError::protocol(Violation::UnexpectedRead));
                };
                let want = usize::try_from(len)
                    .unwrap_or(usize::MAX)
                    .min(MAX_READ_REPLY);
                let mut data = vec![0u8; want];
                let n = if rs.failed.is_some() || want == 0 {
                    0
                } else {
                    match rs.src.read(&mut data).await {
                        Ok(n) => n,
                        Err(e) => {
                            rs.failed = Some(e);
                            0
                        }
                    }
                };
                let mut buf = BytesMut::with_capacity(n + 16);
                wire::put_bytes(&mut buf, &data[..n]);
                rs.w.write_all(&buf).await.map_err(WorkerError::conn_io)?;
                rs.w.flush().await.map_err(WorkerError::conn_io)?;
            }
            STDERR_WRITE => {
                return Err(WorkerError::protocol(Violation::UnexpectedWrite));
            }
            other => {
                return Err(WorkerError::protocol(Violation::MessageType(other)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    /// Type codes and levels a newer Nix may send are kept (or clamped), never an error.
    #[tokio::test]
    async fn unknown_activity_and_result_types_are_kept() {
        let mut b = BytesMut::new();
        b.put_u64_le(STDERR_START_ACTIVITY);
        for v in [1, 12, 199] {
            b.put_u64_le(v); // id, level, type
        }
        wire::put_str(&mut b, "new");
        b.put_u64_le(0); // no fields
        b.put_u64_le(0); // parent
        b.put_u64_le(STDERR_RESULT);
        b.put_u64_le(1);
        b.put_u64_le(150);
        b.put_u64_le(0);
        b.put_u64_le(STDERR_LAST);
        let mut events = Vec::new();
        process_stderr(&mut &b[..], ProtocolVersion::LATEST, &mut |e| {
            events.push(e)
        })
        .await
        .unwrap();
        assert_eq!(
            events,
            [
                LogEvent::StartActivity {
                    id: 1,
                    level: Verbosity::Vomit,
                    typ: Code::Unknown(199),
                    text: "new".into(),
                    fields: vec![],
                    parent: 0,
                },
                LogEvent::Result {
                    id: 1,
                    typ: Code::Unknown(150),
                    fields: vec![],
                },
            ]
        );
        assert_eq!(events[1].log_line(), None);
        assert_eq!(
            Code::<ResultType>::from_code(101),
            Code::Known(ResultType::BuildLogLine)
        );
        assert_eq!(Code::<ActivityType>::Unknown(199).code(), 199);
    }
}
