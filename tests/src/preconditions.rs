//! Whether this machine can run the end-to-end tests at all, and a polite
//! skip when it cannot — except under CI, which installs everything, where
//! a missing prerequisite is a failure.
use std::path::Path;
use std::sync::OnceLock;

use crate::plugin::REFERENCE_DIR;

/// Why the suite cannot run here, or `None` if it can.
pub fn missing_prerequisite() -> Option<&'static str> {
    static REASON: OnceLock<Option<String>> = OnceLock::new();
    REASON
        .get_or_init(|| {
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } != 0 {
                return Some(
                    "not root (network namespaces need CAP_NET_ADMIN/CAP_SYS_ADMIN)".into(),
                );
            }
            for bin in ["bridge", "host-local"] {
                let p = Path::new(REFERENCE_DIR).join(bin);
                if !p.is_file() {
                    return Some(format!(
                        "{} is missing (apt-get install containernetworking-plugins)",
                        p.display()
                    ));
                }
            }
            for tool in ["ip", "nsenter"] {
                let found = std::env::var("PATH")
                    .unwrap_or_default()
                    .split(':')
                    .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"])
                    .any(|d| Path::new(d).join(tool).is_file());
                if !found {
                    return Some(format!("`{tool}` is not installed"));
                }
            }
            None
        })
        .as_deref()
}

/// True if the tests can run; otherwise prints why this test is skipped.
/// Under CI (`CI` set, as CI runs `.ci/run`) a missing prerequisite fails
/// the test instead: a green run must mean the tests ran.
pub fn ready() -> bool {
    match missing_prerequisite() {
        None => true,
        Some(why) => {
            let name = std::thread::current().name().unwrap_or("test").to_string();
            if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
                panic!("{name} cannot run under CI: {why}");
            }
            eprintln!("SKIPPED {name}: {why}");
            false
        }
    }
}

/// First line of an end-to-end test: returns from the test (passing, with a
/// SKIPPED message) when the machine cannot run it.
#[macro_export]
macro_rules! require_e2e {
    () => {
        if !$crate::preconditions::ready() {
            return;
        }
    };
}
