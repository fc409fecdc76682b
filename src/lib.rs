//! nixdock: Nix's build hook, served by Docker builders over SSH.
pub mod builder;
pub mod cli;
pub mod config;
pub mod fs_beneath;
pub mod hook;
pub mod local_daemon;
pub mod local_store;
pub mod logfile;
pub mod nix_tools;
pub mod policy;
pub mod printable;
pub mod serve;
pub mod state;
pub mod static_machines;
pub mod transport;
