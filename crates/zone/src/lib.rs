//! The zone rules: zones that agents enter and leave, their permission bits, their resources,
//! and the commands and events that change them. Pure state and rules, no I/O, no clock, no
//! randomness: the store keeps zones, the runtime applies their commands (passing the time and
//! the ids in a [`Context`]), sockets and brokers bring them, and none of those is known here
//! (this crate depends on none of them).
//!
//! A [`ZoneCommand`] is decided against a [`ZoneState`]: refused with a [`ZoneError`] (which
//! changes nothing), or accepted with the [`ZoneEvent`]s it causes, numbered by the zone's
//! `seq`. Applying those events is the only way a zone changes, live or in replay.

mod command;
mod error;
mod event;
mod interest;
pub mod limits;
mod migration;
mod model;
mod permissions;
mod request;
mod state;

pub use command::{Actor, CommandKind, ZoneCommand, ZonePatch};
pub use error::{Holder, ZoneError, parse_zone_id};
pub use event::{
    BroadcastPayload, Created, Custom, DecodeError, Deleted, EventKind, EventType, Interaction,
    Moved, Position, Presence, ResourceChange, Tick, WireEvent, ZoneEvent, ZoneUpdate,
    check_custom_event_type,
};
pub use interest::{Received, Regrid, Seen, Sight, Unseen, View, check_radius, received, within};
pub use migration::{Located, Migrated, Migration, Mover, Released, Reservation, step_id};
pub use model::{DEFAULT_CAPACITY, DEFAULT_PERMISSIONS, NewZone, Resource, Zone};
pub use permissions::Permissions;
pub use request::CLIENT_COMMANDS;
pub use state::{
    Accepted, Answer, ApplyError, BroadcastLimit, Context, EventIds, InView, Outcome,
    REMEMBERED_COMMANDS, Session, SessionKey, ZoneSnapshot, ZoneState, ZoneView,
};
