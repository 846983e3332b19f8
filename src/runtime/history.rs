//! What a client that drops and joins again missed: each zone's recent events in memory, and
//! the audit log behind them, so a rejoin with `since: {seq, epoch}` is answered with every
//! event after its `seq`, in order, each once, or told plainly that it cannot be.
//!
//! The writer records every event it applies (it is the zone's only writer, so memory holds an
//! unbroken run of the newest ones) and, on a join with `since`, gathers what the client missed
//! before it applies the join: from memory what memory still has, from the log what is older.
//! The missed events follow the join's reply; the topic sink subscribes the connection at the
//! join's own event, so every newer event comes after them.

use std::collections::VecDeque;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Deserialize;

use crate::zone::ZoneEvent;

/// Where a client that joins again left off: the last `seq` it saw, in which `epoch`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Since {
    pub seq: u64,
    pub epoch: String,
}

/// How much history is kept, and how far back a rejoin may reach.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HistoryConfig {
    /// Events kept in memory per zone.
    pub events: usize,
    /// How long an event stays in memory.
    pub age: Duration,
    /// The most events a rejoin may have missed and still be recovered (from memory and the
    /// audit log); past it, the client gets a fresh snapshot.
    pub max: u64,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        Self {
            events: 1_000,
            age: Duration::from_secs(600),
            max: 10_000,
        }
    }
}

/// A zone's newest events, oldest first, with no gap between them.
#[derive(Debug, Default)]
pub struct History {
    events: VecDeque<ZoneEvent>,
}

impl History {
    /// Adds events the zone has just applied, dropping what is past the limits.
    pub fn record(&mut self, events: &[ZoneEvent], config: &HistoryConfig, now: DateTime<Utc>) {
        if let (Some(last), Some(first)) = (self.events.back(), events.first())
            && first.seq != last.seq + 1
        {
            // Not a continuation (cannot happen with one writer; a history with a gap would
            // recover a client into a lie).
            self.events.clear();
        }
        self.events.extend(events.iter().cloned());
        while self.events.len() > config.events {
            self.events.pop_front();
        }
        self.expire(config, now);
    }

    fn expire(&mut self, config: &HistoryConfig, now: DateTime<Utc>) {
        let age = chrono::Duration::from_std(config.age).unwrap_or(chrono::Duration::MAX);
        while self
            .events
            .front()
            .is_some_and(|e| now.signed_duration_since(e.occurred_at) > age)
        {
            self.events.pop_front();
        }
    }

    /// The seq of the oldest event memory still has.
    pub fn first_seq(&mut self, config: &HistoryConfig, now: DateTime<Utc>) -> Option<u64> {
        self.expire(config, now);
        self.events.front().map(|e| e.seq)
    }

    /// The events with `after < seq <= through`, oldest first.
    pub fn between(&self, after: u64, through: u64) -> impl Iterator<Item = &ZoneEvent> {
        self.events
            .iter()
            .skip_while(move |e| e.seq <= after)
            .take_while(move |e| e.seq <= through)
    }
}

/// What a rejoin needs from the audit log before its join is applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Its epoch is not the zone's, it is too far behind, or it claims a seq the zone never
    /// reached: a fresh snapshot, nothing replayed.
    Fresh,
    /// Recoverable: the log must give the events with `after < seq < upto` (none when
    /// `upto == after + 1`); memory has the rest.
    Recover { after: u64, upto: u64 },
}

/// Decides where a rejoin's missed events come from, given the zone's epoch and last seq now
/// and the oldest seq memory has.
pub fn plan(
    since: &Since,
    epoch: &str,
    last: u64,
    memory_first: Option<u64>,
    config: &HistoryConfig,
) -> Plan {
    if since.epoch != epoch || since.seq > last || last - since.seq > config.max {
        return Plan::Fresh;
    }
    // Memory holds an unbroken run up to `last`; before it, the log.
    let upto = memory_first
        .unwrap_or(last + 1)
        .min(last + 1)
        .max(since.seq + 1);
    Plan::Recover {
        after: since.seq,
        upto,
    }
}

