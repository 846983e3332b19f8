//! The zones' clock: environment ticks for every zone with agents in it, and the sweep that
//! lets zones without sessions leave memory. Both go through the pipeline like any command, so
//! each zone's writer sees them in order with everything else.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use uuid::Uuid;

use super::ZoneHandle;
use super::context::command;
use super::work::ZoneWork;
use crate::zone::{Actor, CommandKind};

#[derive(Clone, Copy, Debug)]
pub struct TimerConfig {
    pub tick_every: Duration,
    /// A zone without sessions for this long leaves memory (once its snapshot is written).
    pub evict_after: Duration,
}

/// The parts of a tick interval the zones' ticks are spread over: a zone ticks in its own part
/// (from its id), so that a hundred zones do not send their ticks to every session at the same
/// instant (a burst that every other broadcast would queue behind).
const TICK_PHASES: u32 = 50;

/// Runs until `stop` turns true or the pipeline stops taking work.
pub async fn run_timers(zones: ZoneHandle, config: TimerConfig, mut stop: watch::Receiver<bool>) {
    // Each zone still ticks once per `tick_every`; a short interval has fewer phases, none
    // shorter than a millisecond.
    let phases = TICK_PHASES.min(config.tick_every.as_millis().clamp(1, u32::MAX as u128) as u32);
    let mut ticks = tokio::time::interval(config.tick_every / phases);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ticks.tick().await;
    let mut phase: u32 = 0;
    // Often enough that a zone leaves within a tenth of its idle time after it is due.
    let mut sweeps =
        tokio::time::interval((config.evict_after / 10).max(Duration::from_millis(10)));
    sweeps.set_missed_tick_behavior(MissedTickBehavior::Delay);
    sweeps.tick().await;
    loop {
        let work: Vec<ZoneWork> = tokio::select! {
            () = async { let _ = stop.wait_for(|&s| s).await; } => return,
            _ = ticks.tick() => {
                phase = (phase + 1) % phases;
                zones
                    .registry
                    .active(|id| tick_phase(id, phases) == phase)
                    .into_iter()
                    .map(|id| {
                        ZoneWork::command(command(id, Actor::System, CommandKind::Tick), None)
                    })
                    .collect()
            }
            _ = sweeps.tick() => zones
                .registry
                .idle(config.evict_after, Instant::now())
                .into_iter()
                .map(ZoneWork::evict)
                .collect(),
        };
        for w in work {
            if !zones.push(w).await {
                return;
            }
        }
    }
}

/// The part of the tick interval zone `id` ticks in: from the id's random low bits (UUID v7),
/// so zones spread evenly.
fn tick_phase(id: Uuid, phases: u32) -> u32 {
    (id.as_u128() % u128::from(phases)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zones_spread_over_the_phases() {
        let mut counts = vec![0u32; TICK_PHASES as usize];
        for _ in 0..5_000 {
            counts[tick_phase(Uuid::now_v7(), TICK_PHASES) as usize] += 1;
        }
        // 100 a phase on average: none empty, none with three times its share.
        assert!(counts.iter().all(|&c| c > 0 && c < 300), "{counts:?}");
    }
}
