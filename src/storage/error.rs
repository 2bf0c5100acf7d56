//! `StoreError`: what a store operation can fail with, and which operation failed.
//!
//! This file only classifies errors; it must not retry, log or recover from them. The one
//! translation it makes is LMDB's `MapFull` into `StoreError::Full`, because a full map is
//! an operating condition the sender is told about, not a failure of the disk.

use std::fmt;

/// A failed store operation.
#[derive(Debug)]
pub enum StoreError {
    /// The LMDB map is full: nothing was written. The operator must grow `map_size`.
    Full,
    /// `add_user` with a name that is already taken.
    AlreadyExists,
    /// A caller passed a value the store refuses (empty or over-long name, zero map size).
    /// Names what was wrong.
    InvalidArgument(&'static str),
    /// Stored bytes break the schema (wrong value length, missing message, gap in a
    /// timeline). Names what was found broken.
    Corrupt(&'static str),
    /// A passing condition kept the operation from running (says which); retry it.
    Busy(&'static str),
    /// LMDB failed while doing `op`.
    Lmdb {
        op: &'static str,
        error: heed::Error,
    },
    /// The file system failed while doing `op`.
    Io {
        op: &'static str,
        error: std::io::Error,
    },
}

impl StoreError {
    /// Wraps an LMDB error from `op`, turning `MapFull` into `StoreError::Full`.
    pub(crate) fn lmdb(op: &'static str) -> impl FnOnce(heed::Error) -> StoreError {
        move |error| match error {
            heed::Error::Mdb(heed::MdbError::MapFull) => StoreError::Full,
            error => StoreError::Lmdb { op, error },
        }
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Full => f.write_str("store full: the LMDB map size is reached"),
            StoreError::AlreadyExists => f.write_str("already exists"),
            StoreError::InvalidArgument(what) => write!(f, "invalid argument: {what}"),
            StoreError::Corrupt(what) => write!(f, "store corrupt: {what}"),
            StoreError::Busy(what) => write!(f, "store busy: {what}; retry"),
            StoreError::Lmdb { op, error } => write!(f, "lmdb error in {op}: {error}"),
            StoreError::Io { op, error } => write!(f, "i/o error in {op}: {error}"),
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StoreError::Lmdb { error, .. } => Some(error),
            StoreError::Io { error, .. } => Some(error),
            StoreError::Full
            | StoreError::AlreadyExists
            | StoreError::InvalidArgument(_)
            | StoreError::Corrupt(_)
            | StoreError::Busy(_) => None,
        }
    }
}
