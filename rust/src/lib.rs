//! fastserial's native core: PyTorch's zip checkpoint container, read and written.
//!
//! The format code (`container`, `endian`, `storage`, `pickle`, `atomic`) is plain
//! Rust with no Python in it, tested with `cargo test`. The `python` module (behind
//! the `python` feature, which maturin enables) is the only place that touches PyO3.

pub mod atomic;
pub mod container;
pub mod endian;
pub mod error;
pub mod pickle;
pub mod storage;

#[cfg(feature = "python")]
mod python;

pub use container::reader::{
    Archive, Compression, FileSource, FileWindow, MemorySource, ReadJob, Record, Source,
};
pub use container::writer::ArchiveWriter;
pub use error::{Error, Result};
