//! Interest management: in a zone with an `interest_radius`, each agent hears only the moves
//! near it, and is told when another agent comes into or goes out of its view.
//!
//! Agents that are in the zone (a session) and have a position are *placed*; two placed agents
//! see each other when they are within the radius ([`within`]). A uniform grid whose cells are
//! the radius wide indexes the placed agents, so a move looks at the agents of the neighbouring
//! cells, not at the whole zone. The zone's writer decides once, per event, whom a movement
//! reaches and whose views it changes, and the event carries that ([`View`]): delivery, the
//! cluster's other nodes and a rejoin's recovery all read it, and none of them has to know
//! where anyone is.
//!
//! What one session receives of an event is [`received`]: the event itself if it reaches the
//! session's agent, and the changes of that agent's view ([`Sight`]), left views first, then
//! entered ones, each in agent order. A filtered event (a move, an interaction) comes after the
//! view changes it causes, so an agent is never told of a move of an agent it has not been
//! shown; a zone-wide event (a join, a radius change) comes before them.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use super::event::{EventKind, Position, ZoneEvent};

/// Whether `a` and `b` see each other with `radius`: Euclidean distance ≤ radius (no radius:
/// always). The one definition delivery, the grid and the tests share.
pub fn within(a: Position, b: Position, radius: Option<f64>) -> bool {
    let Some(r) = radius else {
        return true;
    };
    let (dx, dy, dz) = (a.x - b.x, a.y - b.y, a.z - b.z);
    dx * dx + dy * dy + dz * dz <= r * r
}

/// Checks a radius: a finite number above 0.
pub fn check_radius(radius: f64) -> Result<(), String> {
    if radius.is_finite() && radius > 0.0 {
        Ok(())
    } else {
        Err(format!(
            "interest_radius must be a finite number above 0, not {radius}"
        ))
    }
}

/// A change of one agent's view, as its sessions receive it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Sight {
    /// `agent_entered_view`: `agent_id` is within the radius now, at `position`.
    AgentEnteredView {
        agent_id: String,
        position: Position,
    },
    /// `agent_left_view`: `agent_id` is out of the radius now; no more of its moves follow.
    AgentLeftView { agent_id: String },
}

impl Sight {
    /// The frame's event name.
    pub fn name(&self) -> &'static str {
        match self {
            Self::AgentEnteredView { .. } => "agent_entered_view",
            Self::AgentLeftView { .. } => "agent_left_view",
        }
    }

    /// The agent it is about.
    pub fn agent_id(&self) -> &str {
        match self {
            Self::AgentEnteredView { agent_id, .. } | Self::AgentLeftView { agent_id } => agent_id,
        }
    }

    /// The frame's payload: `{agent_id, position}` or `{agent_id}`.
    pub fn payload(&self) -> serde_json::Value {
        match self {
            Self::AgentEnteredView { agent_id, position } => {
                serde_json::json!({"agent_id": agent_id, "position": position})
            }
            Self::AgentLeftView { agent_id } => serde_json::json!({"agent_id": agent_id}),
        }
    }
}

/// `watcher` sees `agent_id` now, at `position`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Seen {
    pub watcher: String,
    pub agent_id: String,
    pub position: Position,
}

/// `watcher` no longer sees `agent_id`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unseen {
    pub watcher: String,
    pub agent_id: String,
}

/// The radius changed from `from`: every placed agent's position then, from which each view
/// before and after is computed where the event is delivered (a list of pairs could be as long
/// as the square of the zone's agents).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Regrid {
    pub from: Option<f64>,
    pub to: Option<f64>,
    pub placed: Vec<(String, Position)>,
}

/// Whom an event reaches when the zone filters by interest, and the views it changes: decided
/// by the zone's writer with the event, carried beside its payload (never in it).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct View {
    /// Set for an event that is not for everyone: the agents it reaches besides its own agent
    /// (and an interaction's target), in agent order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entered: Vec<Seen>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub left: Vec<Unseen>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regrid: Option<Regrid>,
}

impl View {
    /// Each watcher's view changes, in the order its sessions receive them: left views first,
    /// then entered ones, each in agent order.
    pub fn sights(&self) -> BTreeMap<&str, Vec<Sight>> {
        let mut left: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        let mut entered: BTreeMap<&str, BTreeMap<&str, Position>> = BTreeMap::new();
        for u in &self.left {
            left.entry(&u.watcher).or_default().insert(&u.agent_id);
        }
        for s in &self.entered {
            entered
                .entry(&s.watcher)
                .or_default()
                .insert(&s.agent_id, s.position);
        }
        if let Some(regrid) = &self.regrid {
            regrid.changes(&mut left, &mut entered);
        }
        let mut sights: BTreeMap<&str, Vec<Sight>> = BTreeMap::new();
        for (watcher, agents) in left {
            sights
                .entry(watcher)
                .or_default()
                .extend(agents.into_iter().map(|a| Sight::AgentLeftView {
                    agent_id: a.to_owned(),
                }));
        }
        for (watcher, agents) in entered {
            sights
                .entry(watcher)
                .or_default()
                .extend(
                    agents
                        .into_iter()
                        .map(|(a, position)| Sight::AgentEnteredView {
                            agent_id: a.to_owned(),
                            position,
                        }),
                );
        }
        sights
    }

