//! Deterministic crash points for the crash-safety tests.
//!
//! In debug builds, `CNI_EBPF_CRASH_AT=<point>` makes the process kill
//! itself with SIGKILL when it reaches `<point>` — the same as an OOM kill or
//! a node reboot at exactly that instant, with no destructor or cleanup
//! running. Release builds compile the check out.

/// Dies here if the environment names this point (debug builds only).
#[inline]
pub fn point(name: &str) {
    #[cfg(debug_assertions)]
    if std::env::var("CNI_EBPF_CRASH_AT").is_ok_and(|v| v == name) {
        log::warn!("crash point {name}: SIGKILL");
        let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGKILL);
    }
    #[cfg(not(debug_assertions))]
    let _ = name;
}

/// Panics here if the environment names this point (debug builds only):
/// a bug in a background thread, for the tests of what the agent does
/// about it.
#[inline]
pub fn panic_point(name: &str) {
    #[cfg(debug_assertions)]
    if std::env::var("CNI_EBPF_PANIC_AT").is_ok_and(|v| v == name) {
        panic!("panic point {name}");
    }
    #[cfg(not(debug_assertions))]
    let _ = name;
}
