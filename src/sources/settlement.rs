//! The settlement both broker sources share, so that a message ends the same way whichever
//! broker it came from: which delivery each pipeline message is (a table keyed by the
//! message's `ack_data`), how each ended — acknowledged, or dead-lettered with its reason and
//! attempts, or given back to the broker (a [`Redeliver`] failure, an abandoned message, or a
//! dead letter that cannot be stored) — the user's acknowledger told after, and the counts. A
//! broker brings only its I/O ([`BrokerIo`]).
//!
//! Retries are not decided here: the pipeline's stages retry a failed message in process under
//! their retry policy, so a message that reaches the acknowledger failed has used its attempts
//! (or failed permanently). A source asks for a redelivery only where a dead letter would lose
//! a message that is not at fault: one that failed with [`Redeliver`] (it could not be decided
//! where and when it was handled: its zone's lease moved on, its zone's owner did not answer),
//! one the pipeline abandoned (it stopped before finishing it), and one whose dead letter could
//! not be stored. JetStream's comes back after the source's backoff, RabbitMQ's at once (a
//! requeue carries no delay).

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{Decoder, Delivery, SourceMetrics};
use crate::pipeline::{Acknowledger, Failure, Message, RetryPolicy};

/// A message that could not be decided where and when it was handled, through no fault of its
/// own: given back to its broker, to be delivered again (perhaps to another node), rather than
/// dead-lettered. What it is for: the node lost the zone's lease before the command's events
/// were logged (fenced off), or the zone's owner on another node did not answer, or answered
/// that it could not decide yet (`unavailable`). A refusal of the command itself is not one: it
/// fails as it is, and is dead-lettered.
///
/// As a [`Failure`] it is permanent: the stage does not retry it in process (the broker's
/// delivery is the retry, after the source's backoff where the broker can wait), and its
/// reason starts with `redeliver: `, which is how the settlement knows it ([`redelivers`]).
#[derive(Debug, thiserror::Error)]
#[error("redeliver: {0}")]
pub struct Redeliver(pub String);

/// What the reason of a [`Redeliver`] failure starts with.
const REDELIVER_PREFIX: &str = "redeliver: ";

impl From<Redeliver> for Failure {
    fn from(redeliver: Redeliver) -> Self {
        Failure::permanent(redeliver.to_string())
    }
}

/// Whether `failure` is a [`Redeliver`]: its message goes back to the broker.
pub fn redelivers(failure: &Failure) -> bool {
    failure.reason().starts_with(REDELIVER_PREFIX)
}

/// Whether a message that failed so goes back to the broker: a [`Redeliver`], or a message the
/// pipeline abandoned (it stopped before finishing it: nothing was decided, and a node that
/// stops must not dead-letter what another would handle).
fn gives_back(failure: &Failure) -> bool {
    redelivers(failure) || failure.is_abandoned()
}

/// Why a message is dead-lettered.
pub(crate) struct DeadLetter {
    /// The failure's reason ([`REASON_HEADER`](super::REASON_HEADER)).
    pub reason: String,
    /// The message's attempts in the pipeline ([`ATTEMPTS_HEADER`](super::ATTEMPTS_HEADER));
    /// None for a message the decoder refused, which never entered it.
    pub attempts: Option<u32>,
}

/// A broker's side of the settlement: the I/O, and nothing it decides. Each call says whether
/// the broker took what it was asked to; one it did not take is counted `settle_failed`, and
/// the broker delivers that message again.
pub(crate) trait BrokerIo: Send + 'static {
    /// What the source keeps of a delivery until it is settled.
    type Held: Send + 'static;

    /// Acknowledges deliveries whose messages succeeded; returns how many the broker took.
    fn ack(&mut self, held: Vec<Self::Held>) -> impl Future<Output = u64> + Send;

    /// Publishes a dead letter for each delivery (all sent before any confirmation is waited
    /// for); returns each with whether its dead letter is stored.
    fn store(
        &mut self,
        dead: Vec<(Self::Held, DeadLetter)>,
    ) -> impl Future<Output = Vec<(Self::Held, bool)>> + Send;

    /// Settles a delivery whose dead letter is stored, for good (`+TERM`, `basic.ack`).
    fn finish(&mut self, held: Self::Held) -> impl Future<Output = bool> + Send;

    /// Gives a delivery back for a later delivery, after `delay` where the broker can wait
    /// (`-NAK`, `basic.nack` with requeue).
    fn give_back(&mut self, held: Self::Held, delay: Duration)
    -> impl Future<Output = bool> + Send;
}