    /// Whether the event reaches `agent` (`actor` and `target` are the event's own agents).
    pub fn reaches(&self, agent: &str, actor: Option<&str>, target: Option<&str>) -> bool {
        match &self.audience {
            None => true,
            Some(audience) => {
                Some(agent) == actor
                    || Some(agent) == target
                    || audience.binary_search_by(|a| a.as_str().cmp(agent)).is_ok()
            }
        }
    }
}

impl Regrid {
    /// Adds each placed agent's view changes from `from` to `to`.
    fn changes<'a>(
        &'a self,
        left: &mut BTreeMap<&'a str, BTreeSet<&'a str>>,
        entered: &mut BTreeMap<&'a str, BTreeMap<&'a str, Position>>,
    ) {
        let mut before = Grid::default();
        let mut after = Grid::default();
        before.set_radius(self.from);
        after.set_radius(self.to);
        for (agent, position) in &self.placed {
            before.place(agent, *position);
            after.place(agent, *position);
        }
        // The grids' names, as this regrid's own (which the maps borrow).
        let own: HashMap<&str, &'a str> = self
            .placed
            .iter()
            .map(|(a, _)| (a.as_str(), a.as_str()))
            .collect();
        for (agent, position) in &self.placed {
            let was: BTreeSet<&'a str> = before
                .near(*position, agent)
                .into_iter()
                .filter_map(|(a, _)| own.get(a).copied())
                .collect();
            let is: BTreeMap<&'a str, Position> = after
                .near(*position, agent)
                .into_iter()
                .filter_map(|(a, p)| Some((own.get(a).copied()?, p)))
                .collect();
            for (other, at) in &is {
                if !was.contains(other) {
                    entered.entry(agent).or_default().insert(other, *at);
                }
            }
            for other in was {
                if !is.contains_key(other) {
                    left.entry(agent).or_default().insert(other);
                }
            }
        }
    }
}

/// What a session of `agent` receives of `event`, in order: [`Received::Event`] for the event
/// itself, and its agent's view changes.
pub fn received(event: &ZoneEvent, agent: &str) -> Vec<Received> {
    let Some(view) = event.view.as_deref() else {
        return vec![Received::Event];
    };
    let (actor, target) = event.kind.audience_agents();
    let reached = view.reaches(agent, actor, target);
    let sights = view
        .sights()
        .remove(agent)
        .unwrap_or_default()
        .into_iter()
        .map(Received::Sight);
    let mut out = Vec::new();
    if view.audience.is_none() {
        out.push(Received::Event);
        out.extend(sights);
    } else {
        out.extend(sights);
        if reached {
            out.push(Received::Event);
        }
    }
    out
}

/// One thing a session receives of an event.
#[derive(Clone, Debug, PartialEq)]
pub enum Received {
    Event,
    Sight(Sight),
}

impl EventKind {
    /// The agents a filtered event always reaches: its actor, and an interaction's target.
    pub fn audience_agents(&self) -> (Option<&str>, Option<&str>) {
        match self {
            Self::AgentInteraction(i) => (Some(&i.agent_id), Some(&i.target_agent_id)),
            kind => (kind.agent_id(), None),
        }
    }
}

type Cell = [i64; 3];

/// The placed agents, and with a radius, a grid of them (cells the radius wide).
#[derive(Clone, Debug, Default)]
pub(crate) struct Grid {
    radius: Option<f64>,
    placed: HashMap<String, Position>,
    /// Each cell's agents and where they are (read without a second lookup).
    cells: HashMap<Cell, Vec<(String, Position)>>,
}

/// A coordinate's cell (saturating far out: cells there only grow, never miss a neighbour).
fn cell_coord(v: f64, r: f64) -> i64 {
    (v / r).floor() as i64
}

fn cell_of(p: Position, r: f64) -> Cell {
    [cell_coord(p.x, r), cell_coord(p.y, r), cell_coord(p.z, r)]
}

impl Grid {
    pub(crate) fn position(&self, agent: &str) -> Option<Position> {
        self.placed.get(agent).copied()
    }

