//! Retry policy: how many attempts a stage makes and how long it waits between them.
//!
//! Delays grow exponentially (`initial_delay × multiplier^n`, capped at `max_delay`), a sequence
//! that `backon` computes; with full jitter (the default) each wait is drawn uniformly from
//! zero to that cap, which spreads out retries that failed together. `backon`'s own jitter adds
//! up to one more delay on top instead, which can exceed `max_delay`, so it is not used.

use std::fmt;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tokio::sync::watch;

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

/// How many attempts something gets and how long it waits between them: a stage retrying a
/// message whose handler failed retryably, a broker source reconnecting.
///
/// In a file (`[processors.retry]`, say) it is a table with the keys `max_attempts` (a number
/// of at least 1, or `"unlimited"`), `initial_delay_ms`, `multiplier` (at least 1.0),
/// `max_delay_ms` and `jitter` (`true` for full jitter); an omitted key takes
/// [`RetryPolicy::default`]'s value, and an impossible policy is refused while parsing.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    max_attempts: u32,
    initial_delay: Duration,
    multiplier: f32,
    max_delay: Duration,
    jitter: Jitter,
}

/// Why a retry policy cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRetryPolicy {
    #[error("max_attempts must be at least 1 (1 means no retry)")]
    NoAttempt,
    #[error("multiplier must be a finite number of at least 1.0")]
    Multiplier,
    #[error("initial_delay must not exceed max_delay")]
    InitialAboveMax,
}

impl Default for RetryPolicy {
    /// No retries: a retryable failure goes straight to the dead-letter sink. Waits (should
    /// `max_attempts` be raised in a file) from 100 ms, doubling, up to 10 s, with full jitter.
    fn default() -> Self {
        Self::none()
    }
}

/// `max_attempts` of [`RetryPolicy::unlimited`].
const UNLIMITED: u32 = u32::MAX;

impl RetryPolicy {
    /// One attempt, no retry.
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
    /// still ends a stage's retries: a message waiting to retry gets one last attempt, then is
    /// dead-lettered.
    pub fn unlimited(initial_delay: Duration, multiplier: f32, max_delay: Duration) -> Self {
        Self::exponential(UNLIMITED, initial_delay, multiplier, max_delay)
    }

    pub fn with_jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    /// Total attempts, the first included: 1 means no retry; `u32::MAX` means unlimited.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    pub fn is_unlimited(&self) -> bool {
        self.max_attempts == UNLIMITED
    }

    pub fn initial_delay(&self) -> Duration {
        self.initial_delay
    }

    pub fn multiplier(&self) -> f32 {
        self.multiplier
    }

    pub fn max_delay(&self) -> Duration {
        self.max_delay
    }

    pub fn jitter(&self) -> Jitter {
        self.jitter
    }

    /// Whether the policy can be followed: at least one attempt, a finite multiplier of at
    /// least 1.0, and an initial delay no longer than the longest.
    pub fn validate(&self) -> Result<(), InvalidRetryPolicy> {
        if self.max_attempts == 0 {
            return Err(InvalidRetryPolicy::NoAttempt);
        }
        if !(self.multiplier.is_finite() && self.multiplier >= 1.0) {
            return Err(InvalidRetryPolicy::Multiplier);
        }
        if self.initial_delay > self.max_delay {
            return Err(InvalidRetryPolicy::InitialAboveMax);
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

    /// The wait before retry number `n` (0-based), jitter included: for something that waits
    /// on its own, without an iterator to keep.
    pub fn delay(&self, n: u32) -> Duration {
        let cap = self.cap(n);
        match self.jitter {
            Jitter::None => cap,
            Jitter::Full => cap.mul_f64(fastrand::f64()),
        }
    }

    /// The waits between attempts, one per retry, jitter included: `max_attempts - 1` of them
    /// (without end for an unlimited policy).
    pub fn delays(&self) -> impl Iterator<Item = Duration> + Send + 'static {
        let caps = ExponentialBuilder::new()
            .with_min_delay(self.initial_delay)
            .with_factor(self.multiplier)
            .with_max_delay(self.max_delay);
        let caps = if self.is_unlimited() {
            caps.without_max_times()
        } else {
            caps.with_max_times(self.max_attempts.saturating_sub(1) as usize)
        };
        Delays {
            caps: caps.build(),
            jitter: self.jitter,
            rng: fastrand::Rng::new(),
        }
    }
}

