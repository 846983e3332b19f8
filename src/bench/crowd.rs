//! `thunderline bench ws --agents-per-zone N`: crowds. N agents in each zone, spread uniformly
//! over a square, each moving `--move-hz` times a second in a random walk, first with
//! `--aoi-radius` as the zones' interest radius; then, in the same run, the same load with no
//! radius at the largest agent count whose p99 stays under the target (every move to every
//! agent: N² frames), found by a few runs around what the first run's frame rate allows. The
//! report adds the model of a zone of 10,000 agents from the same figures.

use std::f64::consts::PI;

use serde::Serialize;

use super::BenchError;
use super::ws::{RunFigures, Setup, WsArgs, load, prepare};

/// One run of the crowd load.
#[derive(Clone, Debug, Serialize)]
pub struct CrowdRun {
    pub agents_per_zone: usize,
    pub interest_radius: Option<f64>,
    /// `agent_move` pushes per second.
    pub moves_per_sec: f64,
    /// Every frame of movement received per second: `agent_moved` and the view changes.
    pub frames_per_sec: f64,
    pub p99_ms: f64,
    /// p99 under the target, every push answered, nobody disconnected.
    pub within_target: bool,
    #[serde(flatten)]
    pub run: RunFigures,
}

/// What the figures say of a zone of `agents` agents on the same square and radius.
#[derive(Clone, Debug, Serialize)]
pub struct CrowdModel {
    pub agents: usize,
    /// Agents within the radius of one, on average (uniform density, edges ignored).
    pub neighbours: f64,
    /// Frames a second with the radius: each move to its mover and its neighbours.
    pub frames_per_sec_with_radius: f64,
    /// Frames a second without: each move to every agent.
    pub frames_per_sec_without_radius: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct CrowdReport {
    pub zones: usize,
    pub move_hz: f64,
    pub world: f64,
    pub duration: f64,
    pub p99_target_ms: f64,
    /// The load as asked (with --aoi-radius, if given).
    pub asked: CrowdRun,
    /// When the asked load missed the target with the radius: the same load with the radius
    /// at fewer agents, each count tried.
    pub with_radius: Vec<CrowdRun>,
    /// The largest agent count with the radius whose p99 held the target (the asked one, or
    /// one of `with_radius`).
    pub largest_with_radius_within_target: Option<usize>,
    /// The same load without a radius, at each agent count tried.
    pub without_radius: Vec<CrowdRun>,
    /// The largest agent count without a radius whose p99 held the target.
    pub largest_without_radius_within_target: Option<usize>,
    pub model: CrowdModel,
}

/// The agent counts one search tries, at most: enough to go up by half from a tenth of the
/// asked count to all of it, then halve the gap between the last that held and the first
/// that did not three times.
const TRIES: usize = 10;

/// Runs `agents` agents per zone with `radius` on a daemon of its own.
async fn crowd(args: &WsArgs, agents: usize, radius: Option<f64>) -> Result<CrowdRun, BenchError> {
    let run_args = WsArgs {
        clients: agents * args.zones,
        rate: (agents * args.zones) as f64 * args.move_hz,
        aoi_radius: radius,
        // Each join is broadcast to every member: a pace that keeps those frames near 200,000
        // a second.
        connect_rate: args
            .connect_rate
            .min((200_000 / (agents * args.zones)).max(20) as f64),
        ..args.clone()
    };
    let target = prepare(&run_args, Setup::Default).await?;
    let label = match radius {
        Some(r) => format!("{agents} agents, radius {r}"),
        None => format!("{agents} agents, no radius"),
    };
    let run = load(
        &run_args,
        &target.ws_url,
        target.plans(),
        &target.progress,
        &label,
        &target.observed(),
        None,
    )
    .await;
    target.progress.finish_and_clear();
    target.finish().await;
    let seconds = args.duration;
    let within_target = run.latency_ms.p99 < args.p99_target_ms
        && run.answered_every_push(run_args.clients)
        && run.disconnects == 0
        && (radius.is_some() || run.delivered == run.expected_deliveries);
    Ok(CrowdRun {
        agents_per_zone: agents,
        interest_radius: radius,
        moves_per_sec: run.ingress_events_per_sec,
        frames_per_sec: run.delivered_per_sec + run.view_frames as f64 / seconds,
        p99_ms: run.latency_ms.p99,
        within_target,
        run,
    })
}

fn check(args: &WsArgs, agents: usize) -> Result<(), BenchError> {
    let bad = |m: &str| Err(BenchError::Args(m.to_owned()));
    if agents == 0 || args.zones == 0 {
        return bad("--agents-per-zone and --zones must be at least 1");
    }
    if !(args.move_hz > 0.0 && args.move_hz.is_finite()) {
        return bad("--move-hz must be above 0");
    }
    if !(args.world > 0.0 && args.world.is_finite()) {
        return bad("--world must be above 0");
    }
    if args.aoi_radius.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        return bad("--aoi-radius must be above 0");
    }
    Ok(())
}

