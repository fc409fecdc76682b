//! Builder lifecycle on Docker: finding the engine, deciding what each system's container looks
//! like, creating/reusing/recreating it, counting its build slots across processes, and proving
//! it ready over SSH.

pub mod container_log;
pub mod engine;
pub mod known_engines;
pub mod lifecycle;
pub mod pool;
pub mod provision;
pub mod sandbox;
pub mod slots;
pub mod systems;

pub use engine::{Engine, EngineError};
pub use lifecycle::{BuilderError, Builders, NoPullObserver, PullObserver, ReadyBuilder};
pub use provision::BuilderSpec;
