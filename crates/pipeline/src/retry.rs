//! Retry policy: how many attempts a stage makes and how long it waits between them.
//!
//! Delays grow exponentially (`initial_delay × multiplier^n`, capped at `max_delay`), a sequence
//! that `backon` computes; with full jitter (the default) each wait is drawn uniformly from
//! zero to that cap, which spreads out retries that failed together. `backon`'s own jitter adds
//! up to one more delay on top instead, which can exceed `max_delay`, so it is not used.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use tokio::sync::watch;

use super::error::ConfigError;
use super::stage::draining;

/// Whether waits are randomised.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Jitter {
    /// Each wait is uniform in `[0, cap]`.
    #[default]
    Full,
    /// Each wait is exactly the cap: predictable, for tests and for single clients.
    None,
}

/// How a stage retries a message whose handler returned a retryable failure.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Total attempts, the first included. 1 means no retry.
    pub max_attempts: u32,
    pub initial_delay: Duration,
    pub multiplier: f32,
    pub max_delay: Duration,
    pub jitter: Jitter,
}

impl Default for RetryPolicy {
    /// No retries: a retryable failure goes straight to the dead-letter sink.
    fn default() -> Self {
        Self::none()
    }
}

impl RetryPolicy {
    pub fn none() -> Self {
        Self {
            max_attempts: 1,
            initial_delay: Duration::from_millis(100),
            multiplier: 2.0,
            max_delay: Duration::from_secs(10),
            jitter: Jitter::Full,
        }
    }

    /// Up to `max_attempts` attempts in all, waiting `initial_delay`, then `multiplier` times
    /// longer each time, never more than `max_delay`, with full jitter.
    pub fn exponential(
        max_attempts: u32,
        initial_delay: Duration,
        multiplier: f32,
        max_delay: Duration,
    ) -> Self {
        Self {
            max_attempts,
            initial_delay,
            multiplier,
            max_delay,
            jitter: Jitter::Full,
        }
    }

    /// Attempts without end, waits growing as in [`exponential`](Self::exponential). A drain
    /// still ends them: a message waiting to retry gets one last attempt, then is dead-lettered.
    pub fn unlimited(initial_delay: Duration, multiplier: f32, max_delay: Duration) -> Self {
        Self::exponential(u32::MAX, initial_delay, multiplier, max_delay)
    }

    pub fn with_jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    pub(crate) fn validate(&self, stage: &str) -> Result<(), ConfigError> {
        let invalid = |reason: &str| {
            Err(ConfigError::Invalid {
                what: format!("{stage} retry"),
                reason: reason.to_owned(),
            })
        };
        if self.max_attempts == 0 {
            return invalid("max_attempts must be at least 1 (1 means no retry)");
        }
        if !(self.multiplier.is_finite() && self.multiplier >= 1.0) {
            return invalid("multiplier must be a finite number >= 1.0");
        }
        if self.initial_delay > self.max_delay {
            return invalid("initial_delay must not exceed max_delay");
        }
        Ok(())
    }

    /// The upper bound of the wait before retry number `n` (0-based), without jitter.
    pub fn cap(&self, n: u32) -> Duration {
        let exp = self.multiplier.powi(n.min(i32::MAX as u32) as i32);
        let cap = Duration::try_from_secs_f32(self.initial_delay.as_secs_f32() * exp)
            .unwrap_or(self.max_delay)
            .min(self.max_delay);
        to_whole_millis(cap)
    }

    /// The wait before retry number `n` (0-based), jitter included: for a message that waits
    /// on its own, without an iterator to keep.
    pub fn delay(&self, n: u32) -> Duration {
        let cap = self.cap(n);
        match self.jitter {
            Jitter::None => cap,
            Jitter::Full => cap.mul_f64(fastrand::f64()),
        }
    }

    /// The waits between attempts, one per retry: `max_attempts - 1` of them.
    pub fn delays(&self) -> Delays {
        let caps = ExponentialBuilder::new()
            .with_min_delay(self.initial_delay)
            .with_factor(self.multiplier)
            .with_max_delay(self.max_delay)
            .with_max_times(self.max_attempts.saturating_sub(1) as usize)
            .build();
        Delays {
            caps,
            jitter: self.jitter,
            rng: fastrand::Rng::new(),
        }
    }
}

/// The wait before each retry, in order.
#[derive(Debug)]
pub struct Delays {
    caps: ExponentialBackoff,
    jitter: Jitter,
    rng: fastrand::Rng,
}

impl Iterator for Delays {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let cap = to_whole_millis(self.caps.next()?);
        Some(match self.jitter {
            Jitter::None => cap,
            Jitter::Full => cap.mul_f64(self.rng.f64()),
        })
    }
}

/// backon computes in f32 seconds, so 100 ms × 2 comes out a few nanoseconds over 200 ms, which
/// a millisecond timer rounds up to 201 ms. Timers resolve milliseconds anyway.
fn to_whole_millis(d: Duration) -> Duration {
    if d < Duration::from_millis(1) {
        return d;
    }
    Duration::from_millis((d.as_secs_f64() * 1000.0).round() as u64)
}

/// Waits out a retry's backoff; false when a drain cut it short.
pub(crate) async fn backoff(delay: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    if draining(stop) {
        return false;
    }
    tokio::select! {
        () = tokio::time::sleep(delay) => true,
        () = async { let _ = stop.wait_for(|&s| s).await; } => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_grow_then_saturate() {
        let p = RetryPolicy::exponential(
            6,
            Duration::from_millis(100),
            2.0,
            Duration::from_millis(500),
        )
        .with_jitter(Jitter::None);
        let d: Vec<_> = p.delays().map(|d| d.as_millis()).collect();
        assert_eq!(d, vec![100, 200, 400, 500, 500]);
        for (n, ms) in d.iter().enumerate() {
            assert_eq!(p.cap(n as u32).as_millis(), *ms);
        }
    }

    #[test]
    fn full_jitter_stays_under_the_cap_and_varies() {
        let p =
            RetryPolicy::exponential(4, Duration::from_millis(100), 3.0, Duration::from_secs(1));
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            for (n, d) in p.delays().enumerate() {
                assert!(d <= p.cap(n as u32), "{d:?} over cap {:?}", p.cap(n as u32));
                seen.insert(d);
            }
        }
        assert!(seen.len() > 100, "jitter should spread the waits");
    }

    #[test]
    fn rejects_impossible_policies() {
        assert!(
            RetryPolicy::exponential(0, Duration::ZERO, 2.0, Duration::ZERO)
                .validate("x")
                .is_err()
        );
        assert!(
            RetryPolicy::exponential(3, Duration::ZERO, 0.5, Duration::ZERO)
                .validate("x")
                .is_err()
        );
        assert!(
            RetryPolicy::exponential(3, Duration::from_secs(2), 2.0, Duration::from_secs(1))
                .validate("x")
                .is_err()
        );
    }
}
