//! The Engine API over connections bollard does not make the way nixdock needs: TLS that
//! trusts only the CA the operator named (as `docker --tlsverify --tlscacert` does; bollard's
//! own TLS also trusts the system's roots, so any public CA could vouch for an engine), and an
//! `ssh://` engine's `docker system dial-stdio` over nixdock's own SSH client (the engine
//! host's key pinned, never root's `~/.ssh/config`, never trust on first use).
//!
//! Connections come from a [`Dialer`] and are kept alive between requests (hyper's pool): a
//! warm build makes a dozen small Engine API calls, and a TLS handshake or a new SSH channel
//! (a `dial-stdio` process on the engine's host) for each measured 10 ms or more. An exec's
//! upgraded stream takes its connection out of the pool for as long as it runs.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bollard::{BollardRequest, ClientVersion, Docker};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};

use super::ssh::SshSession;

/// TCP connect + TLS handshake, or opening the SSH channel, for one request.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// The operator's TLS files for a `tcp://` engine (`tls-ca`, `tls-cert`, `tls-key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineApiError {
    #[error("{path}: {what}")]
    File { path: PathBuf, what: String },
    #[error("{0}: not a host name or address TLS can verify")]
    ServerName(String),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("{0}")]
    Bollard(#[from] bollard::errors::Error),
}

/// How each request's connection is made.
enum Dialer {
    Tls {
        /// `host:port`.
        addr: String,
        server_name: ServerName<'static>,
        connector: tokio_rustls::TlsConnector,
    },
    Ssh {
        session: Arc<SshSession>,
        command: String,
    },
}

trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

impl Dialer {
    async fn dial(&self) -> std::io::Result<Box<dyn Stream>> {
        let timed_out = |what: &str| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("{what} took more than {} s", DIAL_TIMEOUT.as_secs()),
            )
        };
        match self {
            Dialer::Tls {
                addr,
                server_name,
                connector,
            } => {
                let tcp = tokio::time::timeout(DIAL_TIMEOUT, tokio::net::TcpStream::connect(addr))
                    .await
                    .map_err(|_| timed_out("connecting"))??;
                tcp.set_nodelay(true)?;
                let tls =
                    tokio::time::timeout(DIAL_TIMEOUT, connector.connect(server_name.clone(), tcp))
                        .await
                        .map_err(|_| timed_out("the TLS handshake"))??;
                Ok(Box::new(tls))
            }
            Dialer::Ssh { session, command } => {
                let ch = tokio::time::timeout(DIAL_TIMEOUT, session.exec(command))
                    .await
                    .map_err(|_| timed_out("opening the SSH channel"))?
                    .map_err(std::io::Error::other)?;
                Ok(Box::new(tokio::io::join(ch.stdout, ch.stdin)))
            }
        }
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, EngineApiError> {
    std::fs::read(path).map_err(|e| EngineApiError::File {
        path: path.to_owned(),
        what: e.to_string(),
    })
}

