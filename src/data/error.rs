//! Typed errors for reading and writing data; every message names the file (and row or key).

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}:{line}: {msg}")]
    Row { path: PathBuf, line: usize, msg: String },
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    #[error("{0}")]
    Msg(String),
}

impl DataError {
    pub fn msg(m: impl Into<String>) -> Self {
        DataError::Msg(m.into())
    }
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        DataError::Io { path: path.to_path_buf(), source }
    }
    pub fn row(path: &Path, line: usize, msg: impl Into<String>) -> Self {
        DataError::Row { path: path.to_path_buf(), line, msg: msg.into() }
    }
    pub fn file(path: &Path, msg: impl Into<String>) -> Self {
        DataError::File { path: path.to_path_buf(), msg: msg.into() }
    }
}
