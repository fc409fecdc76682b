//! The hook ↔ holder protocol: a few length-prefixed frames, then raw bytes.
//!
//! A frame is a 4-byte big-endian length and that many bytes: UTF-8 fields separated by NUL
//! (a field never holds a NUL). On a new connection the holder sends its [`Hello`] at once;
//! the hook checks it against what it expects and sends one [`Request`]; the holder opens that
//! channel on its SSH session and answers with one [`Reply`]. After `ok`, the connection is
//! the channel's bytes both ways, unframed (the daemon socket's, or a command's stdin and
//! stdout). The holder's parameters reach it the same way, as one frame on its stdin.
//!
//! Every frame read is bounded ([`MAX_FRAME`]): the bytes a holder sends are the builder's as
//! far as the hook is concerned, and a hook's are a local process's.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// What both ends speak; a holder of another version is not used.
pub const VERSION: &str = "nixdock-ssh-holder/2";

/// The largest frame either side accepts (a command line is the longest field).
pub const MAX_FRAME: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("the peer closed the connection")]
    Closed,
    #[error("a frame of {0} bytes is longer than {MAX_FRAME}")]
    TooLong(usize),
    #[error("a frame is not UTF-8")]
    NotUtf8,
    #[error("a field holds a NUL byte")]
    Nul,
    #[error("unexpected message: {0:?}")]
    Unexpected(String),
}

/// Encodes `fields` as one frame.
pub fn encode<S: AsRef<str>>(fields: &[S]) -> Result<Vec<u8>, ProtocolError> {
    if fields.iter().any(|f| f.as_ref().contains('\0')) {
        return Err(ProtocolError::Nul);
    }
    let fields: Vec<&str> = fields.iter().map(AsRef::as_ref).collect();
    let payload = fields.join("\0");
    if payload.len() > MAX_FRAME {
        return Err(ProtocolError::TooLong(payload.len()));
    }
    let mut out = Vec::with_capacity(4 + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload.as_bytes());
    Ok(out)
}

/// Splits a frame's payload into its fields.
pub fn decode(payload: &[u8]) -> Result<Vec<String>, ProtocolError> {
    let text = std::str::from_utf8(payload).map_err(|_| ProtocolError::NotUtf8)?;
    Ok(text.split('\0').map(str::to_owned).collect())
}

/// Writes one frame.
pub async fn write_frame<W: AsyncWrite + Unpin, S: AsRef<str>>(
    w: &mut W,
    fields: &[S],
) -> Result<(), ProtocolError> {
    w.write_all(&encode(fields)?).await?;
    w.flush().await?;
    Ok(())
}

/// Reads exactly one frame, nothing past it (the raw bytes that may follow stay unread).
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Vec<String>, ProtocolError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(ProtocolError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(ProtocolError::TooLong(len));
    }
    let mut payload = vec![0u8; len];
    match r.read_exact(&mut payload).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(ProtocolError::Closed),
        Err(e) => return Err(e.into()),
    }
    decode(&payload)
}

/// What a holder holds, sent first on every connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The builder container's name and id.
    pub container: String,
    pub container_id: String,
    /// The address its SSH session went to.
    pub addr: String,
    /// The pinned host key's `SHA256:` fingerprint that the session was checked against.
    pub host_key: String,
    /// The holder's process id (for logs and tests).
    pub pid: u32,
}

impl Hello {
    pub fn fields(&self) -> Vec<String> {
        vec![
            VERSION.to_owned(),
            self.container.clone(),
            self.container_id.clone(),
            self.addr.clone(),
            self.host_key.clone(),
            self.pid.to_string(),
        ]
    }

    pub fn parse(fields: Vec<String>) -> Result<Hello, ProtocolError> {
        match <[String; 6]>::try_from(fields) {
            Ok([v, container, container_id, addr, host_key, pid]) if v == VERSION => Ok(Hello {
                container,
                container_id,
                addr,
                host_key,
                pid: pid
                    .parse()
                    .map_err(|_| ProtocolError::Unexpected(format!("hello with pid {pid:?}")))?,
            }),
            Ok([v, ..]) => Err(ProtocolError::Unexpected(format!("hello of version {v:?}"))),
            Err(f) => Err(ProtocolError::Unexpected(format!(
                "hello with {} fields",
                f.len()
            ))),
        }
    }
}

/// What the hook asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// A `direct-streamlocal` channel to the builder's daemon socket.
    Daemon,
    /// An exec channel running this command: its stdin and stdout bridged, stderr kept in the
    /// holder's log.
    Exec(String),
}

impl Request {
    pub fn fields(&self) -> Vec<&str> {
        match self {
            Request::Daemon => vec!["daemon"],
            Request::Exec(cmd) => vec!["exec", cmd],
        }
    }

