//! Transport from the hook to builder containers: SSH (russh) with pinned,
//! per-container host keys and one client key kept in the state directory.

pub mod keys;
pub mod ssh;

pub use keys::{
    ClientKey, HostKey, KeyError, generate_host_key, load_or_create_client_key, parse_public_key,
};
pub use russh::keys::PublicKey;
pub use ssh::{
    ConnectPhase, ExecChannel, ExecOutput, ExecStdin, ExitStatus, ExitWaiter, SshError, SshSession,
    connect,
};