    /// Every placed agent and its position, in agent order.
    pub(crate) fn placed(&self) -> Vec<(String, Position)> {
        let mut all: Vec<(String, Position)> =
            self.placed.iter().map(|(a, p)| (a.clone(), *p)).collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    pub(crate) fn set_radius(&mut self, radius: Option<f64>) {
        self.radius = radius;
        self.cells.clear();
        if let Some(r) = radius {
            for (agent, p) in &self.placed {
                self.cells
                    .entry(cell_of(*p, r))
                    .or_default()
                    .push((agent.clone(), *p));
            }
        }
    }

    pub(crate) fn place(&mut self, agent: &str, position: Position) {
        let before = self.placed.insert(agent.to_owned(), position);
        let Some(r) = self.radius else {
            return;
        };
        let cell = cell_of(position, r);
        if let Some(old) = before {
            let was = cell_of(old, r);
            if was == cell {
                if let Some(entry) = self
                    .cells
                    .get_mut(&cell)
                    .and_then(|agents| agents.iter_mut().find(|(a, _)| a == agent))
                {
                    entry.1 = position;
                }
                return;
            }
            self.unfile(was, agent);
        }
        self.cells
            .entry(cell)
            .or_default()
            .push((agent.to_owned(), position));
    }

    pub(crate) fn remove(&mut self, agent: &str) {
        if let (Some(old), Some(r)) = (self.placed.remove(agent), self.radius) {
            self.unfile(cell_of(old, r), agent);
        }
    }

    pub(crate) fn clear(&mut self) {
        self.placed.clear();
        self.cells.clear();
    }

    fn unfile(&mut self, cell: Cell, agent: &str) {
        if let Some(agents) = self.cells.get_mut(&cell) {
            if let Some(i) = agents.iter().position(|(a, _)| a == agent) {
                agents.swap_remove(i);
            }
            if agents.is_empty() {
                self.cells.remove(&cell);
            }
        }
    }

    /// The placed agents within the radius of `position` but `except`, in agent order.
    pub(crate) fn near<'a>(&'a self, position: Position, except: &str) -> Vec<(&'a str, Position)> {
        let mut found: Vec<(&str, Position)> = Vec::new();
        let radius = self.radius;
        let mut take = |item: (&'a str, Position)| {
            if item.0 != except && within(position, item.1, radius) {
                found.push(item);
            }
        };
        let everyone = || self.placed.iter().map(|(a, p)| (a.as_str(), *p));
        match self.radius {
            None => everyone().for_each(&mut take),
            Some(r) => {
                // A hair past the radius each way: rounding never hides a neighbour's cell.
                let reach = r * (1.0 + 1e-9);
                let span = |v: f64| (cell_coord(v - reach, r), cell_coord(v + reach, r));
                let spans = [span(position.x), span(position.y), span(position.z)];
                if spans.iter().any(|(lo, hi)| hi.saturating_sub(*lo) > 3) {
                    // Far out, where cells saturate: look at everyone.
                    everyone().for_each(&mut take);
                } else {
                    for x in spans[0].0..=spans[0].1 {
                        for y in spans[1].0..=spans[1].1 {
                            for z in spans[2].0..=spans[2].1 {
                                if let Some(agents) = self.cells.get(&[x, y, z]) {
                                    agents
                                        .iter()
                                        .map(|(a, p)| (a.as_str(), *p))
                                        .for_each(&mut take);
                                }
                            }
                        }
                    }
                }
            }
        }
        found.sort_by(|a, b| a.0.cmp(b.0));
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(x: f64, y: f64) -> Position {
        Position { x, y, z: 0.0 }
    }

    #[test]
    fn the_grid_finds_exactly_the_agents_within_the_radius() {
        let mut grid = Grid::default();
        grid.set_radius(Some(10.0));
        grid.place("a", at(0.0, 0.0));
        grid.place("b", at(10.0, 0.0));
        grid.place("c", at(10.0001, 0.0));
        grid.place("d", at(-6.0, -8.0));
        grid.place("e", at(25.0, 25.0));
        let near: Vec<&str> = grid
            .near(at(0.0, 0.0), "a")
            .into_iter()
            .map(|n| n.0)
            .collect();
        assert_eq!(near, ["b", "d"]);
        grid.place("c", at(5.0, 5.0));
        grid.remove("b");
        let near: Vec<&str> = grid
            .near(at(0.0, 0.0), "a")
            .into_iter()
            .map(|n| n.0)
            .collect();
        assert_eq!(near, ["c", "d"]);
        grid.set_radius(None);
        assert_eq!(grid.near(at(0.0, 0.0), "a").len(), 3);
    }

    #[test]
    fn far_out_positions_and_tiny_radii_are_still_exact() {
        let mut grid = Grid::default();
        grid.set_radius(Some(1e-300));
        grid.place("a", at(1e300, 0.0));
        grid.place("b", at(1e300, 0.0));
        grid.place("c", at(-1e300, 0.0));
        let near: Vec<&str> = grid
            .near(at(1e300, 0.0), "a")
            .into_iter()
            .map(|n| n.0)
            .collect();
        assert_eq!(near, ["b"]);
        grid.set_radius(Some(1e300));
        let near: Vec<&str> = grid
            .near(at(-1.7e308, 0.0), "x")
            .into_iter()
            .map(|n| n.0)
            .collect();
        assert!(near.is_empty());
    }
}
