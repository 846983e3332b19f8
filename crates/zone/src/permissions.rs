//! Zone permission bits, as in the seed briefing: who may spawn agents, modify the zone,
//! broadcast, or administer it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::error::ZoneError;

bitflags::bitflags! {
    /// A permission bitfield. `ADMIN_ZONE` allows everything. In JSON it is the number.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct Permissions: u32 {
        const SPAWN_AGENTS = 0x01;
        const MODIFY_ZONE = 0x02;
        const BROADCAST_EVENTS = 0x04;
        const ADMIN_ZONE = 0x08;
    }
}

impl Serialize for Permissions {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u32(self.bits())
    }
}

impl<'de> Deserialize<'de> for Permissions {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bits = u32::deserialize(d)?;
        Self::from_bits_checked(bits).map_err(serde::de::Error::custom)
    }
}

impl Permissions {
    /// Every permission's name and bit, in bit order.
    pub const NAMED: [(&'static str, Permissions); 4] = [
        ("spawn_agents", Self::SPAWN_AGENTS),
        ("modify_zone", Self::MODIFY_ZONE),
        ("broadcast_events", Self::BROADCAST_EVENTS),
        ("admin_zone", Self::ADMIN_ZONE),
    ];

    /// Whether these bits allow `needed`: they hold it, or they hold `ADMIN_ZONE`.
    pub fn allows(self, needed: Permissions) -> bool {
        self.contains(Self::ADMIN_ZONE) || self.contains(needed)
    }

    /// Bits from a raw number, refusing bits that name no permission.
    pub fn from_bits_checked(bits: u32) -> Result<Self, ZoneError> {
        Self::from_bits(bits).ok_or(ZoneError::UnknownPermission(format!("{bits:#x}")))
    }

    pub fn names(self) -> Vec<&'static str> {
        Self::NAMED
            .iter()
            .filter(|(_, p)| self.contains(*p))
            .map(|(n, _)| *n)
            .collect()
    }
}

impl FromStr for Permissions {
    type Err = ZoneError;

    /// A name (`spawn_agents`), or a number (`5`, `0x05`).
    fn from_str(s: &str) -> Result<Self, ZoneError> {
        let s = s.trim();
        if let Some((_, p)) = Self::NAMED.iter().find(|(n, _)| *n == s) {
            return Ok(*p);
        }
        let bits = match s.strip_prefix("0x") {
            Some(hex) => u32::from_str_radix(hex, 16),
            None => s.parse(),
        }
        .map_err(|_| ZoneError::UnknownPermission(s.to_owned()))?;
        Self::from_bits_checked(bits)
    }
}

impl fmt::Display for Permissions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#04x} [{}]", self.bits(), self.names().join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_numbers_and_admin() {
        assert_eq!(
            "modify_zone".parse::<Permissions>().unwrap(),
            Permissions::MODIFY_ZONE
        );
        assert_eq!("0x05".parse::<Permissions>().unwrap().bits(), 5);
        assert_eq!("5".parse::<Permissions>().unwrap().bits(), 5);
        assert!("0x10".parse::<Permissions>().is_err());
        assert!("fly".parse::<Permissions>().is_err());
        assert!(Permissions::ADMIN_ZONE.allows(Permissions::MODIFY_ZONE));
        assert!(!Permissions::SPAWN_AGENTS.allows(Permissions::MODIFY_ZONE));
        assert_eq!(
            Permissions::from_bits_truncate(0x0f).to_string(),
            "0x0f [spawn_agents, modify_zone, broadcast_events, admin_zone]"
        );
    }
}