/// A TLS client that trusts exactly `files.ca` and presents `files.cert` with `files.key`.
fn tls_connector(files: &TlsFiles) -> Result<tokio_rustls::TlsConnector, EngineApiError> {
    let bad = |path: &Path, what: &str| EngineApiError::File {
        path: path.to_owned(),
        what: what.to_string(),
    };
    let mut roots = rustls::RootCertStore::empty();
    let ca = read_file(&files.ca)?;
    for cert in CertificateDer::pem_slice_iter(&ca) {
        let cert = cert.map_err(|e| bad(&files.ca, &format!("not a PEM certificate: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| bad(&files.ca, &format!("unusable CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(bad(&files.ca, "holds no certificate"));
    }
    let chain = CertificateDer::pem_slice_iter(&read_file(&files.cert)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(&files.cert, &format!("not a PEM certificate: {e}")))?;
    if chain.is_empty() {
        return Err(bad(&files.cert, "holds no certificate"));
    }
    let key = PrivateKeyDer::from_pem_slice(&read_file(&files.key)?)
        .map_err(|e| bad(&files.key, &format!("not a PEM private key: {e}")))?;
    // ring builds anywhere without cmake (aws-lc-rs, rustls' post-quantum default, does not);
    // classical key exchange is what Docker engines' TLS is configured for today.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// `host:port` of a `tcp://host:port` (or `https://`) address, and the host alone.
fn host_port(addr: &str) -> Option<(String, String)> {
    let rest = addr
        .strip_prefix("tcp://")
        .or_else(|| addr.strip_prefix("https://"))?;
    let hostport = rest.split('/').next()?;
    let host = match hostport.strip_prefix('[') {
        Some(v6) => v6.split(']').next()?.to_string(),
        None => hostport
            .rsplit_once(':')
            .map_or(hostport, |(h, _)| h)
            .to_string(),
    };
    let hostport = if hostport.contains(':') && !hostport.ends_with(']') {
        hostport.to_string()
    } else {
        format!("{hostport}:2376")
    };
    Some((hostport, host))
}

/// An engine at `addr` (`tcp://host:port`) over TLS with `files`.
pub fn tls_docker(
    addr: &str,
    files: &TlsFiles,
    timeout_secs: u64,
    version: &ClientVersion,
) -> Result<Docker, EngineApiError> {
    let (hostport, host) =
        host_port(addr).ok_or_else(|| EngineApiError::ServerName(addr.to_string()))?;
    let server_name = match host.parse::<IpAddr>() {
        Ok(ip) => ServerName::IpAddress(ip.into()),
        Err(_) => ServerName::try_from(host.clone())
            .map_err(|_| EngineApiError::ServerName(host.clone()))?,
    };
    let dialer = Dialer::Tls {
        addr: hostport.clone(),
        server_name,
        connector: tls_connector(files)?,
    };
    over(dialer, &hostport, timeout_secs, version)
}

/// An engine reached by running `command` (`docker system dial-stdio`) over `session`.
pub fn ssh_docker(
    session: Arc<SshSession>,
    command: &str,
    timeout_secs: u64,
    version: &ClientVersion,
) -> Result<Docker, EngineApiError> {
    let host = session.addr().to_string();
    let dialer = Dialer::Ssh {
        session,
        command: command.to_string(),
    };
    over(dialer, &host, timeout_secs, version)
}

fn over(
    dialer: Dialer,
    host: &str,
    timeout_secs: u64,
    version: &ClientVersion,
) -> Result<Docker, EngineApiError> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(Connector(Arc::new(dialer)));
    let transport = move |req: BollardRequest| {
        let client = client.clone();
        async move {
            Ok(client
                .request(req)
                .await
                .map_err(|e| std::io::Error::other(with_sources(&e)))?)
        }
    };
    Ok(Docker::connect_with_custom_transport(
        transport,
        Some(format!("http://{host}")),
        timeout_secs,
        version,
    )?)
}

/// An error and its sources in one line: hyper's client says only "client error (Connect)",
/// the reason (an unknown CA, a refused connection) is in its sources.
fn with_sources(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// hyper's connector: every new pooled connection is one [`Dialer::dial`].
#[derive(Clone)]
struct Connector(Arc<Dialer>);

type DialFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<Conn>> + Send>>;

impl tower_service::Service<hyper::Uri> for Connector {
    type Response = Conn;
    type Error = std::io::Error;
    type Future = DialFuture;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: hyper::Uri) -> Self::Future {
        let dialer = self.0.clone();
        Box::pin(async move { Ok(Conn(TokioIo::new(dialer.dial().await?))) })
    }
}

/// A dialed connection as hyper's client wants it.
struct Conn(TokioIo<Box<dyn Stream>>);

impl hyper_util::client::legacy::connect::Connection for Conn {
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        hyper_util::client::legacy::connect::Connected::new()
    }
}

impl hyper::rt::Read for Conn {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Conn {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_of_tcp_addresses() {
        assert_eq!(
            host_port("tcp://10.0.0.2:2376"),
            Some(("10.0.0.2:2376".into(), "10.0.0.2".into()))
        );
        assert_eq!(
            host_port("tcp://engine.example:4000/"),
            Some(("engine.example:4000".into(), "engine.example".into()))
        );
        assert_eq!(
            host_port("tcp://engine.example"),
            Some(("engine.example:2376".into(), "engine.example".into()))
        );
        assert_eq!(
            host_port("tcp://[fd00::2]:2376"),
            Some(("[fd00::2]:2376".into(), "fd00::2".into()))
        );
        assert_eq!(host_port("unix:///run/docker.sock"), None);
    }

    #[test]
    fn a_missing_ca_file_is_an_error_naming_it() {
        let files = TlsFiles {
            ca: "/nonexistent/ca.pem".into(),
            cert: "/nonexistent/cert.pem".into(),
            key: "/nonexistent/key.pem".into(),
        };
        let e = tls_docker(
            "tcp://10.0.0.2:2376",
            &files,
            10,
            bollard::API_DEFAULT_VERSION,
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
    }
}