/// A delivery in the pipeline.
pub(crate) struct Held<H> {
    pub io: H,
    /// Which delivery of the message it is (1 for the first): how long a give-back waits.
    pub delivery: u32,
}

enum Settlement<H> {
    Ack(H),
    DeadLetter(Held<H>, DeadLetter),
    /// A [`Redeliver`] failure, or an abandoned message: back to the broker.
    GiveBack(Held<H>),
}

/// A source's acknowledger, shared by the source and every message it handed out.
pub(crate) struct Settler<T, H> {
    held: Mutex<HashMap<u64, Held<H>>>,
    next_key: AtomicU64,
    /// The user's acknowledger, told after the settlement is decided.
    then: OnceLock<Arc<dyn Acknowledger<T>>>,
    jobs: mpsc::UnboundedSender<Vec<Settlement<H>>>,
    metrics: SourceMetrics,
}

impl<T: Send + 'static, H: Send + 'static> Settler<T, H> {
    /// The acknowledger, and the task that does its I/O with `io`: the task ends once the
    /// acknowledger is gone (the source and all its messages) and everything is settled.
    /// A give-back waits `backoff.delay(delivery - 1)` where the broker can wait.
    pub fn start<B: BrokerIo<Held = H>>(
        io: B,
        backoff: RetryPolicy,
        metrics: SourceMetrics,
    ) -> (Arc<Self>, JoinHandle<()>) {
        let (jobs, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(settle(io, rx, backoff, metrics.clone()));
        let settler = Arc::new(Self {
            held: Mutex::new(HashMap::new()),
            next_key: AtomicU64::new(1),
            then: OnceLock::new(),
            jobs,
            metrics,
        });
        (settler, task)
    }

    /// Has `acker` told how each message ended, after its settlement is decided. Set once.
    pub fn then_acknowledge(&self, acker: Arc<dyn Acknowledger<T>>) {
        let _ = self.then.set(acker);
    }

    /// Counts a delivery taken from the broker (`received`, and `redelivered` after the first).
    pub fn received(&self, delivery: u32) {
        self.metrics.message("received", 1);
        if delivery > 1 {
            self.metrics.message("redelivered", 1);
        }
    }

    /// Holds a delivery until its message is settled: the message to hand out.
    pub fn message(self: &Arc<Self>, data: T, io: H, delivery: u32) -> Message<T> {
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        self.table().insert(key, Held { io, delivery });
        Message::with_ack_data(data, self.clone(), key)
    }

    /// Dead-letters a delivery the decoder refused, which never enters the pipeline.
    pub fn undecodable(&self, io: H, delivery: u32, failure: &Failure) {
        let dead = DeadLetter {
            reason: failure.reason().to_owned(),
            attempts: None,
        };
        self.send(vec![Settlement::DeadLetter(Held { io, delivery }, dead)]);
    }

    /// The deliveries in the pipeline, by key.
    pub fn table(&self) -> MutexGuard<'_, HashMap<u64, Held<H>>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn send(&self, job: Vec<Settlement<H>>) {
        if let Err(lost) = self.jobs.send(job) {
            // Only if the settling task panicked: the broker delivers these again.
            tracing::error!("a source's settling task is gone; messages not settled");
            self.metrics.message("settle_failed", lost.0.len() as u64);
        }
    }
}

impl<T: Send + 'static, H: Send + 'static> Acknowledger<T> for Settler<T, H> {
    fn ack(&self, successful: Vec<Message<T>>, failed: Vec<Message<T>>) {
        let mut job = Vec::with_capacity(successful.len() + failed.len());
        let mut unknown = 0;
        {
            let mut held = self.table();
            for m in &successful {
                match held.remove(&m.ack_data()) {
                    Some(h) => job.push(Settlement::Ack(h.io)),
                    None => unknown += 1,
                }
            }
            for m in &failed {
                match held.remove(&m.ack_data()) {
                    Some(h) if m.failure().is_some_and(gives_back) => {
                        job.push(Settlement::GiveBack(h));
                    }
                    Some(h) => {
                        let dead = DeadLetter {
                            reason: m.failure().map_or("failed", Failure::reason).to_owned(),
                            attempts: Some(m.attempts()),
                        };
                        job.push(Settlement::DeadLetter(h, dead));
                    }
                    None => unknown += 1,
                }
            }
        }
        if unknown > 0 {
            tracing::error!(
                "{unknown} messages this source does not hold cannot be settled; the broker \
                 delivers them again"
            );
            self.metrics.message("settle_failed", unknown);
        }
        if !job.is_empty() {
            self.send(job);
        }
        if let Some(then) = self.then.get() {
            then.ack(successful, failed);
        }
    }
}

