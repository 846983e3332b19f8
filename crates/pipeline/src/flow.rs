//! Flow control shared by the producers: the bound on messages in flight, and the rate limit.
//!
//! Every message takes one in-flight permit when a producer hands it out and gives it back when
//! it is acknowledged, so the pipeline never holds more than `bound` messages, however many batch
//! keys or slow sinks there are. Producers only ask their source for as many messages as they
//! hold permits for.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::stage::{later, until};

pub(crate) struct InFlight {
    bound: AtomicUsize,
    current: AtomicUsize,
    peak: AtomicUsize,
    released: Notify,
    /// The fewest free permits a waiting producer can use (`usize::MAX` when none waits).
    waiting_for: AtomicUsize,
}

impl InFlight {
    pub fn new(bound: usize) -> Self {
        Self {
            bound: AtomicUsize::new(bound),
            current: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            released: Notify::new(),
            waiting_for: AtomicUsize::new(usize::MAX),
        }
    }

    pub fn bound(&self) -> usize {
        self.bound.load(Ordering::Acquire)
    }

    /// Moves the bound (a resized pool can hold more, or less). Below what is held now, no
    /// permit is handed out until enough are given back.
    pub fn set_bound(&self, bound: usize) {
        self.bound.store(bound, Ordering::Release);
        self.released.notify_one();
    }

    pub fn current(&self) -> usize {
        self.current.load(Ordering::Acquire)
    }

    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Acquire)
    }

    fn try_acquire_up_to(&self, want: usize) -> usize {
        let mut cur = self.current.load(Ordering::Acquire);
        loop {
            let n = want.min(self.bound().saturating_sub(cur));
            if n == 0 {
                return 0;
            }
            match self.current.compare_exchange_weak(
                cur,
                cur + n,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return n,
                Err(actual) => cur = actual,
            }
        }
    }

    /// How many free permits wake a waiting producer: enough for a worthwhile call to
    /// `produce`, so that acknowledging many small batches wakes it once, not once per batch.
    fn wake_at(&self) -> usize {
        (self.bound() / 16).clamp(1, 128)
    }

    /// Takes between 1 and `want` permits, waiting until `want` or a worthwhile number of them
    /// (see `wake_at`) are free.
    pub async fn acquire_up_to(&self, want: usize) -> usize {
        debug_assert!(want > 0);
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            let enough = want.min(self.wake_at());
            self.waiting_for.fetch_min(enough, Ordering::AcqRel);
            if self.bound().saturating_sub(self.current()) >= enough {
                let n = self.try_acquire_up_to(want);
                if n > 0 {
                    // Another waiter wanting less is still woken at `wake_at` free permits.
                    self.waiting_for.store(usize::MAX, Ordering::Release);
                    if self.current() < self.bound() {
                        // Permits are left: pass the wake-up on to another waiting producer.
                        self.released.notify_one();
                    }
                    return n;
                }
            }
            released.await;
        }
    }

    /// Notes the permits held now as a candidate peak. Producers call it once what they
    /// reserved is either handed out or given back, so reservations never count as peaks.
    pub fn record_peak(&self) {
        self.peak.fetch_max(self.current(), Ordering::AcqRel);
    }

    pub fn release(&self, n: usize) {
        if n > 0 {
            let held = self.current.fetch_sub(n, Ordering::AcqRel) - n;
            let free = self.bound().saturating_sub(held);
            // Lock-free when nobody waits, unlike notify_waiters; a waiter that finds permits
            // left over wakes the next one.
            if free >= self.wake_at().min(self.waiting_for.load(Ordering::Acquire)) {
                self.released.notify_one();
            }
        }
    }
}

/// Broadway's rate limiter: at most `allowed` messages per `interval`, one shared counter that
/// refills at the start of each interval. It can be changed while the pipeline runs, and a
/// pipeline built without a limit has one that lets everything through.
pub(crate) struct RateLimiter {
    /// Read on every produce call: an unlimited pipeline never takes the lock.
    limited: AtomicBool,
    window: Mutex<Window>,
    /// Wakes producers waiting out a window when the limit changes.
    changed: Notify,
}