/// Whether `events` are exactly the seqs `after + 1 .. upto`, in order.
pub fn complete(events: &[ZoneEvent], after: u64, upto: u64) -> bool {
    events.len() as u64 == upto - after - 1
        && events
            .iter()
            .zip(after + 1..)
            .all(|(event, seq)| event.seq == seq)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zone::{EventKind, Tick};
    use proptest::prelude::*;
    use uuid::Uuid;

    fn event(seq: u64, at: DateTime<Utc>) -> ZoneEvent {
        ZoneEvent::new(
            Uuid::from_u128(u128::from(seq)),
            Uuid::nil(),
            seq,
            EventKind::EnvironmentTick(Tick {
                tick: seq,
                properties: serde_json::Value::Null,
                new_resources: Default::default(),
                timestamp: at,
            }),
            at,
        )
    }

    fn since(seq: u64, epoch: &str) -> Since {
        Since {
            seq,
            epoch: epoch.into(),
        }
    }

    #[test]
    fn memory_keeps_the_newest_events_within_count_and_age() {
        let config = HistoryConfig {
            events: 3,
            age: Duration::from_secs(60),
            max: 100,
        };
        let t0 = chrono::Utc::now();
        let mut h = History::default();
        let events: Vec<_> = (1..=5).map(|s| event(s, t0)).collect();
        h.record(&events, &config, t0);
        assert_eq!(h.first_seq(&config, t0), Some(3));
        assert_eq!(h.between(3, 5).map(|e| e.seq).collect::<Vec<_>>(), [4, 5]);
        assert_eq!(h.between(0, 4).map(|e| e.seq).collect::<Vec<_>>(), [3, 4]);
        let later = t0 + chrono::Duration::seconds(61);
        assert_eq!(h.first_seq(&config, later), None, "all older than a minute");
        h.record(&[event(6, later)], &config, later);
        assert_eq!(h.first_seq(&config, later), Some(6));
    }

    #[test]
    fn a_rejoin_is_recovered_only_in_its_epoch_within_reach_and_not_ahead() {
        let c = HistoryConfig {
            events: 10,
            age: Duration::from_secs(60),
            max: 100,
        };
        assert_eq!(plan(&since(5, "b"), "a", 10, Some(3), &c), Plan::Fresh);
        assert_eq!(plan(&since(11, "a"), "a", 10, Some(3), &c), Plan::Fresh);
        assert_eq!(plan(&since(0, "a"), "a", 101, Some(90), &c), Plan::Fresh);
        assert_eq!(
            plan(&since(5, "a"), "a", 10, Some(3), &c),
            Plan::Recover { after: 5, upto: 6 },
            "all in memory"
        );
        assert_eq!(
            plan(&since(5, "a"), "a", 10, Some(8), &c),
            Plan::Recover { after: 5, upto: 8 },
            "6 and 7 from the log"
        );
        assert_eq!(
            plan(&since(5, "a"), "a", 10, None, &c),
            Plan::Recover { after: 5, upto: 11 },
            "nothing in memory: all from the log"
        );
        assert_eq!(
            plan(&since(10, "a"), "a", 10, None, &c),
            Plan::Recover {
                after: 10,
                upto: 11
            },
            "missed nothing"
        );
    }

    proptest! {
        /// Whatever was recorded and whatever the limits, memory holds an unbroken run ending at
        /// the newest event, and `between` gives exactly the seqs asked for that it has.
        #[test]
        fn memory_is_an_unbroken_run_of_the_newest(
            batches in proptest::collection::vec(1usize..20, 1..30),
            keep in 1usize..50,
            after in 0u64..400,
            span in 0u64..100,
        ) {
            let config = HistoryConfig { events: keep, age: Duration::from_secs(600), max: 10_000 };
            let now = chrono::Utc::now();
            let mut h = History::default();
            let mut seq = 0;
            for n in batches {
                let events: Vec<_> = (seq + 1..=seq + n as u64).map(|s| event(s, now)).collect();
                seq += n as u64;
                h.record(&events, &config, now);
            }
            let first = h.first_seq(&config, now).unwrap();
            prop_assert_eq!(first, seq.saturating_sub(keep as u64) + 1);
            let got: Vec<u64> = h.between(after, after + span).map(|e| e.seq).collect();
            let want: Vec<u64> = (after + 1..=after + span).filter(|s| *s >= first && *s <= seq).collect();
            prop_assert_eq!(got, want);
        }
    }
}
