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

/// Bits (`5`), a name or names (`"modify_zone"`, `"spawn_agents,modify_zone"`, `"0x05"`), or a
/// list of either (`["spawn_agents", "modify_zone"]`): the same everywhere permissions are taken.
impl<'de> Deserialize<'de> for Permissions {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(PermissionsVisitor { list: true })
    }
}

/// `list` is false inside a list: its items are bits or names, never lists of their own.
struct PermissionsVisitor {
    list: bool,
}

/// One item of a permission list.
struct PermissionItem(Permissions);

impl<'de> Deserialize<'de> for PermissionItem {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(PermissionsVisitor { list: false })
            .map(PermissionItem)
    }
}

impl<'de> serde::de::Visitor<'de> for PermissionsVisitor {
    type Value = Permissions;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.list {
            f.write_str("permission bits, a permission's name, or a list of them")
        } else {
            f.write_str("permission bits or a permission's name")
        }
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Permissions, E> {
        let bits =
            u32::try_from(v).map_err(|_| E::custom(format!("unknown permission: {v:#x}")))?;
        Permissions::from_bits_checked(bits).map_err(E::custom)
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Permissions, E> {
        let v = u64::try_from(v).map_err(|_| E::custom(format!("unknown permission: {v}")))?;
        self.visit_u64(v)
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Permissions, E> {
        v.parse().map_err(E::custom)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Permissions, A::Error> {
        if !self.list {
            return Err(serde::de::Error::invalid_type(
                serde::de::Unexpected::Seq,
                &self,
            ));
        }
        let mut all = Permissions::empty();
        while let Some(PermissionItem(one)) = seq.next_element()? {
            all |= one;
        }
        Ok(all)
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

    /// A name (`spawn_agents`), a number (`5`, `0x05`), or several of them separated by commas
    /// (`spawn_agents,modify_zone`).
    fn from_str(s: &str) -> Result<Self, ZoneError> {
        if s.contains(',') {
            return s
                .split(',')
                .try_fold(Self::empty(), |all, one| Ok(all | one.parse::<Self>()?));
        }
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

/// What the admin API takes and shows: bits, a name or a comma list of names, or a list of
/// either (it shows the bits).
#[cfg(feature = "openapi")]
impl utoipa::PartialSchema for Permissions {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Type};
        let bits = || {
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .minimum(Some(0))
                .maximum(Some(Permissions::all().bits()))
        };
        let names = Permissions::NAMED.map(|(name, _)| name);
        let one = || {
            OneOfBuilder::new().item(bits()).item(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .examples(names)
                    .description(Some(
                        "a permission's name, names separated by commas, or bits as a number \
                         (\"0x05\")",
                    )),
            )
        };
        OneOfBuilder::new()
            .item(one())
            .item(ArrayBuilder::new().items(one()))
            .description(Some(
                "Permission bits (spawn_agents 1, modify_zone 2, broadcast_events 4, admin_zone \
                 8), a name, or a list of them; shown as the bits.",
            ))
            .into()
    }
}

#[cfg(feature = "openapi")]
impl utoipa::ToSchema for Permissions {}

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
        assert_eq!(
            "spawn_agents, modify_zone"
                .parse::<Permissions>()
                .unwrap()
                .bits(),
            3
        );
        assert!("spawn_agents,".parse::<Permissions>().is_err());
        assert!("spawn_agents,fly".parse::<Permissions>().is_err());
        for (json, bits) in [
            ("5", 5),
            ("\"modify_zone\"", 2),
            ("\"0x05\"", 5),
            ("[\"spawn_agents\", \"modify_zone\"]", 3),
            ("[1, \"broadcast_events\"]", 5),
            ("[]", 0),
        ] {
            let p: Permissions = serde_json::from_str(json).unwrap();
            assert_eq!(p.bits(), bits, "{json}");
        }
        for bad in [
            "16",
            "-1",
            "\"fly\"",
            "[\"fly\"]",
            "4294967296",
            "1.5",
            "{}",
            "null",
            "[[]]",
            "[[1]]",
        ] {
            assert!(serde_json::from_str::<Permissions>(bad).is_err(), "{bad}");
        }
        let packed = rmp_serde::to_vec(&Permissions::from_bits_truncate(5)).unwrap();
        assert_eq!(
            rmp_serde::from_slice::<Permissions>(&packed)
                .unwrap()
                .bits(),
            5
        );
        assert!(Permissions::ADMIN_ZONE.allows(Permissions::MODIFY_ZONE));
        assert!(!Permissions::SPAWN_AGENTS.allows(Permissions::MODIFY_ZONE));
        assert_eq!(
            Permissions::from_bits_truncate(0x0f).to_string(),
            "0x0f [spawn_agents, modify_zone, broadcast_events, admin_zone]"
        );
    }
}
