//! The zone pipeline's acknowledger: what happens once every sink a message went to has it.
//!
//! A durable reply is sent (its events are in the audit log now), the zone learns which of its
//! events are logged, a snapshot is queued for writing once every event it reflects is logged
//! (a deleted zone's snapshot removes its row, so the row goes only after `zone_deleted` is in
//! the log),
//! and a message that failed before its zone could answer (the zone could not be loaded, the
//! pipeline was shutting down) is answered `unavailable`, so every command gets exactly one
//! answer.
//!
//! In a cluster, a message whose events the audit log refused because this node's lease on the
//! zone moved on (fenced off) drops the zone's copy from memory, and tells the placement: that
//! copy applied what is not in the log and is no longer this node's to write, so it must not
//! answer another command (a redelivery of the same one would be told it is done).

use std::sync::Arc;

use uuid::Uuid;

use super::placement::Placement;
use super::registry::ZoneRegistry;
use super::snapshots::Snapshots;
use super::work::{Job, ZoneWork};
use super::writer::unavailable;
use crate::pipeline::{Acknowledger, Message};
use crate::sources::redelivers;

pub struct ZoneAcker {
    registry: Arc<ZoneRegistry>,
    snapshots: Arc<Snapshots>,
    /// In a cluster: told when a zone's lease is found to have moved on.
    placement: Option<Arc<dyn Placement>>,
}

impl ZoneAcker {
    pub fn new(registry: Arc<ZoneRegistry>, snapshots: Arc<Snapshots>) -> Self {
        Self {
            registry,
            snapshots,
            placement: None,
        }
    }

    /// In a cluster: tells `placement` of the leases found to have moved on.
    pub fn placed(mut self, placement: Arc<dyn Placement>) -> Self {
        self.placement = Some(placement);
        self
    }

    /// Zone `zone`'s events made under lease `fence` were refused by the log: its copy goes.
    fn fenced(&self, zone: Uuid, fence: u64) {
        if self.registry.drop_fenced(zone, fence) {
            tracing::warn!(%zone, fence, "this node's lease on the zone moved on before its events were logged: its copy in memory is dropped");
        }
        if let Some(placement) = &self.placement {
            placement.fenced(zone, fence);
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
            // Applied here, and given back: the writer fails no message that caused events, so
            // these were refused by the log, under a lease that has moved on.
            let refused_by_log = m.failure().is_some_and(redelivers) && !m.data.events.is_empty();
            let work = m.data;
            if refused_by_log && let Some(fence) = work.fence {
                self.fenced(work.zone_id, fence);
            }
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
