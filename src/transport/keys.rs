//! SSH keys: the hook's own client key (made once, kept in the state directory)
//! and per-container host keys (made fresh for every builder and pinned).

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use russh::keys::ssh_key::LineEnding;
use russh::keys::ssh_key::private::{Ed25519Keypair, Ed25519PrivateKey};
use russh::keys::{Algorithm, HashAlg, PrivateKey, PublicKey};

/// File name of the client key inside the state directory.
pub const CLIENT_KEY_FILE: &str = "client_ed25519";

/// Comment carried by keys nixdock makes.
pub const KEY_COMMENT: &str = "nixdock";

/// Errors while making, storing or parsing keys.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot create state directory {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("cannot write client key {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot read client key {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error(
        "client key {path} is not a usable OpenSSH private key ({reason}); \
         delete it and nixdock will make a new one (builders must then be re-provisioned)"
    )]
    BadClientKey { path: PathBuf, reason: String },
    #[error(
        "client key {path} has mode {mode:o}, so other users may read it; `chmod 600 {path}` \
         (and make new builders: `nixdock gc --volumes`) or delete it"
    )]
    ClientKeyMode { path: PathBuf, mode: u32 },
    #[error("SSH key {path} cannot be used: {reason}")]
    BadIdentity { path: PathBuf, reason: String },
    #[error("not a valid OpenSSH public key line {line:?}: {reason}")]
    BadPublicKey { line: String, reason: String },
    #[error("not a valid OpenSSH private key: {0}")]
    BadPrivateKey(String),
    #[error("cannot get random bytes from the operating system: {0}")]
    Random(String),
    #[error("cannot encode key: {0}")]
    Encode(String),
}

pub type Result<T, E = KeyError> = std::result::Result<T, E>;

/// The identities OpenSSH tries when none is given, in its order, under `home`.
pub fn default_identity_files(home: &Path) -> Vec<PathBuf> {
    ["id_ed25519", "id_ecdsa", "id_rsa"]
        .iter()
        .map(|n| home.join(".ssh").join(n))
        .collect()
}

/// Loads an OpenSSH private key file (a user's own identity, e.g. the key field of a
/// machines entry). A passphrase-protected key is an error: the hook cannot ask for it.
pub fn load_identity(path: &Path) -> Result<ClientKey> {
    let text = fs::read_to_string(path).map_err(|source| KeyError::Read {
        path: path.to_owned(),
        source,
    })?;
    let key = PrivateKey::from_openssh(&text).map_err(|e| KeyError::BadIdentity {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    if key.is_encrypted() {
        return Err(KeyError::BadIdentity {
            path: path.to_owned(),
            reason: "it is passphrase-protected, and the build hook cannot ask for a passphrase; \
                     use a key without a passphrase for this machine"
                .into(),
        });
    }
    ClientKey::from_private_key(key, Some(path.to_owned()))
}

/// The hook's client key, used for public-key authentication to every builder.
#[derive(Clone)]
pub struct ClientKey {
    key: Arc<PrivateKey>,
    public_line: String,
    path: Option<PathBuf>,
}

impl std::fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientKey")
            .field("public", &self.public_line)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl ClientKey {
    /// Builds a client key from OpenSSH private key text (not written anywhere).
    pub fn from_private_openssh(text: &str) -> Result<Self> {
        let key =
            PrivateKey::from_openssh(text).map_err(|e| KeyError::BadPrivateKey(e.to_string()))?;
        Self::from_private_key(key, None)
    }

    fn from_private_key(key: PrivateKey, path: Option<PathBuf>) -> Result<Self> {
        if key.is_encrypted() {
            return Err(KeyError::BadPrivateKey(
                "the key is passphrase-protected; nixdock needs an unencrypted key".into(),
            ));
        }
        let public_line = public_line(key.public_key())?;
        Ok(Self {
            key: Arc::new(key),
            public_line,
            path,
        })
    }

    /// The OpenSSH public key line, e.g. `ssh-ed25519 AAAA… nixdock`, for `authorized_keys`.
    pub fn public_openssh(&self) -> &str {
        &self.public_line
    }

    /// The public key.
    pub fn public_key(&self) -> &PublicKey {
        self.key.public_key()
    }

    /// The private key (shared, cheap to clone).
    pub fn private_key(&self) -> &Arc<PrivateKey> {
        &self.key
    }

    /// Where the key is stored, if it came from a file.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// `SHA256:…` fingerprint, as `ssh-keygen -l` prints it.
    pub fn fingerprint(&self) -> String {
        fingerprint(self.key.public_key())
    }
}

/// A host key made for one builder container.
#[derive(Clone)]
pub struct HostKey {
    private_openssh: String,
    public: PublicKey,
}

impl std::fmt::Debug for HostKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostKey")
            .field("public", &self.public_openssh())
            .finish_non_exhaustive()
    }
}

