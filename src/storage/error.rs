//! `StoreError`: what a store operation can fail with, and which operation failed.
//!
//! This file only classifies errors; it must not retry, log or recover from them. The
//! translations it makes are LMDB's `MapFull` into `StoreError::Full` and a file system's
//! `ENOSPC`/`EDQUOT` into `StoreError::DiskFull`, because a full map or disk is an operating
//! condition the sender is told about (`storage_full`), not a failure of the disk.

use std::fmt;

/// A failed store operation.
#[derive(Debug)]
pub enum StoreError {
    /// The LMDB map is full: nothing was written. The operator must grow `map_size`.
    Full,
    /// The file system holding the store has no room (`ENOSPC` or `EDQUOT`) while doing
    /// `op`: nothing was written. Writes go ahead again once space is freed.
    DiskFull { op: &'static str },
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
    /// Wraps an LMDB error from `op`, turning `MapFull` into `StoreError::Full` and a full
    /// disk into `StoreError::DiskFull`.
    pub(crate) fn lmdb(op: &'static str) -> impl FnOnce(heed::Error) -> StoreError {
        move |error| match error {
            heed::Error::Mdb(heed::MdbError::MapFull) => StoreError::Full,
            heed::Error::Io(ref io) if is_disk_full(io) => StoreError::DiskFull { op },
            error => StoreError::Lmdb { op, error },
        }
    }

    /// Wraps a file system error from `op`, turning a full disk into `StoreError::DiskFull`.
    pub(crate) fn from_io(op: &'static str, error: std::io::Error) -> StoreError {
        if is_disk_full(&error) {
            StoreError::DiskFull { op }
        } else {
            StoreError::Io { op, error }
        }
    }

    /// Whether the sender should hear `storage_full` (the map or the disk is full: an
    /// operating condition that passes when the operator makes room) rather than
    /// `storage_failed`.
    pub fn is_full(&self) -> bool {
        matches!(self, StoreError::Full | StoreError::DiskFull { .. })
    }
}

fn is_disk_full(error: &std::io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Full => f.write_str("store full: the LMDB map size is reached"),
            StoreError::DiskFull { op } => {
                write!(f, "disk full in {op}: the store's file system has no room")
            }
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
            | StoreError::DiskFull { .. }
            | StoreError::AlreadyExists
            | StoreError::InvalidArgument(_)
            | StoreError::Corrupt(_)
            | StoreError::Busy(_) => None,
        }
    }
}
