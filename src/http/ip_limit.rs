//! The per-source-address limit of `/v1/token` (`[limits] per_ip`), kept in this process's
//! memory: a flood is refused before it costs a signature check or a store write. Each replica
//! counts its own (a shared counter would turn every refused request into a database write,
//! which is what this limit protects against); behind N replicas an address gets up to N times
//! the rate. IPv6 addresses are counted per /64, the block one host usually holds.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::policy::Rate;
use crate::policy::limits::gcra;

/// Addresses tracked at once; beyond that, buckets that have refilled are dropped first.
const MAX_TRACKED: usize = 100_000;

#[derive(Debug)]
pub struct IpLimiter {
    rate: Rate,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tat: DateTime<Utc>,
    /// When this address's refusals were last written to the audit trail.
    audited: Option<DateTime<Utc>>,
}

/// A refusal: how long to wait, and whether this one should be audited (at most once a minute
/// per address, so that a flood does not become a flood of audit events).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub retry_after: Duration,
    pub audit: bool,
}

impl IpLimiter {
    pub fn new(rate: Rate) -> Self {
        IpLimiter { rate, buckets: Mutex::new(HashMap::new()) }
    }

    pub fn rate(&self) -> Rate {
        self.rate
    }

    pub fn check(&self, ip: IpAddr, now: DateTime<Utc>) -> Result<(), Refusal> {
        let key = counted_as(ip);
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_TRACKED && !buckets.contains_key(&key) {
            buckets.retain(|_, b| b.tat > now);
        }
        let bucket = buckets.get(&key).copied();
        match gcra(bucket.map(|b| b.tat), now, self.rate.interval(), self.rate.tolerance()) {
            Ok(tat) => {
                if buckets.len() < MAX_TRACKED || bucket.is_some() {
                    buckets.insert(key, Bucket { tat, audited: bucket.and_then(|b| b.audited) });
                }
                Ok(())
            }
            Err(retry_after) => {
                let audit = bucket.and_then(|b| b.audited).is_none_or(|at| now - at >= chrono::Duration::minutes(1));
                if audit && let Some(b) = buckets.get_mut(&key) {
                    b.audited = Some(now);
                }
                Err(Refusal { retry_after, audit })
            }
        }
    }
}

/// The address a bucket belongs to: IPv4 as is, IPv6 by its /64.
fn counted_as(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_over_its_rate_waits_and_is_audited_once_a_minute() {
        let limiter = IpLimiter::new(Rate { count: 2, per: Duration::from_secs(60), burst: 2 });
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let t0 = Utc::now();
        assert!(limiter.check(a, t0).is_ok());
        assert!(limiter.check(a, t0).is_ok());
        let first = limiter.check(a, t0).unwrap_err();
        assert!(first.audit && first.retry_after == Duration::from_secs(30), "{first:?}");
        assert!(!limiter.check(a, t0 + chrono::Duration::seconds(1)).unwrap_err().audit);
        assert!(limiter.check(b, t0).is_ok(), "another address has its own bucket");
        assert!(limiter.check(a, t0 + chrono::Duration::seconds(30)).is_ok());
    }

    #[test]
    fn ipv6_addresses_of_one_64_share_a_bucket() {
        let limiter = IpLimiter::new(Rate { count: 1, per: Duration::from_secs(60), burst: 1 });
        let t0 = Utc::now();
        assert!(limiter.check("2001:db8:1:2::1".parse().unwrap(), t0).is_ok());
        assert!(limiter.check("2001:db8:1:2::ffff".parse().unwrap(), t0).is_err());
        assert!(limiter.check("2001:db8:1:3::1".parse().unwrap(), t0).is_ok());
    }
}
