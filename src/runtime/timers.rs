//! The zones' clock: environment ticks for every zone with agents in it, and the sweep that
//! lets zones without sessions leave memory. Both go through the pipeline like any command, so
//! each zone's writer sees them in order with everything else.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};

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

/// Runs until `stop` turns true or the pipeline stops taking work.
pub async fn run_timers(zones: ZoneHandle, config: TimerConfig, mut stop: watch::Receiver<bool>) {
    let mut ticks = tokio::time::interval(config.tick_every);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ticks.tick().await;
    // Often enough that a zone leaves within a tenth of its idle time after it is due.
    let mut sweeps =
        tokio::time::interval((config.evict_after / 10).max(Duration::from_millis(10)));
    sweeps.set_missed_tick_behavior(MissedTickBehavior::Delay);
    sweeps.tick().await;
    loop {
        let work: Vec<ZoneWork> = tokio::select! {
            () = async { let _ = stop.wait_for(|&s| s).await; } => return,
            _ = ticks.tick() => zones
                .registry
                .active()
                .into_iter()
                .map(|id| {
                    ZoneWork::command(command(id, Actor::System, CommandKind::Tick), None)
                })
                .collect(),
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