/// Runs the load at agent counts from `first` on, with `radius`, to find the largest that
/// holds the target (at most `agents`): up by half while it holds, down by a third until it
/// does, then between the two; every run in the order made. `known` is a run already made.
async fn search(
    args: &WsArgs,
    radius: Option<f64>,
    first: usize,
    agents: usize,
    known: Option<&CrowdRun>,
) -> Result<Vec<CrowdRun>, BenchError> {
    let mut runs: Vec<CrowdRun> = Vec::new();
    // The largest count that held, and the smallest that did not.
    let (mut held, mut failed): (Option<usize>, Option<usize>) = (None, None);
    let note = |run: &CrowdRun, held: &mut Option<usize>, failed: &mut Option<usize>| {
        if run.within_target {
            *held = (*held).max(Some(run.agents_per_zone));
        } else {
            *failed = Some(failed.map_or(run.agents_per_zone, |f| f.min(run.agents_per_zone)));
        }
    };
    if let Some(run) = known {
        note(run, &mut held, &mut failed);
    }
    let mut n = first;
    for _ in 0..TRIES {
        let run = crowd(args, n, radius).await?;
        note(&run, &mut held, &mut failed);
        runs.push(run);
        n = match (held, failed) {
            (Some(lo), Some(hi)) if hi <= lo + (lo / 10).max(1) => break,
            (Some(lo), Some(hi)) => (lo + hi) / 2,
            (Some(lo), None) if lo >= agents => break,
            (Some(lo), None) => (lo + lo / 2).min(agents),
            (None, Some(hi)) if hi <= 2 => break,
            (None, Some(hi)) => (hi * 2 / 3).max(2),
            (None, None) => unreachable!("each run holds or fails"),
        };
    }
    Ok(runs)
}

/// The largest agent count of `runs` that held the target.
fn largest(runs: &[CrowdRun]) -> Option<usize> {
    runs.iter()
        .filter(|r| r.within_target)
        .map(|r| r.agents_per_zone)
        .max()
}

pub async fn run_async(args: &WsArgs) -> Result<CrowdReport, BenchError> {
    let agents = args.agents_per_zone.unwrap_or_default();
    check(args, agents)?;
    let asked = crowd(args, agents, args.aoi_radius).await?;
    // Past the target with the radius (the machine's limit, not the radius's): the largest
    // count that holds it with the radius too, for a like-for-like comparison.
    let mut with_radius = Vec::new();
    if args.aoi_radius.is_some() && !asked.within_target && agents > 2 {
        with_radius = search(
            args,
            args.aoi_radius,
            (agents * 2 / 3).max(2),
            agents,
            Some(&asked),
        )
        .await?;
    }
    // Without a radius every move goes to every agent: n agents make n² × hz frames a second.
    // The first try is the count whose frames match what the asked run delivered.
    let without = if args.aoi_radius.is_none() {
        vec![asked.clone()]
    } else {
        let first = ((asked.frames_per_sec / args.move_hz).sqrt() as usize).clamp(2, agents);
        search(args, None, first, agents, None).await?
    };
    let largest_with_radius = largest(&with_radius).max(asked.within_target.then_some(agents));
    let model = model(10_000, args);
    Ok(CrowdReport {
        zones: args.zones,
        move_hz: args.move_hz,
        world: args.world,
        duration: args.duration,
        p99_target_ms: args.p99_target_ms,
        largest_with_radius_within_target: args.aoi_radius.and(largest_with_radius),
        largest_without_radius_within_target: largest(&without),
        asked,
        with_radius,
        without_radius: without,
        model,
    })
}

