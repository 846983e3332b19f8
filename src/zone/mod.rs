//! The domain: zones that agents enter and leave, their permission bits, their resources, and
//! the events they cause. Pure state and rules, no I/O: the store keeps zones, the pipeline
//! carries their events, and neither is known here.

mod error;
mod event;
mod model;
mod permissions;

pub use error::{ZoneError, parse_zone_id};
pub use event::{
    DecodeError, EventKind, EventType, Interaction, Moved, Position, Presence, ResourceChange,
    Tick, WireEvent, ZoneEvent,
};
pub use model::{DEFAULT_CAPACITY, DEFAULT_PERMISSIONS, NewZone, Resource, Zone, now};
pub use permissions::Permissions;
