//! The one mapping from crate errors to Python exceptions.
//!
//! Bad files raise `fastserial.CheckpointError` (a `RuntimeError`, so existing
//! `except RuntimeError` clauses keep working); operating-system failures raise the
//! matching `OSError` subclass. Every message starts with the file it is about.

use pyo3::create_exception;
use pyo3::exceptions::{
    PyFileExistsError, PyFileNotFoundError, PyIsADirectoryError, PyOSError, PyPermissionError,
    PyRuntimeError,
};
use pyo3::PyErr;
use std::io::ErrorKind;

use crate::error::Error;

create_exception!(
    fastserial,
    CheckpointError,
    PyRuntimeError,
    "A checkpoint is malformed, truncated, corrupted or inconsistent. The message names the file and the record."
);

/// An error together with the file it concerns.
pub struct FileError<'a>(pub &'a str, pub Error);

impl From<FileError<'_>> for PyErr {
    fn from(FileError(file, err): FileError<'_>) -> PyErr {
        let msg = format!("{file}: {err}");
        match &err {
            Error::Io { source, .. } => {
                if source.kind() == ErrorKind::UnexpectedEof {
                    // A short read is a truncated checkpoint, not an OS failure.
                    return CheckpointError::new_err(format!(
                        "{msg} (the file ends early: truncated?)"
                    ));
                }
                // OSError(errno, message) sets .errno, so callers can test for ENOSPC.
                match (source.kind(), source.raw_os_error()) {
                    (ErrorKind::NotFound, Some(code)) => PyFileNotFoundError::new_err((code, msg)),
                    (ErrorKind::PermissionDenied, Some(code)) => {
                        PyPermissionError::new_err((code, msg))
                    }
                    (ErrorKind::AlreadyExists, Some(code)) => {
                        PyFileExistsError::new_err((code, msg))
                    }
                    (ErrorKind::IsADirectory, Some(code)) => {
                        PyIsADirectoryError::new_err((code, msg))
                    }
                    (_, Some(code)) => PyOSError::new_err((code, msg)),
                    (ErrorKind::NotFound, None) => PyFileNotFoundError::new_err(msg),
                    (ErrorKind::IsADirectory, None) => PyIsADirectoryError::new_err(msg),
                    _ => PyOSError::new_err(msg),
                }
            }
            _ => CheckpointError::new_err(msg),
        }
    }
}

/// Shorthand: `result.map_err(at(file))?`.
pub fn at(file: &str) -> impl Fn(Error) -> PyErr + '_ {
    move |e| FileError(file, e).into()
}
