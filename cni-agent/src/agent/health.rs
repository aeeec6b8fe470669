//! Whether the agent's background work is alive. The datapath worker (uplink
//! rescans, NAT expiry, the port-exhaustion report) beats once per interval;
//! the socket server answers STATUS with code 50 when it has stopped or
//! stalled, and stops the agent (non-zero exit, for its supervisor to
//! restart it) when it has stopped: an agent that serves plugins while its
//! uplinks are never rescanned and its NAT table never expires would fail
//! quietly.
use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

#[derive(Debug)]
struct Inner {
    start: Instant,
    /// Milliseconds since `start` of the last beat.
    last_beat_ms: AtomicU64,
    stopped: AtomicBool,
}

/// Shared between the worker and the server.
#[derive(Clone, Debug)]
pub struct Health {
    inner: Arc<Inner>,
    interval: Duration,
}

impl Health {
    pub fn new(interval: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                start: Instant::now(),
                last_beat_ms: AtomicU64::new(0),
                stopped: AtomicBool::new(false),
            }),
            interval,
        }
    }

    /// The worker finished a round.
    pub fn beat(&self) {
        let ms = self.inner.start.elapsed().as_millis() as u64;
        self.inner.last_beat_ms.store(ms, Ordering::Relaxed);
    }

    /// Marks the worker stopped when dropped (its thread ended, normally or
    /// by a panic).
    pub fn worker_guard(&self) -> WorkerGuard {
        WorkerGuard(self.clone())
    }

    pub fn worker_stopped(&self) -> bool {
        self.inner.stopped.load(Ordering::Relaxed)
    }

    /// What is wrong, if anything: the worker stopped, or has not beaten
    /// for three intervals (plus slack for a busy machine).
    pub fn problem(&self) -> Option<String> {
        if self.worker_stopped() {
            return Some("the datapath worker (uplink scan, NAT expiry) has stopped".into());
        }
        let now = self.inner.start.elapsed();
        let last = Duration::from_millis(self.inner.last_beat_ms.load(Ordering::Relaxed));
        let idle = now.saturating_sub(last);
        (idle > self.interval * 3 + Duration::from_secs(5)).then(|| {
            format!(
                "the datapath worker (uplink scan, NAT expiry) has not run for {} s",
                idle.as_secs()
            )
        })
    }
}

/// See [`Health::worker_guard`].
pub struct WorkerGuard(Health);

impl Drop for WorkerGuard {
    fn drop(&mut self) {
        self.0.inner.stopped.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stopped_worker_is_a_problem() {
        let h = Health::new(Duration::from_secs(1));
        h.beat();
        assert_eq!(h.problem(), None);
        let guard = h.worker_guard();
        let t = std::thread::spawn(move || {
            let _g = guard;
            panic!("a bug in the worker");
        });
        assert!(t.join().is_err());
        assert!(h.worker_stopped());
        assert!(h.problem().is_some_and(|p| p.contains("stopped")));
    }

    #[test]
    fn a_stalled_worker_is_a_problem() {
        let h = Health::new(Duration::from_millis(1));
        // Never beat, and the slack is 5 s: not yet.
        assert_eq!(h.problem(), None);
    }
}
