//! The zone pipeline's acknowledger: what happens once every sink a message went to has it.
//!
//! A durable reply is sent (its events are in the audit log now), the zone learns which of its
//! events are logged, a snapshot is queued for writing once every event it reflects is logged
//! (a deleted zone's snapshot removes its row, so the row goes only after `zone_deleted` is in
//! the log),
//! and a message that failed before its zone could answer (the zone could not be loaded, the
//! pipeline was shutting down) is answered `unavailable`, so every command gets exactly one
//! answer.

use std::sync::Arc;

use super::registry::ZoneRegistry;
use super::snapshots::Snapshots;
use super::work::{Job, ZoneWork};
use super::writer::unavailable;
use crate::pipeline::{Acknowledger, Message};

pub struct ZoneAcker {
    registry: Arc<ZoneRegistry>,
    snapshots: Arc<Snapshots>,
}

impl ZoneAcker {
    pub fn new(registry: Arc<ZoneRegistry>, snapshots: Arc<Snapshots>) -> Self {
        Self {
            registry,
            snapshots,
        }
    }
}

impl Acknowledger<ZoneWork> for ZoneAcker {
    fn ack(&self, successful: Vec<Message<ZoneWork>>, failed: Vec<Message<ZoneWork>>) {
        for m in successful {
            let work = m.data;
            if let (Some(reply), Some(outcome)) = (&work.reply, &work.outcome) {
                reply.reply(outcome);
            }
            let seqs = work
                .events
                .first()
                .zip(work.events.last())
                .map(|(first, last)| (first.seq, last.seq));
            if seqs.is_none() && work.snapshot.is_none() {
                continue;
            }
            // A zone no longer in memory was evicted (written) or deleted (its row removed):
            // nothing to write. A deleted one's snapshot is the removal of its row.
            if let Some(live) = self.registry.live(work.zone_id)
                && let Some(snapshot) = live.logged(seqs, work.snapshot)
            {
                self.snapshots.offer(snapshot, live.fence());
            }
        }
        for m in failed {
            let why = m.failure().map_or("", |f| f.reason()).to_owned();
            let work = m.data;
            let (Some(reply), Job::Command(command)) = (&work.reply, &work.job) else {
                continue;
            };
            let why = if work.outcome.is_some() {
                format!("the command was applied but could not be recorded: {why}")
            } else {
                why
            };
            reply.reply(&unavailable(command.id, &why).into());
        }
    }
}