/// Settles what the acknowledger decided, in order, until the acknowledger is gone.
async fn settle<B: BrokerIo>(
    mut io: B,
    mut jobs: mpsc::UnboundedReceiver<Vec<Settlement<B::Held>>>,
    backoff: RetryPolicy,
    metrics: SourceMetrics,
) {
    while let Some(job) = jobs.recv().await {
        let mut acks = Vec::new();
        let mut back = Vec::new();
        let mut dead = Vec::new();
        let mut why = Vec::new();
        for settlement in job {
            match settlement {
                Settlement::Ack(h) => acks.push(h),
                Settlement::GiveBack(h) => back.push(h),
                Settlement::DeadLetter(h, letter) => {
                    why.push((h.delivery, letter.attempts.is_some()));
                    dead.push((h.io, letter));
                }
            }
        }
        if !acks.is_empty() {
            let asked = acks.len() as u64;
            let taken = io.ack(acks).await;
            metrics.message("acked", taken);
            metrics.message("settle_failed", asked.saturating_sub(taken));
        }
        for h in back {
            let delay = backoff.delay(h.delivery.saturating_sub(1));
            let outcome = if io.give_back(h.io, delay).await {
                "given_back"
            } else {
                "settle_failed"
            };
            metrics.message(outcome, 1);
        }
        if dead.is_empty() {
            continue;
        }
        let stored = io.store(dead).await;
        for ((held, stored), (delivery, entered)) in stored.into_iter().zip(why) {
            let outcome = if stored {
                match (io.finish(held).await, entered) {
                    (true, true) => "dead_lettered",
                    (true, false) => "undecodable",
                    (false, _) => "settle_failed",
                }
            } else {
                let delay = backoff.delay(delivery.saturating_sub(1));
                tracing::warn!(
                    "a dead letter could not be stored; the message is given back to the broker"
                );
                if io.give_back(held, delay).await {
                    "retried"
                } else {
                    "settle_failed"
                }
            };
            metrics.message(outcome, 1);
        }
    }
}

