//! nixdock: Nix's build hook, served by Docker builders over SSH.
pub mod local_store;
pub mod transport;
