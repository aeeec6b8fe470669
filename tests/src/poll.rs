//! Waiting for a condition with a deadline instead of sleeping a guessed time.
use std::time::{Duration, Instant};

/// Default deadline for kernel state to settle (e.g. a veth vanishing after
/// its namespace is deleted).
pub const SETTLE: Duration = Duration::from_secs(10);

/// Polls `f` every 10 ms until it returns `Some`, or panics after `timeout`
/// naming `what`.
#[track_caller]
pub fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Polls until `f` is true, or panics after `timeout`.
#[track_caller]
pub fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    wait_until(what, timeout, || f().then_some(()))
}