struct Window {
    allowed: usize,
    interval: Duration,
    remaining: usize,
    ends: Option<Instant>,
}

impl RateLimiter {
    pub(crate) fn new(allowed: usize, interval: Duration) -> Self {
        let limiter = Self::unlimited();
        limiter.set(allowed, interval);
        limiter
    }

    pub(crate) fn unlimited() -> Self {
        Self {
            limited: AtomicBool::new(false),
            window: Mutex::new(Window {
                allowed: usize::MAX,
                interval: Duration::ZERO,
                remaining: usize::MAX,
                ends: None,
            }),
            changed: Notify::new(),
        }
    }

    fn window(&self) -> std::sync::MutexGuard<'_, Window> {
        self.window.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn is_limited(&self) -> bool {
        self.limited.load(Ordering::Acquire)
    }

    /// The limit, or None when there is none.
    pub(crate) fn limit(&self) -> Option<(usize, Duration)> {
        if !self.limited.load(Ordering::Acquire) {
            return None;
        }
        let w = self.window();
        Some((w.allowed, w.interval))
    }

    /// Replaces the limit at once: a new window starts now with `allowed` messages, and a
    /// producer waiting for the old window's end stops waiting for it (Broadway's
    /// `update_rate_limiting` leaves the old interval running, its issue #300). The caller has
    /// checked that neither is zero.
    pub(crate) fn set(&self, allowed: usize, interval: Duration) {
        {
            let mut w = self.window();
            w.allowed = allowed;
            w.interval = interval;
            w.remaining = allowed;
            w.ends = Some(later(Instant::now(), interval));
        }
        self.limited.store(true, Ordering::Release);
        self.changed.notify_waiters();
    }

    /// Takes between 1 and `want` tokens, waiting for the next interval when none are left.
    pub(crate) async fn acquire_up_to(&self, want: usize) -> usize {
        loop {
            if !self.limited.load(Ordering::Acquire) {
                return want;
            }
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let wait_until = {
                let mut w = self.window();
                let now = Instant::now();
                match w.ends {
                    Some(ends) if now < ends => {}
                    _ => {
                        w.remaining = w.allowed;
                        w.ends = Some(later(now, w.interval));
                    }
                }
                if w.remaining > 0 {
                    let n = want.min(w.remaining);
                    w.remaining -= n;
                    return n;
                }
                w.ends
            };
            tokio::select! {
                () = until(wait_until) => {}
                () = changed => {}
            }
        }
    }

    /// Gives back tokens that were taken but not used.
    pub(crate) fn refund(&self, n: usize) {
        if n > 0 && self.limited.load(Ordering::Acquire) {
            let mut w = self.window();
            w.remaining = w.remaining.saturating_add(n).min(w.allowed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn rate_limiter_allows_per_interval() {
        let rl = RateLimiter::new(5, Duration::from_secs(1));
        let start = Instant::now();
        let mut got = 0;
        let mut stamps = Vec::new();
        while got < 12 {
            got += rl.acquire_up_to(3).await;
            stamps.push((start.elapsed().as_millis(), got));
        }
        // 5 in the first second, 5 in the second, 2 in the third.
        assert_eq!(
            stamps,
            vec![(0, 3), (0, 5), (1000, 8), (1000, 10), (2000, 13)]
        );
    }

    #[tokio::test]
    async fn in_flight_never_exceeds_bound() {
        let f = InFlight::new(10);
        assert_eq!(f.acquire_up_to(7).await, 7);
        assert_eq!(f.acquire_up_to(7).await, 3);
        assert_eq!(f.current(), 10);
        f.release(4);
        assert_eq!(f.acquire_up_to(100).await, 4);
        f.record_peak();
        assert_eq!(f.peak(), 10);
    }
}
