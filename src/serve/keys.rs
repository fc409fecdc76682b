//! The endpoint's own files in `<state>/serve/`: its host key (made once) and the clients'
//! public keys it serves (`authorized_keys`, OpenSSH format).

use std::path::{Path, PathBuf};

use russh::keys::PublicKey;

use crate::state::{StateDir, write_private};
use crate::transport::keys::{self, HostKey};

pub const HOST_KEY_FILE: &str = "host_key";
pub const AUTHORIZED_KEYS_FILE: &str = "authorized_keys";

#[derive(Debug, thiserror::Error)]
pub enum ServeKeyError {
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Bad { path: PathBuf, reason: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ServeKeyError + '_ {
    move |source| ServeKeyError::Io {
        path: path.to_owned(),
        source,
    }
}

/// `<state>/serve`, made private and checked as the rest of the state directory.
pub fn serve_dir(state: &StateDir) -> Result<PathBuf, ServeKeyError> {
    Ok(state.private_subdir("serve")?)
}

/// The endpoint's host key: read from `<state>/serve/host_key`, or made and written there (0600)
/// the first time, so clients can pin it for good.
pub fn load_or_create_host_key(state: &StateDir) -> Result<HostKey, ServeKeyError> {
    let path = serve_dir(state)?.join(HOST_KEY_FILE);
    if !path.exists() {
        let key = keys::generate_host_key().map_err(|e| ServeKeyError::Bad {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        // A private temporary name and a hard link: two first starts at once keep one key.
        let tmp = path.with_extension(format!("new{}", std::process::id()));
        write_private(&tmp, key.private_openssh().as_bytes(), 0o600).map_err(io(&tmp))?;
        let linked = std::fs::hard_link(&tmp, &path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io(&path)(e)),
        }
    }
    state.check_private_file(&path)?;
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    HostKey::from_private_openssh(&text).map_err(|e| ServeKeyError::Bad {
        path,
        reason: e.to_string(),
    })
}

/// The keys listed in `authorized_keys` (none when the file does not exist). A line with
/// options before the key (`from=…`, `command=…`) is skipped with a warning: serve would not
/// enforce them, so it does not grant what they restrict.
pub fn authorized_keys(state: &StateDir) -> Result<Vec<PublicKey>, ServeKeyError> {
    let path = serve_dir(state)?.join(AUTHORIZED_KEYS_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(&path)(e)),
    };
    state.check_private_file(&path)?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match keys::parse_public_key(line) {
            Ok(k) => out.push(k),
            Err(e) => tracing::warn!(
                "{}:{}: not used (only plain `<type> <base64> [comment]` lines are): {e}",
                path.display(),
                n + 1
            ),
        }
    }
    Ok(out)
}

/// Adds the public key in `pub_file` (one OpenSSH line) to `authorized_keys`, unless it is
/// there already. Returns whether it was added.
pub fn authorize(state: &StateDir, pub_file: &Path) -> Result<bool, ServeKeyError> {
    let text = std::fs::read_to_string(pub_file).map_err(io(pub_file))?;
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let [line] = lines.as_slice() else {
        return Err(ServeKeyError::Bad {
            path: pub_file.to_owned(),
            reason: format!(
                "expected one public key line (`ssh-ed25519 AAAA… comment`), found {}",
                lines.len()
            ),
        });
    };
    let key = keys::parse_public_key(line).map_err(|e| ServeKeyError::Bad {
        path: pub_file.to_owned(),
        reason: format!("not an OpenSSH public key: {e}"),
    })?;
    // Read, add, write under a lock: two `--authorize` at once must both be kept.
    let _lock = crate::state::FileLock::exclusive(&state.lock_path("serve-authorized-keys"))?;
    if authorized_keys(state)?
        .iter()
        .any(|k| keys::same_key(k, &key))
    {
        return Ok(false);
    }
    let path = serve_dir(state)?.join(AUTHORIZED_KEYS_FILE);
    let mut contents = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(io(&path)(e)),
    };
    if !contents.is_empty() && !contents.ends_with('\n') {
        contents.push('\n');
    }
    contents.push_str(line);
    contents.push('\n');
    write_private(&path, contents.as_bytes(), 0o600).map_err(io(&path))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_key_is_made_once_and_private() {
        let d = tempfile::tempdir().unwrap();
        let state = StateDir::open(d.path().join("s")).unwrap();
        let a = load_or_create_host_key(&state).unwrap();
        let b = load_or_create_host_key(&state).unwrap();
        assert_eq!(a.public_openssh(), b.public_openssh());
        use std::os::unix::fs::PermissionsExt;
        let m = std::fs::metadata(state.path().join("serve/host_key")).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn authorize_validates_and_dedups() {
        let d = tempfile::tempdir().unwrap();
        let state = StateDir::open(d.path().join("s")).unwrap();
        assert!(authorized_keys(&state).unwrap().is_empty());
        let k = keys::generate_host_key().unwrap();
        let f = d.path().join("k.pub");
        std::fs::write(&f, format!("{}\n", k.public_openssh())).unwrap();
        assert!(authorize(&state, &f).unwrap());
        assert!(!authorize(&state, &f).unwrap());
        let got = authorized_keys(&state).unwrap();
        assert_eq!(got.len(), 1);
        assert!(keys::same_key(&got[0], k.public_key()));
        std::fs::write(&f, "not a key\n").unwrap();
        assert!(authorize(&state, &f).is_err());
        // Options before the key are not honoured, so the line grants nothing.
        let path = state.path().join("serve/authorized_keys");
        std::fs::write(
            &path,
            format!(
                "command=\"true\" {}\n",
                keys::generate_host_key().unwrap().public_openssh()
            ),
        )
        .unwrap();
        assert!(authorized_keys(&state).unwrap().is_empty());
    }
}