    pub fn parse(fields: Vec<String>) -> Result<Request, ProtocolError> {
        let mut it = fields.into_iter();
        match (it.next().as_deref(), it.next(), it.next()) {
            (Some("daemon"), None, None) => Ok(Request::Daemon),
            (Some("exec"), Some(cmd), None) => Ok(Request::Exec(cmd)),
            (first, ..) => Err(ProtocolError::Unexpected(format!(
                "request {:?}",
                first.unwrap_or("")
            ))),
        }
    }
}

/// The holder's answer to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Ok,
    Error(String),
}

impl Reply {
    pub fn fields(&self) -> Vec<&str> {
        match self {
            Reply::Ok => vec!["ok"],
            Reply::Error(why) => vec!["error", why],
        }
    }

    pub fn parse(fields: Vec<String>) -> Result<Reply, ProtocolError> {
        let mut it = fields.into_iter();
        match (it.next().as_deref(), it.next(), it.next()) {
            (Some("ok"), None, None) => Ok(Reply::Ok),
            (Some("error"), Some(why), None) => Ok(Reply::Error(why)),
            (first, ..) => Err(ProtocolError::Unexpected(format!(
                "reply {:?}",
                first.unwrap_or("")
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    }

    #[test]
    fn frames_round_trip_and_leave_what_follows_unread() {
        rt().block_on(async {
            let mut bytes = encode(&["exec", "tail -f 'a b'"]).unwrap();
            bytes.extend(encode(&[""]).unwrap());
            bytes.extend_from_slice(b"raw bytes after");
            let mut r = &bytes[..];
            assert_eq!(read_frame(&mut r).await.unwrap(), ["exec", "tail -f 'a b'"]);
            assert_eq!(read_frame(&mut r).await.unwrap(), [""]);
            assert_eq!(r, b"raw bytes after");
        });
    }

    #[test]
    fn length_prefix_is_big_endian() {
        assert_eq!(encode(&["ok"]).unwrap(), b"\0\0\0\x02ok");
        assert_eq!(encode(&["a", "b"]).unwrap(), b"\0\0\0\x03a\0b");
    }

    #[test]
    fn oversized_truncated_and_bad_frames_are_refused() {
        rt().block_on(async {
            // A length past the bound is refused before anything is allocated.
            let mut r = &[0xffu8, 0xff, 0xff, 0xff, b'x'][..];
            assert!(matches!(
                read_frame(&mut r).await,
                Err(ProtocolError::TooLong(_))
            ));
            let big = "x".repeat(MAX_FRAME + 1);
            assert!(matches!(encode(&[&big]), Err(ProtocolError::TooLong(_))));
            // The connection ends inside the length or the payload.
            let mut r = &[0u8, 0][..];
            assert!(matches!(
                read_frame(&mut r).await,
                Err(ProtocolError::Closed)
            ));
            let mut r = &[0u8, 0, 0, 5, b'a'][..];
            assert!(matches!(
                read_frame(&mut r).await,
                Err(ProtocolError::Closed)
            ));
            let mut r = &[][..];
            assert!(matches!(
                read_frame(&mut r).await,
                Err(ProtocolError::Closed)
            ));
            // Not UTF-8.
            let mut r = &[0u8, 0, 0, 1, 0xff][..];
            assert!(matches!(
                read_frame(&mut r).await,
                Err(ProtocolError::NotUtf8)
            ));
        });
        // A field cannot carry the separator.
        assert!(matches!(encode(&["a\0b"]), Err(ProtocolError::Nul)));
    }

    #[test]
    fn messages_parse_only_in_their_exact_shapes() {
        let hello = Hello {
            container: "nixdock-abc-x86_64-linux".into(),
            container_id: "0123abcd".into(),
            addr: "127.0.0.1:32768".into(),
            host_key: "SHA256:xyz".into(),
            pid: 42,
        };
        assert_eq!(Hello::parse(hello.fields()).unwrap(), hello);
        let mut other = hello.fields();
        other[0] = "nixdock-ssh-holder/1".into();
        assert!(Hello::parse(other).is_err());
        let mut short = hello.fields();
        short.pop();
        assert!(Hello::parse(short).is_err());
        let mut bad_pid = hello.fields();
        bad_pid[5] = "-1".into();
        assert!(Hello::parse(bad_pid).is_err());

        let own = |f: Vec<&str>| f.into_iter().map(String::from).collect::<Vec<_>>();
        for r in [Request::Daemon, Request::Exec("wc -c < f".into())] {
            assert_eq!(Request::parse(own(r.fields())).unwrap(), r);
        }
        assert!(Request::parse(own(vec!["daemon", "x"])).is_err());
        assert!(Request::parse(own(vec!["exec"])).is_err());
        assert!(Request::parse(own(vec!["shell"])).is_err());
        for r in [Reply::Ok, Reply::Error("no".into())] {
            assert_eq!(Reply::parse(own(r.fields())).unwrap(), r);
        }
        assert!(Reply::parse(own(vec!["ok", "extra"])).is_err());
        assert!(Reply::parse(own(vec![])).is_err());
    }
}
