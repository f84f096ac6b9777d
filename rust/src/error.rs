//! One error type for the crate. Each variant's message says what is wrong and where;
//! the Python boundary (`python/errors.rs`) turns them into `CheckpointError` or `OSError`.

use std::io;

/// Everything that can go wrong reading or writing a checkpoint container.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system error while reading or writing, with what we were doing.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },

    /// The bytes do not form a valid zip archive (or not one we can read).
    #[error("not a valid checkpoint archive: {0}")]
    Malformed(String),

    /// A record (zip entry) is damaged: bad header, out-of-bounds data, bad CRC, ...
    #[error("record '{record}': {reason}")]
    BadRecord { record: String, reason: String },

    /// A record the checkpoint needs is not in the archive.
    #[error("record '{0}' is missing from the archive")]
    MissingRecord(String),

    /// The archive reads differently in torch's zip reader (miniz) and in other zip
    /// readers: two end records, zip64 and classic end records that disagree, duplicate
    /// or case-colliding names, overlapping records, ... Refused rather than guessed.
    #[error("ambiguous archive, refused: {0}")]
    Ambiguous(String),

    /// A limit that protects against hostile input was exceeded.
    #[error("refused: {0}")]
    LimitExceeded(String),

    /// The pickle inside the checkpoint is malformed.
    #[error("malformed pickle: {0}")]
    Pickle(String),

    /// The caller used the API wrongly (e.g. writing after finish).
    #[error("{0}")]
    Usage(String),
}

impl Error {
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub fn bad_record(record: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::BadRecord {
            record: record.into(),
            reason: reason.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
