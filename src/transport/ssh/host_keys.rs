//! Host-key trust: which server keys a connection accepts (never one seen for the first time),
//! and the russh handler that checks the key the server presents.

use std::sync::{Arc, Mutex};

use russh::Preferred;
use russh::client;
use russh::keys::{PublicKey, PublicKeyOrCertificate};

use crate::transport::keys::{fingerprint, same_key};

/// What the host key check saw, for the error after russh gives up.
#[derive(Default)]
pub(super) struct HostKeyVerdict {
    pub(super) rejected: Option<String>,
}

/// The host keys a server may present: exactly one pinned key (builder containers), or the
/// keys a user's remote builder is known by (its machines entry, or known_hosts), never any
/// key seen for the first time.
#[derive(Debug, Clone)]
pub struct HostKeys {
    pub(super) accept: Vec<PublicKey>,
    revoked: Vec<PublicKey>,
    /// Where the accepted keys come from, for messages; `None` for a builder container's
    /// pinned key.
    pub(super) source: Option<String>,
}

impl HostKeys {
    /// Exactly this key (a builder container's pinned key).
    pub fn pinned(key: PublicKey) -> HostKeys {
        HostKeys {
            accept: vec![key],
            revoked: Vec::new(),
            source: None,
        }
    }

    /// Any of `accept` but none of `revoked`; `source` says where they come from (e.g. "the
    /// host key in its builders entry", "~/.ssh/known_hosts").
    pub fn any_of(accept: Vec<PublicKey>, revoked: Vec<PublicKey>, source: String) -> HostKeys {
        HostKeys {
            accept,
            revoked,
            source: Some(source),
        }
    }

    pub fn accepted(&self) -> &[PublicKey] {
        &self.accept
    }

    fn accepts(&self, key: &PublicKey) -> bool {
        self.accept.iter().any(|k| same_key(k, key))
            && !self.revoked.iter().any(|k| same_key(k, key))
    }

    /// Host key algorithms to offer: those of the accepted keys.
    pub(super) fn algorithms(&self) -> Vec<russh::keys::Algorithm> {
        if self.source.is_none() {
            return self.accept.iter().map(PublicKey::algorithm).collect();
        }
        let mut out: Vec<russh::keys::Algorithm> = Vec::new();
        for a in Preferred::DEFAULT.key.iter() {
            let wanted = self.accept.iter().any(|k| {
                std::mem::discriminant(&k.algorithm()) == std::mem::discriminant(a)
                    && (matches!(a, russh::keys::Algorithm::Rsa { .. }) || k.algorithm() == *a)
            });
            if wanted && !out.contains(a) {
                out.push(a.clone());
            }
        }
        for k in &self.accept {
            let a = k.algorithm();
            if !out
                .iter()
                .any(|o| std::mem::discriminant(o) == std::mem::discriminant(&a))
            {
                out.push(a);
            }
        }
        out
    }

    pub(super) fn describe(&self) -> String {
        let fps: Vec<String> = self.accept.iter().map(fingerprint).collect();
        match &self.source {
            Some(src) => format!("{} from {src}", fps.join(", ")),
            None => fps.join(", "),
        }
    }
}

pub(super) struct ClientHandler {
    pub(super) host_keys: HostKeys,
    pub(super) verdict: Arc<Mutex<HostKeyVerdict>>,
}

impl client::Handler for ClientHandler {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        server: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let got = match server {
            PublicKeyOrCertificate::PublicKey { key, .. } if self.host_keys.accepts(key) => {
                return Ok(true);
            }
            PublicKeyOrCertificate::PublicKey { key, .. } => fingerprint(key),
            PublicKeyOrCertificate::Certificate(cert) => {
                format!(
                    "a certificate for {}",
                    fingerprint(&PublicKey::from(cert.public_key().clone()))
                )
            }
        };
        self.verdict
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .rejected = Some(got);
        Ok(false)
    }

    async fn kex_done(
        &mut self,
        _shared_secret: Option<&[u8]>,
        names: &russh::Names,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        tracing::debug!(
            kex = names.kex.as_ref(),
            cipher = names.cipher.as_ref(),
            host_key = %names.key,
            "SSH key exchange done"
        );
        Ok(())
    }
}
