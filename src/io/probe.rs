//! Choosing the event loop at start-up: probe io_uring, fall back to epoll.
//!
//! io_uring is refused in many places a node runs: qemu-user (ENOSYS), container seccomp
//! profiles (EPERM), `kernel.io_uring_disabled`, kernels older than the features the
//! backend needs. `auto` takes io_uring only when the probe passes and says why not
//! otherwise; `uring` turns a failed probe into a start-up error.

use super::IoKind;

/// What the operator asked for (`tern serve --io`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoRequest {
    Auto,
    Epoll,
    Uring,
}

/// Environment variable that makes the probe fail as if the kernel refused io_uring: a kill
/// switch for kernels with io_uring bugs, and how tests exercise the fallback end to end.
pub const URING_DISABLE_ENV: &str = "TERN_IO_URING_DISABLE";

/// What the log line says of a kernel without IORING_FEAT_MIN_TIMEOUT.
pub const NO_MIN_TIMEOUT: &str =
    "no minimum wait before Linux 6.12: --heartbeat-coalescing has no effect";

/// The loop chosen and the one log line that says which and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    pub kind: IoKind,
    pub log_line: String,
}

/// What a passed probe found: io_uring runs, perhaps without a feature that only makes it
/// cheaper (`limited` names what is missing, for the log line).
pub type ProbeResult = Result<Option<String>, String>;

/// Decides the loop from the request and a probe result (`Err` carries the reason, e.g.
/// "ENOSYS"). The probe runs only when the request needs it. Err: `--io uring` on a node
/// that cannot run it.
pub fn select(
    request: IoRequest,
    probe: impl FnOnce() -> ProbeResult,
) -> Result<Selection, String> {
    match request {
        IoRequest::Epoll => Ok(Selection {
            kind: IoKind::Epoll,
            log_line: "io: epoll (requested)".to_owned(),
        }),
        IoRequest::Uring => match probe() {
            Ok(limited) => Ok(Selection {
                kind: IoKind::Uring,
                log_line: match limited {
                    None => "io: uring (requested)".to_owned(),
                    Some(missing) => format!("io: uring (requested; {missing})"),
                },
            }),
            Err(reason) => Err(format!(
                "--io uring: io_uring unavailable: {reason} (use --io auto or --io epoll)"
            )),
        },
        IoRequest::Auto => match probe() {
            Ok(limited) => Ok(Selection {
                kind: IoKind::Uring,
                log_line: match limited {
                    None => "io: uring".to_owned(),
                    Some(missing) => format!("io: uring ({missing})"),
                },
            }),
            Err(reason) => Ok(Selection {
                kind: IoKind::Epoll,
                log_line: format!("io: epoll (io_uring unavailable: {reason})"),
            }),
        },
    }
}

/// Probes this process's io_uring: the kill switch, the target, then the kernel.
pub fn probe_uring() -> ProbeResult {
    if std::env::var_os(URING_DISABLE_ENV).is_some_and(|v| !v.is_empty()) {
        return Err(format!("disabled by {URING_DISABLE_ENV}"));
    }
    probe_kernel()
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn probe_kernel() -> ProbeResult {
    super::uring::probe()
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn probe_kernel() -> ProbeResult {
    Err("not built for this target".to_owned())
}

/// "ENOSYS" rather than "Function not implemented (os error 38)": the names operators
/// search for.
pub fn errno_name(error: &std::io::Error) -> String {
    let name = match error.raw_os_error() {
        Some(libc::ENOSYS) => "ENOSYS",
        Some(libc::EPERM) => "EPERM",
        Some(libc::EACCES) => "EACCES",
        Some(libc::EINVAL) => "EINVAL",
        Some(libc::ENOMEM) => "ENOMEM",
        Some(libc::EOPNOTSUPP) => "EOPNOTSUPP",
        Some(libc::EFAULT) => "EFAULT",
        Some(libc::EMFILE) => "EMFILE",
        _ => return error.to_string(),
    };
    name.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enosys() -> ProbeResult {
        Err(errno_name(&std::io::Error::from_raw_os_error(libc::ENOSYS)))
    }

    #[test]
    fn auto_falls_back_to_epoll_when_the_probe_fails() {
        let selection = select(IoRequest::Auto, enosys).unwrap();
        assert_eq!(selection.kind, IoKind::Epoll);
        assert_eq!(
            selection.log_line,
            "io: epoll (io_uring unavailable: ENOSYS)"
        );
    }

    #[test]
    fn auto_takes_uring_when_the_probe_passes() {
        let selection = select(IoRequest::Auto, || Ok(None)).unwrap();
        assert_eq!(selection.kind, IoKind::Uring);
        assert_eq!(selection.log_line, "io: uring");
    }

    #[test]
    fn a_kernel_without_an_optional_feature_runs_uring_and_says_what_is_missing() {
        let limited = || Ok(Some(NO_MIN_TIMEOUT.to_owned()));
        let selection = select(IoRequest::Auto, limited).unwrap();
        assert_eq!(selection.kind, IoKind::Uring);
        assert_eq!(selection.log_line, format!("io: uring ({NO_MIN_TIMEOUT})"));
        let selection = select(IoRequest::Uring, limited).unwrap();
        assert_eq!(selection.kind, IoKind::Uring);
        assert_eq!(
            selection.log_line,
            format!("io: uring (requested; {NO_MIN_TIMEOUT})")
        );
    }

    #[test]
    fn requested_uring_that_fails_is_an_error_naming_the_reason() {
        let error = select(IoRequest::Uring, enosys).unwrap_err();
        assert!(error.contains("ENOSYS"), "{error}");
    }

    #[test]
    fn requested_epoll_never_probes() {
        let selection = select(IoRequest::Epoll, || panic!("probed")).unwrap();
        assert_eq!(selection.kind, IoKind::Epoll);
    }

    #[test]
    fn errno_names_fall_back_to_the_message() {
        assert_eq!(
            errno_name(&std::io::Error::from_raw_os_error(libc::EPERM)),
            "EPERM"
        );
        let other = std::io::Error::other("strange");
        assert_eq!(errno_name(&other), "strange");
    }
}
