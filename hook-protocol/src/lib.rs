//! Every byte format nixdock speaks with Nix: the build-hook channel, the worker and serve
//! protocols, NAR archives, store paths, hashes and `.drv` files. No Docker, SSH or policy here.

pub mod derivation;
pub mod framed;
pub mod hash;
pub mod hook;
pub mod log;
pub mod machines;
pub mod nar;
pub mod store_path;
pub mod wire;
pub mod worker;