impl HostKey {
    /// The OpenSSH private key file contents, to be written into the container
    /// (e.g. `/etc/ssh/ssh_host_ed25519_key`, mode 0600).
    pub fn private_openssh(&self) -> &str {
        &self.private_openssh
    }

    /// The public key, to be pinned when connecting.
    pub fn public_key(&self) -> &PublicKey {
        &self.public
    }

    /// The OpenSSH public key line (`ssh-ed25519 AAAA… nixdock`), suitable for a
    /// label or a file; read it back with [`parse_public_key`].
    pub fn public_openssh(&self) -> String {
        // Encoding an ed25519 public key cannot fail.
        public_line(&self.public).unwrap_or_default()
    }

    /// Parses a host key back from its OpenSSH private key text.
    pub fn from_private_openssh(text: &str) -> Result<Self> {
        let key =
            PrivateKey::from_openssh(text).map_err(|e| KeyError::BadPrivateKey(e.to_string()))?;
        Ok(Self {
            private_openssh: text.to_owned(),
            public: key.public_key().clone(),
        })
    }
}

/// Loads the client key from `state_dir/client_ed25519`, making it first if it does
/// not exist (the directory is created with mode 0700, the key file with 0600).
///
/// Creation is atomic and safe against concurrent callers: the key is written to a
/// temporary file and hard-linked into place, so a reader never sees a partial
/// file, and if two processes race, both end up using the first key stored.
pub fn load_or_create_client_key(state_dir: &Path) -> Result<ClientKey> {
    let path = state_dir.join(CLIENT_KEY_FILE);
    match read_private(&path) {
        Ok(text) => return parse_client_key_file(&path, &text),
        Err(KeyError::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }

    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .map_err(|source| KeyError::CreateDir {
            path: state_dir.to_owned(),
            source,
        })?;

    let key = new_ed25519()?;
    let text = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| KeyError::Encode(e.to_string()))?;

    let write_err = |source| KeyError::Write {
        path: path.clone(),
        source,
    };
    let tmp = state_dir.join(format!(
        ".{CLIENT_KEY_FILE}.tmp.{}.{}",
        std::process::id(),
        random_u64()?
    ));
    let result = (|| -> io::Result<bool> {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        // Exactly 0600 whatever the umask.
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        drop(file);
        // link() fails if the target exists: first writer wins, nobody overwrites.
        let created = match fs::hard_link(&tmp, &path) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
            Err(e) => return Err(e),
        };
        if let Ok(dir) = File::open(state_dir) {
            let _ = dir.sync_all();
        }
        Ok(created)
    })();
    let _ = fs::remove_file(&tmp);
    let created = result.map_err(write_err)?;

    if created {
        tracing::info!(path = %path.display(), "created SSH client key");
        ClientKey::from_private_key(key, Some(path))
    } else {
        // Someone else stored a key first: use theirs.
        let text = read_private(&path)?;
        parse_client_key_file(&path, &text)
    }
}

/// Reads the client key file, not through a symlink, refusing it when others may read it.
fn read_private(path: &Path) -> Result<String> {
    let read = |source| KeyError::Read {
        path: path.to_owned(),
        source,
    };
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(read)?;
    let mode = file.metadata().map_err(read)?.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyError::ClientKeyMode {
            path: path.to_owned(),
            mode,
        });
    }
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(read)?;
    Ok(text)
}

