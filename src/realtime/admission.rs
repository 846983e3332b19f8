//! Admission: caps on open WebSocket connections, in total and per client address, checked at
//! the upgrade so that a refused client costs one HTTP response (`503`), not a socket task.
//!
//! A [`Slot`] is held for as long as its connection is open; dropping it frees the place.
//!
//! "One address" is an IPv4 address, or an IPv6 /64: a single IPv6 host usually holds a whole
//! /64 and could otherwise pick a new address for every connection. Behind a reverse proxy
//! every client has the proxy's address; leave the per-address cap off there.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use prometheus::IntCounterVec;

/// Why a connection was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Full {
    #[error("the server holds its maximum of {0} connections (serve --max-connections)")]
    Total(usize),
    #[error("this address holds its maximum of {0} connections (serve --max-connections-per-ip)")]
    PerAddress(usize),
}

impl Full {
    /// The `reason` label it is counted under.
    pub fn label(self) -> &'static str {
        match self {
            Self::Total(_) => "max_connections",
            Self::PerAddress(_) => "max_connections_per_ip",
        }
    }
}

#[derive(Default)]
struct Open {
    total: usize,
    by_address: HashMap<IpAddr, usize>,
}

/// The caps and what is open.
pub struct Admission {
    max_total: usize,
    max_per_address: Option<usize>,
    open: Arc<Mutex<Open>>,
    refused: IntCounterVec,
}

impl Admission {
    /// `refused` counts refusals by [`Full::label`].
    pub fn new(max_total: usize, max_per_address: Option<usize>, refused: IntCounterVec) -> Self {
        for full in [Full::Total(0), Full::PerAddress(0)] {
            refused.with_label_values(&[full.label()]);
        }
        Self {
            max_total,
            max_per_address,
            open: Arc::default(),
            refused,
        }
    }

    /// A place for a connection from `address`, or why there is none.
    pub fn admit(&self, address: IpAddr) -> Result<Slot, Full> {
        let address = counted_as(address);
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let full = if open.total >= self.max_total {
            Some(Full::Total(self.max_total))
        } else {
            self.max_per_address
                .filter(|&max| open.by_address.get(&address).copied().unwrap_or(0) >= max)
                .map(Full::PerAddress)
        };
        if let Some(full) = full {
            self.refused.with_label_values(&[full.label()]).inc();
            return Err(full);
        }
        open.total += 1;
        *open.by_address.entry(address).or_insert(0) += 1;
        Ok(Slot {
            open: self.open.clone(),
            address,
        })
    }
}

/// The address a connection counts against: IPv4 (also when mapped into IPv6) as it is, IPv6
/// by its /64.
fn counted_as(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(_) => address,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(
                u128::from(v6) & !((1u128 << 64) - 1),
            )),
        },
    }
}

/// One admitted connection's place; freed when dropped.
pub struct Slot {
    open: Arc<Mutex<Open>>,
    address: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.total -= 1;
        if let Some(n) = open.by_address.get_mut(&self.address) {
            *n -= 1;
            if *n == 0 {
                open.by_address.remove(&self.address);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::Opts;

    fn refused() -> IntCounterVec {
        IntCounterVec::new(Opts::new("refused", "refused"), &["reason"]).unwrap()
    }

    #[test]
    fn caps_hold_in_total_and_per_address_and_free_on_drop() {
        let counted = refused();
        let admission = Admission::new(3, Some(2), counted.clone());
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = admission.admit(a).unwrap();
        let _a2 = admission.admit(a).unwrap();
        assert_eq!(admission.admit(a).err(), Some(Full::PerAddress(2)));
        let _b1 = admission.admit(b).unwrap();
        assert_eq!(admission.admit(b).err(), Some(Full::Total(3)));
        drop(a1);
        let _a3 = admission.admit(a).unwrap();
        assert_eq!(
            counted.with_label_values(&["max_connections_per_ip"]).get(),
            1
        );
        assert_eq!(counted.with_label_values(&["max_connections"]).get(), 1);
        // One IPv6 /64 is one address; an IPv4-mapped address is its IPv4 one.
        let v6 = Admission::new(10, Some(1), refused());
        let _held = v6.admit("2001:db8::1".parse().unwrap()).unwrap();
        assert!(v6.admit("2001:db8::ffff:2".parse().unwrap()).is_err());
        let _other = v6.admit("2001:db8:0:1::1".parse().unwrap()).unwrap();
        let _v4 = v6.admit(a).unwrap();
        assert!(v6.admit("::ffff:10.0.0.1".parse().unwrap()).is_err());
        let unlimited = Admission::new(10, None, refused());
        let slots: Vec<Slot> = (0..10).map(|_| unlimited.admit(a).unwrap()).collect();
        assert!(unlimited.admit(b).is_err());
        drop(slots);
        assert!(unlimited.open.lock().unwrap().by_address.is_empty());
    }
}
