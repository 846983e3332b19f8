//! Settles the broker commands this node handed to other nodes' zones: each waits here (not in
//! the writer, whose worker would otherwise sit idle, and, two nodes waiting on each other's
//! writers, for ever) for the owner's outcome, and its message is acknowledged by it: done when
//! the owner applied it (durably, with durable replies), failed as the zone refused it
//! (dead-lettered), given back to the broker ([`Redeliver`]) when no owner answered or the owner
//! could not decide it yet (`unavailable`): nothing was decided, so a dead letter would lose a
//! valid command. It comes again, to whichever node then owns the zone.
//!
//! A service's `migrate` waits here too (on a single node as well), for its migration's end.

use std::sync::Arc;

use futures_util::future::join_all;

use super::placement::Placement;
use super::work::{Job, ZoneWork};
use super::writer::service_refusal;
use crate::pipeline::{BatchInfo, BatchSink, BatcherName, Failure, Message};
use crate::sources::Redeliver;
use crate::zone::{CommandKind, Outcome, ZoneError};

/// The batcher forwarded service commands wait in.
pub const OWNERS_BATCHER: &str = "owners";

/// The batcher name, for the writer's routes.
pub fn owners_batcher() -> BatcherName {
    BatcherName::from(OWNERS_BATCHER)
}

/// How many times a command no owner answered (or answered `unavailable`: its owner was
/// changing for longer than the router waits) is sent again before its message fails.
const SENDS: usize = 3;

/// The `owners` batcher's sink: see the module documentation.
pub struct OwnerOutcomes {
    /// In a cluster: where a command no owner answered is sent again.
    placement: Option<Arc<dyn Placement>>,
}

impl OwnerOutcomes {
    /// `placement`: in a cluster, where commands for zones of other nodes go.
    pub fn new(placement: Option<Arc<dyn Placement>>) -> Self {
        Self { placement }
    }

    /// The owner's outcome for `work`, sent again while no owner answers.
    async fn settled(&self, work: &ZoneWork) -> Option<Option<Outcome>> {
        let mut outcome = work.owner_outcome.clone()?.await;
        // A migration is not sent anywhere: it ended as it did (one cut short is its
        // broker's to send again, as the same migration).
        let forwarded =
            matches!(&work.job, Job::Command(c) if !matches!(c.kind, CommandKind::Migrate { .. }));
        let Some(placement) = self.placement.as_ref().filter(|_| forwarded) else {
            return Some(outcome);
        };
        for _ in 1..SENDS {
            let answered = matches!(
                &outcome,
                Some(o) if !matches!(&o.result, Err(ZoneError::Unavailable(_)))
            );
            if answered {
                break;
            }
            let mut again = work.clone();
            again.owner_outcome = None;
            again.reply = None;
            outcome = placement.forward(again).await;
        }
        Some(outcome)
    }
}

impl BatchSink<ZoneWork> for OwnerOutcomes {
    async fn handle_batch(
        &self,
        _batch: &BatchInfo,
        messages: &mut [Message<ZoneWork>],
    ) -> Result<(), Failure> {
        let outcomes = join_all(messages.iter().map(|m| self.settled(&m.data))).await;
        for (message, outcome) in messages.iter_mut().zip(outcomes) {
            let Job::Command(command) = &message.data.job else {
                continue;
            };
            let failure = match outcome {
                // Nothing was waited for: nothing to settle here.
                None => None,
                Some(None) => Some(
                    Redeliver(format!("zone {}'s owner did not answer", command.zone_id)).into(),
                ),
                Some(Some(outcome)) => match &outcome.result {
                    Err(refusal) => service_refusal(command, refusal),
                    Ok(_) => None,
                },
            };
            if let Some(failure) = failure {
                message.fail(failure);
            }
        }
        Ok(())
    }
}
