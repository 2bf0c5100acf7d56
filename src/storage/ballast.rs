//! Disk space the writer sets aside, so that a node whose disk fills up still applies its
//! journal and answers reads while new content is refused.
//!
//! At start the writer holds `<data>/ballast`, a file of `DISK_BALLAST_BYTES` with its
//! blocks allocated. When a transaction fails because the file system is full
//! (`StoreError::DiskFull`), the writer deletes the ballast and stops taking new content
//! (sends, group changes, read marks, file commits answer `storage_full` without a
//! transaction); the space it freed lets the journal's apply, device acks and account
//! changes (logout, revocation) go on, so reads and security never wait for the operator.
//! Once the file system has `DISK_FREE_RESUME_BYTES` free beyond the ballast again (checked
//! at most every `DISK_FULL_CHECK_MS`), the ballast is taken back and content is accepted.
//!
//! This module must not touch the LMDB files, and must not decide which ops are content
//! (the writer does).

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::limits::{DISK_BALLAST_BYTES, DISK_FREE_RESUME_BYTES, DISK_FULL_CHECK_MS};

/// The writer's view of its disk: holding the ballast (normal), or full.
#[derive(Debug)]
pub(crate) struct Ballast {
    path: PathBuf,
    /// The file system was found full and the ballast was given up; new content is refused.
    full: bool,
    /// When the free space was last checked while full.
    checked: Option<Instant>,
}

impl Ballast {
    /// Takes the ballast in `data_dir`, creating it if it is missing or short. On a disk
    /// too full for it, starts out full (and says so).
    pub(crate) fn take(data_dir: &Path) -> Ballast {
        let mut ballast = Ballast {
            path: data_dir.join("ballast"),
            full: false,
            checked: None,
        };
        if let Err(e) = ballast.create() {
            eprintln!(
                "tern: store writer: cannot set aside {} MiB of disk ({e}); \
                 new content is refused until there is room",
                DISK_BALLAST_BYTES >> 20
            );
            ballast.full = true;
        }
        ballast
    }

    /// Whether new content is refused.
    pub(crate) fn is_full(&self) -> bool {
        self.full
    }

    /// The disk is full: gives the ballast's space back to the file system for what must
    /// still be written, and refuses new content from now on.
    pub(crate) fn release(&mut self) {
        if self.full {
            return;
        }
        self.full = true;
        self.checked = Some(Instant::now());
        match std::fs::remove_file(&self.path) {
            Ok(()) => eprintln!(
                "tern: store writer: disk full; released {} MiB set aside for the journal \
                 and reads; sends are refused (storage_full) until space is freed",
                DISK_BALLAST_BYTES >> 20
            ),
            Err(e) => eprintln!("tern: store writer: disk full; ballast not released: {e}"),
        }
    }

    /// While full, at most every `DISK_FULL_CHECK_MS`: when the file system has room for the
    /// ballast and `DISK_FREE_RESUME_BYTES` more, takes the ballast back and accepts
    /// content again. Returns whether content is accepted.
    pub(crate) fn recheck(&mut self, now: Instant) -> bool {
        if !self.full {
            return true;
        }
        if self
            .checked
            .is_some_and(|at| now.duration_since(at) < Duration::from_millis(DISK_FULL_CHECK_MS))
        {
            return false;
        }
        self.checked = Some(now);
        let dir = self.path.parent().unwrap_or(Path::new("."));
        match free_bytes(dir) {
            Ok(free) if free >= DISK_BALLAST_BYTES + DISK_FREE_RESUME_BYTES => {}
            _ => return false,
        }
        match self.create() {
            Ok(()) => {
                self.full = false;
                eprintln!("tern: store writer: disk has room again; sends are accepted");
                true
            }
            Err(_) => false,
        }
    }

    /// Writes the ballast file with its blocks allocated (`fallocate`, or zeros where the
    /// file system cannot allocate without writing), and syncs it.
    fn create(&self) -> std::io::Result<()> {
        let mut file = File::options()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&self.path)?;
        let outcome = allocate(&mut file);
        if outcome.is_err() {
            // A partial ballast would hold space the disk needs; take it all or nothing.
            drop(file);
            let _ = std::fs::remove_file(&self.path);
        }
        outcome
    }
}

fn allocate(file: &mut File) -> std::io::Result<()> {
    let len = i64::try_from(DISK_BALLAST_BYTES).expect("ballast size fits an off_t");
    // SAFETY: fallocate only reads its integer arguments; the descriptor is open for
    // writing and owned by `file`.
    let rc = unsafe { libc::fallocate64(file.as_raw_fd(), 0, 0, len) };
    if rc != 0 {
        let error = std::io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::EOPNOTSUPP) {
            return Err(error);
        }
        file.set_len(0)?;
        let zeros = [0u8; 64 * 1024];
        let mut left = DISK_BALLAST_BYTES;
        while left > 0 {
            let n = left.min(zeros.len() as u64) as usize;
            file.write_all(&zeros[..n])?;
            left -= n as u64;
        }
    }
    file.sync_all()
}

/// Bytes an unprivileged writer may still allocate on the file system holding `dir`.
fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs64>::uninit();
    // SAFETY: `path` is a NUL-terminated string and `stat` points to writable memory of
    // the right type; statvfs64 writes it only on success.
    let rc = unsafe { libc::statvfs64(path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: rc == 0, so statvfs64 filled the struct.
    let stat = unsafe { stat.assume_init() };
    // f_frsize is a c_ulong: 32 bits on armv7, where this conversion is not useless.
    #[allow(clippy::useless_conversion)]
    let frsize = u64::from(stat.f_frsize);
    Ok(stat.f_bavail.saturating_mul(frsize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ballast_is_held_released_and_taken_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut ballast = Ballast::take(dir.path());
        assert!(!ballast.is_full());
        let path = dir.path().join("ballast");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), DISK_BALLAST_BYTES);
        ballast.release();
        assert!(ballast.is_full());
        assert!(!path.exists());
        // Checked at most every DISK_FULL_CHECK_MS.
        let released = ballast.checked.unwrap();
        assert!(!ballast.recheck(released));
        let later = released + Duration::from_millis(DISK_FULL_CHECK_MS);
        assert!(ballast.recheck(later), "this disk has room");
        assert!(!ballast.is_full());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), DISK_BALLAST_BYTES);
    }
}