fn parse_client_key_file(path: &Path, text: &str) -> Result<ClientKey> {
    let key = PrivateKey::from_openssh(text).map_err(|e| KeyError::BadClientKey {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    ClientKey::from_private_key(key, Some(path.to_owned())).map_err(|e| KeyError::BadClientKey {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// Makes a fresh ed25519 host key for one builder container.
pub fn generate_host_key() -> Result<HostKey> {
    let key = new_ed25519()?;
    let private_openssh = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| KeyError::Encode(e.to_string()))?
        .to_string();
    Ok(HostKey {
        private_openssh,
        public: key.public_key().clone(),
    })
}

/// Parses an OpenSSH public key line (`ssh-ed25519 AAAA… [comment]`), as stored
/// for a pinned host key. Surrounding whitespace is ignored.
pub fn parse_public_key(openssh_line: &str) -> Result<PublicKey> {
    PublicKey::from_openssh(openssh_line.trim()).map_err(|e| KeyError::BadPublicKey {
        line: openssh_line.to_owned(),
        reason: e.to_string(),
    })
}

/// `SHA256:…` fingerprint of a public key.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// Whether two public keys are the same key (comments are ignored).
pub fn same_key(a: &PublicKey, b: &PublicKey) -> bool {
    a.key_data() == b.key_data()
}

fn public_line(key: &PublicKey) -> Result<String> {
    key.to_openssh()
        .map_err(|e| KeyError::Encode(e.to_string()))
}

fn new_ed25519() -> Result<PrivateKey> {
    let mut seed = [0u8; Ed25519PrivateKey::BYTE_SIZE];
    getrandom::fill(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
    let keypair = Ed25519Keypair::from_seed(&seed);
    seed.fill(0);
    let mut key = PrivateKey::from(keypair);
    key.set_comment(KEY_COMMENT);
    debug_assert_eq!(key.algorithm(), Algorithm::Ed25519);
    Ok(key)
}

fn random_u64() -> Result<u64> {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).map_err(|e| KeyError::Random(e.to_string()))?;
    Ok(u64::from_le_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn client_key_is_made_once_with_private_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state/nested");
        let a = load_or_create_client_key(&dir).unwrap();
        let b = load_or_create_client_key(&dir).unwrap();
        assert_eq!(a.public_openssh(), b.public_openssh());
        assert!(a.public_openssh().starts_with("ssh-ed25519 AAAA"));
        assert!(a.public_openssh().ends_with(" nixdock"));
        let file = dir.join(CLIENT_KEY_FILE);
        assert_eq!(a.path(), Some(file.as_path()));
        let mode = fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dmode = fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(dmode, 0o700);
        // Only the key file is left behind.
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(CLIENT_KEY_FILE)]);
        assert!(
            fs::read_to_string(&file)
                .unwrap()
                .starts_with("-----BEGIN OPENSSH PRIVATE KEY-----")
        );
    }

    #[test]
    fn concurrent_creators_agree() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_owned();
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let dir = dir.clone();
                std::thread::spawn(move || {
                    load_or_create_client_key(&dir)
                        .unwrap()
                        .public_openssh()
                        .to_owned()
                })
            })
            .collect();
        let keys: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert!(keys.iter().all(|k| *k == keys[0]));
    }

    #[test]
    fn corrupt_client_key_says_what_to_do() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join(CLIENT_KEY_FILE), "garbage").unwrap();
        let err = load_or_create_client_key(tmp.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("delete it"), "{err}");
    }

    #[test]
    fn host_key_round_trips() {
        let hk = generate_host_key().unwrap();
        let line = hk.public_openssh();
        assert!(line.starts_with("ssh-ed25519 "));
        let parsed = parse_public_key(&format!("  {line}\n")).unwrap();
        assert!(same_key(&parsed, hk.public_key()));
        let back = HostKey::from_private_openssh(hk.private_openssh()).unwrap();
        assert!(same_key(back.public_key(), hk.public_key()));
        let other = generate_host_key().unwrap();
        assert!(!same_key(other.public_key(), hk.public_key()));
        assert!(parse_public_key("ssh-ed25519 notbase64").is_err());
    }
}
