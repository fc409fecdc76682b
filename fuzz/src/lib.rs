//! Helpers shared by the fuzz targets.

use std::future::Future;
use std::sync::OnceLock;

use hook_protocol::worker::ProtocolVersion;

/// Runs `f` to completion on one current-thread runtime per process (with a blocking pool,
/// which NAR unpacking uses).
pub fn block_on<F: Future>(f: F) -> F::Output {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a tokio runtime")
    })
    .block_on(f)
}

/// Every worker protocol minor version the client negotiates (1.21 to 1.38), picked by a byte.
pub fn version_from(b: u8) -> ProtocolVersion {
    let span = ProtocolVersion::LATEST.minor() - ProtocolVersion::MIN.minor() + 1;
    ProtocolVersion::new(1, ProtocolVersion::MIN.minor() + b % span)
}

/// The byte [`version_from`] maps to `minor` (for writing seeds).
pub fn version_byte(minor: u8) -> u8 {
    minor - ProtocolVersion::MIN.minor()
}
