//! The zip container of a torch checkpoint: layouts, reader and writer.

pub mod reader;
pub mod spec;
pub mod writer;