/// Runs the user's decoder on a delivery; a decoder that panics refuses the message (with the
/// panic's message), rather than taking the source down with it.
pub(crate) fn decode<T: 'static>(
    decoder: &dyn Decoder<T>,
    delivery: &Delivery<'_>,
) -> Result<T, Failure> {
    catch_unwind(AssertUnwindSafe(|| decoder.decode(delivery)))
        .unwrap_or_else(|panic| Err(Failure::panicked("the decoder", &*panic)))
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::pipeline::Jitter;

    /// A broker that records what it was asked, and stores dead letters only while `stores`.
    #[derive(Clone, Default)]
    struct Recorded {
        stores: bool,
        calls: Arc<Mutex<Vec<String>>>,
    }

    impl BrokerIo for Recorded {
        type Held = &'static str;

        async fn ack(&mut self, held: Vec<&'static str>) -> u64 {
            let mut calls = self.calls.lock().unwrap();
            calls.extend(held.iter().map(|h| format!("ack {h}")));
            held.len() as u64
        }

        async fn store(
            &mut self,
            dead: Vec<(&'static str, DeadLetter)>,
        ) -> Vec<(&'static str, bool)> {
            let mut calls = self.calls.lock().unwrap();
            dead.into_iter()
                .map(|(h, d)| {
                    calls.push(format!("dead {h} {:?} {:?}", d.reason, d.attempts));
                    (h, self.stores)
                })
                .collect()
        }

        async fn finish(&mut self, held: &'static str) -> bool {
            self.calls.lock().unwrap().push(format!("finish {held}"));
            true
        }

        async fn give_back(&mut self, held: &'static str, delay: Duration) -> bool {
            let ms = delay.as_millis();
            self.calls
                .lock()
                .unwrap()
                .push(format!("give back {held} {ms}"));
            true
        }
    }

    async fn settle_all(stores: bool, delivery: u32) -> (Vec<String>, SourceMetrics) {
        let io = Recorded {
            stores,
            ..Recorded::default()
        };
        let calls = io.calls.clone();
        let metrics = SourceMetrics::unregistered("test");
        let backoff =
            RetryPolicy::unlimited(Duration::from_millis(100), 2.0, Duration::from_secs(1))
                .with_jitter(Jitter::None);
        let (settler, task) = Settler::<u32, &'static str>::start(io, backoff, metrics.clone());
        let ok = settler.message(1, "ok", delivery);
        let mut failed = settler.message(2, "failed", delivery);
        failed.fail(Failure::retryable("busy"));
        let stranger = Message::new(3);
        settler.undecodable("junk", delivery, &Failure::permanent("not a number"));
        settler.ack(vec![ok, stranger], vec![failed]);
        drop(settler);
        task.await.unwrap();
        let calls = calls.lock().unwrap().clone();
        (calls, metrics)
    }

    #[tokio::test]
    async fn each_message_is_acked_or_dead_lettered_once_with_its_reason_and_attempts() {
        let (calls, metrics) = settle_all(true, 1).await;
        assert_eq!(
            calls,
            [
                "dead junk \"not a number\" None",
                "finish junk",
                "ack ok",
                // The message's own count: none made here, outside a pipeline.
                "dead failed \"busy\" Some(0)",
                "finish failed",
            ]
        );
        assert_eq!(metrics.messages("acked"), 1);
        assert_eq!(metrics.messages("dead_lettered"), 1);
        assert_eq!(metrics.messages("undecodable"), 1);
        assert_eq!(
            metrics.messages("settle_failed"),
            1,
            "the message it never held"
        );
        assert_eq!(metrics.messages("retried"), 0);
    }

    #[tokio::test]
    async fn a_dead_letter_not_stored_gives_the_message_back_after_the_backoff() {
        // The third delivery waits the backoff's third delay: 100 ms, 200 ms, then 400 ms.
        let (calls, metrics) = settle_all(false, 3).await;
        assert!(
            calls.contains(&"give back junk 400".to_owned()),
            "{calls:?}"
        );
        assert!(
            calls.contains(&"give back failed 400".to_owned()),
            "{calls:?}"
        );
        assert!(!calls.iter().any(|c| c.starts_with("finish")), "{calls:?}");
        assert_eq!(metrics.messages("retried"), 2);
        assert_eq!(metrics.messages("dead_lettered"), 0);
    }

    #[tokio::test]
    async fn a_message_not_decided_or_abandoned_is_given_back_not_dead_lettered() {
        let io = Recorded {
            stores: true,
            ..Recorded::default()
        };
        let calls = io.calls.clone();
        let metrics = SourceMetrics::unregistered("test");
        let backoff =
            RetryPolicy::unlimited(Duration::from_millis(100), 2.0, Duration::from_secs(1))
                .with_jitter(Jitter::None);
        let (settler, task) = Settler::<u32, &'static str>::start(io, backoff, metrics.clone());
        // The second delivery of a command whose zone's lease moved on before it was logged,
        // beside one its zone refused.
        let mut fenced = settler.message(1, "fenced", 2);
        fenced.fail(Redeliver("zone 7's lease has moved on".into()).into());
        let mut refused = settler.message(2, "refused", 2);
        refused.fail(Failure::permanent(
            "invalid_payload: amount must be at least 1",
        ));
        // One the pipeline stopped before finishing.
        let mut abandoned = settler.message(3, "abandoned", 1);
        abandoned.fail(Failure::abandoned());
        settler.ack(Vec::new(), vec![fenced, refused, abandoned]);
        drop(settler);
        task.await.unwrap();
        let calls = calls.lock().unwrap().clone();
        assert_eq!(
            calls,
            [
                // The second delivery waits the backoff's second delay.
                "give back fenced 200",
                "give back abandoned 100",
                "dead refused \"invalid_payload: amount must be at least 1\" Some(0)",
                "finish refused",
            ]
        );
        assert_eq!(metrics.messages("given_back"), 2);
        assert_eq!(metrics.messages("dead_lettered"), 1);
        assert_eq!(metrics.messages("retried"), 0);
    }

    #[test]
    fn a_redeliver_failure_is_known_by_its_reason_and_not_retried_in_process() {
        let failure = Failure::from(Redeliver("the zone's owner did not answer".into()));
        assert!(redelivers(&failure));
        assert!(!failure.is_retryable());
        assert_eq!(
            failure.reason(),
            "redeliver: the zone's owner did not answer"
        );
        assert!(!redelivers(&Failure::retryable(
            "unavailable: the zone's owner did not answer"
        )));
    }

    #[test]
    fn a_panicking_decoder_refuses_the_message() {
        let decoder = |_: &Delivery<'_>| -> Result<u32, Failure> { panic!("boom") };
        let delivery = Delivery {
            payload: b"",
            content_type: None,
            message_id: None,
            subject: "s",
            attempt: 1,
        };
        let e = decode(&decoder, &delivery).unwrap_err();
        assert_eq!(e.reason(), "the decoder panicked: boom");
        assert!(!e.is_retryable());
    }
}
