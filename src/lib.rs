//! nixdock: Nix's build hook, served by Docker builders over SSH.
pub mod transport;