/// A zone of `agents` agents on the run's square, radius and pace.
fn model(agents: usize, args: &WsArgs) -> CrowdModel {
    let n = agents as f64;
    let neighbours = args.aoi_radius.map_or(n - 1.0, |r| {
        ((n - 1.0) * PI * r * r / (args.world * args.world)).min(n - 1.0)
    });
    CrowdModel {
        agents,
        neighbours,
        frames_per_sec_with_radius: n * args.move_hz * (1.0 + neighbours),
        frames_per_sec_without_radius: n * args.move_hz * n,
    }
}

pub fn run(args: &WsArgs) -> Result<CrowdReport, BenchError> {
    super::runtime()?.block_on(run_async(args))
}

impl CrowdReport {
    pub fn table(&self) -> String {
        let mut out = format!(
            "crowd benchmark: {} zone(s), agents moving {} times a second over a {} × {} square, {} s per run, target p99 < {} ms\n\
             {:>8} {:>8} {:>12} {:>14} {:>10} {:>10} {:>12}  {}\n",
            self.zones,
            self.move_hz,
            self.world,
            self.world,
            self.duration,
            self.p99_target_ms,
            "agents",
            "radius",
            "moves/s",
            "frames/s",
            "p50 ms",
            "p99 ms",
            "view frames",
            "within target"
        );
        // Without a radius, the asked run is the first of `without_radius`: shown once.
        let without = self
            .without_radius
            .iter()
            .filter(|_| self.asked.interest_radius.is_some());
        for r in std::iter::once(&self.asked)
            .chain(&self.with_radius)
            .chain(without)
        {
            out.push_str(&format!(
                "{:>8} {:>8} {:>12.0} {:>14.0} {:>10.2} {:>10.2} {:>12}  {}\n",
                r.agents_per_zone,
                r.interest_radius
                    .map_or("none".to_owned(), |v| v.to_string()),
                r.moves_per_sec,
                r.frames_per_sec,
                r.run.latency_ms.p50,
                r.p99_ms,
                r.run.view_frames,
                if r.within_target { "yes" } else { "no" },
            ));
        }
        // The largest count that held, and what bounds it: the first count above it that did
        // not, or the asked count itself.
        let verdict = |runs: &[&CrowdRun], largest: Option<usize>| match largest {
            None => "no agent count tried held the target".to_owned(),
            Some(n) => match runs
                .iter()
                .filter(|r| !r.within_target && r.agents_per_zone > n)
                .map(|r| r.agents_per_zone)
                .min()
            {
                Some(m) => format!("{n} agents per zone held the target, {m} did not"),
                None if n >= self.asked.agents_per_zone => {
                    format!("{n} agents per zone (all asked) held the target")
                }
                None => format!("{n} agents per zone held the target (the most tried)"),
            },
        };
        if let Some(r) = self.asked.interest_radius {
            let runs: Vec<&CrowdRun> = self.with_radius.iter().chain([&self.asked]).collect();
            out.push_str(&format!(
                "with radius {r}: {}\n",
                verdict(&runs, self.largest_with_radius_within_target)
            ));
        }
        let runs: Vec<&CrowdRun> = self.without_radius.iter().collect();
        out.push_str(&format!(
            "without a radius: {}\n",
            verdict(&runs, self.largest_without_radius_within_target)
        ));
        let m = &self.model;
        out.push_str(&format!(
            "model of {} agents in one zone: {:.1} neighbours each, {:.0} frames/s with the radius, {:.0} without\n",
            m.agents, m.neighbours, m.frames_per_sec_with_radius, m.frames_per_sec_without_radius
        ));
        out
    }
}