/// The wait before each retry, in order.
struct Delays {
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

/// A retry policy as a file writes it: the keys of the [`RetryPolicy`] documentation.
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct RetryFile {
    max_attempts: Attempts,
    initial_delay_ms: u64,
    #[serde(deserialize_with = "multiplier")]
    multiplier: f32,
    max_delay_ms: u64,
    jitter: bool,
}

impl Default for RetryFile {
    fn default() -> Self {
        Self::from(&RetryPolicy::default())
    }
}

impl From<&RetryPolicy> for RetryFile {
    fn from(p: &RetryPolicy) -> Self {
        Self {
            max_attempts: Attempts(p.max_attempts),
            initial_delay_ms: millis(p.initial_delay),
            multiplier: p.multiplier,
            max_delay_ms: millis(p.max_delay),
            jitter: p.jitter == Jitter::Full,
        }
    }
}

/// Durations are whole milliseconds in files.
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl<'de> Deserialize<'de> for RetryPolicy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let file = RetryFile::deserialize(d)?;
        let policy = Self {
            max_attempts: file.max_attempts.0,
            initial_delay: Duration::from_millis(file.initial_delay_ms),
            multiplier: file.multiplier,
            max_delay: Duration::from_millis(file.max_delay_ms),
            jitter: if file.jitter {
                Jitter::Full
            } else {
                Jitter::None
            },
        };
        // Here, so that a file's error names the line of the policy, in the file's words.
        policy.validate().map_err(|e| match e {
            InvalidRetryPolicy::InitialAboveMax => {
                serde::de::Error::custom("initial_delay_ms must not exceed max_delay_ms")
            }
            other => serde::de::Error::custom(other),
        })?;
        Ok(policy)
    }
}

impl Serialize for RetryPolicy {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        RetryFile::from(self).serialize(s)
    }
}

/// Refused where it is written, rather than at the policy's table.
fn multiplier<'de, D: Deserializer<'de>>(d: D) -> Result<f32, D::Error> {
    let m = f32::deserialize(d)?;
    if m.is_finite() && m >= 1.0 {
        Ok(m)
    } else {
        Err(serde::de::Error::custom(format!(
            "multiplier must be a number of at least 1.0, not {m}"
        )))
    }
}

/// `max_attempts` in a file: a number of at least 1, or `"unlimited"`.
#[derive(Clone, Copy)]
struct Attempts(u32);

impl<'de> Deserialize<'de> for Attempts {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl serde::de::Visitor<'_> for Visit {
            type Value = Attempts;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number of attempts of at least 1, or \"unlimited\"")
            }

            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Attempts, E> {
                match u32::try_from(n) {
                    Ok(n) if (1..UNLIMITED).contains(&n) => Ok(Attempts(n)),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Signed(n), &self)),
                }
            }

            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Attempts, E> {
                self.visit_i64(i64::try_from(n).unwrap_or(-1))
            }

            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Attempts, E> {
                if s == "unlimited" {
                    Ok(Attempts(UNLIMITED))
                } else {
                    Err(E::invalid_value(serde::de::Unexpected::Str(s), &self))
                }
            }
        }
        d.deserialize_any(Visit)
    }
}

impl Serialize for Attempts {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0 == UNLIMITED {
            s.serialize_str("unlimited")
        } else {
            s.serialize_u32(self.0)
        }
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
                .validate()
                .is_err()
        );
        assert!(
            RetryPolicy::exponential(3, Duration::ZERO, 0.5, Duration::ZERO)
                .validate()
                .is_err()
        );
        assert!(
            RetryPolicy::exponential(3, Duration::from_secs(2), 2.0, Duration::from_secs(1))
                .validate()
                .is_err()
        );
    }

    #[test]
    fn unlimited_delays_never_end() {
        let p = RetryPolicy::unlimited(Duration::from_millis(1), 2.0, Duration::from_millis(4))
            .with_jitter(Jitter::None);
        let d: Vec<_> = p.delays().skip(10_000).take(2).collect();
        assert_eq!(d, [Duration::from_millis(4); 2]);
    }

    #[test]
    fn a_file_policy_takes_the_defaults_and_is_checked_while_parsing() {
        let parse = |text: &str| serde_json::from_str::<RetryPolicy>(text);
        assert_eq!(parse("{}").unwrap(), RetryPolicy::default());
        let p = parse(r#"{"max_attempts": "unlimited", "initial_delay_ms": 5, "jitter": false}"#)
            .unwrap();
        assert!(p.is_unlimited());
        assert_eq!(p.initial_delay(), Duration::from_millis(5));
        assert_eq!(p.jitter(), Jitter::None);
        assert_eq!(parse(&serde_json::to_string(&p).unwrap()).unwrap(), p);
        for (text, error) in [
            (r#"{"max_attempts": 0}"#, "at least 1"),
            (r#"{"max_attempts": "forever"}"#, "unlimited"),
            (
                r#"{"multiplier": 0.5}"#,
                "multiplier must be a number of at least 1.0",
            ),
            (
                r#"{"initial_delay_ms": 20000}"#,
                "initial_delay_ms must not exceed max_delay_ms",
            ),
            (r#"{"retries": 3}"#, "unknown field `retries`"),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(error), "{text}: {e}");
        }
    }
}
