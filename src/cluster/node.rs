//! The members of a cluster: nodes by name, each run of a node an incarnation of its own.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// One run of a node: its name (`serve --node-id`), and the incarnation that tells this run
/// from an earlier one of the same name (a restarted node is a new member: what the earlier
/// run held, it no longer holds).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeId {
    pub name: String,
    pub incarnation: Uuid,
}

impl NodeId {
    /// A new run of node `name`.
    pub fn start(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            incarnation: Uuid::new_v4(),
        }
    }
}

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name, self.incarnation.simple())
    }
}

/// The nodes a node believes alive, and which of them are draining (handing their zones away,
/// taking none).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Members(BTreeSet<NodeId>, BTreeSet<NodeId>);

impl Members {
    pub fn new(nodes: impl IntoIterator<Item = NodeId>) -> Self {
        Self(nodes.into_iter().collect(), BTreeSet::new())
    }

    /// These members, with `draining` among them draining.
    pub fn draining(mut self, draining: impl IntoIterator<Item = NodeId>) -> Self {
        self.1 = draining
            .into_iter()
            .filter(|n| self.0.contains(n))
            .collect();
        self
    }

    /// Whether `node`, this very incarnation, is alive.
    pub fn contains(&self, node: &NodeId) -> bool {
        self.0.contains(node)
    }

    /// These members, with `node` among the draining ones.
    pub fn with_draining(mut self, node: &NodeId) -> Self {
        if self.0.contains(node) {
            self.1.insert(node.clone());
        }
        self
    }

    /// Whether `node` is draining.
    pub fn is_draining(&self, node: &NodeId) -> bool {
        self.1.contains(node)
    }

    pub fn iter(&self) -> impl Iterator<Item = &NodeId> {
        self.0.iter()
    }

    /// The members zones may be placed on: alive and not draining.
    pub fn eligible(&self) -> impl Iterator<Item = &NodeId> {
        self.0.iter().filter(|n| !self.1.contains(n))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}
