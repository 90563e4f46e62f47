//! `[limits]` of a policy: how often, and how much at once, an identity may take a capability.
//!
//! ```toml
//! [limits]
//! per_identity = "30/hour"     # exchanges per identity (agent + repository)
//! per_capability = "600/hour"  # exchanges of the capability, all identities together
//! burst = 5                    # how many of a rate may come at once (default: all of it)
//! max_active = 5               # live exchanges per identity at one time
//! ```
//!
//! Rates are enforced with GCRA (the generic cell rate algorithm): one stored time per bucket,
//! the "theoretical arrival time", so a rate is counted in the store and therefore across
//! replicas, and a bucket costs one row whatever its rate.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Deserialize;

/// A rate: `count` exchanges per `per`, at most `burst` of them at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
    pub burst: u32,
}

impl Rate {
    /// Parses `N/second`, `N/minute`, `N/hour` or `N/day`.
    pub fn parse(text: &str) -> Result<Rate, String> {
        let bad = || format!("rate `{text}` is not like \"30/hour\" (N/second, N/minute, N/hour or N/day)");
        let (count, unit) = text.split_once('/').ok_or_else(bad)?;
        let count: u32 = count.trim().parse().map_err(|_| bad())?;
        let per = match unit.trim() {
            "second" | "s" => Duration::from_secs(1),
            "minute" | "min" | "m" => Duration::from_secs(60),
            "hour" | "h" => Duration::from_secs(3600),
            "day" | "d" => Duration::from_secs(86_400),
            _ => return Err(bad()),
        };
        if count == 0 || count > 1_000_000 {
            return Err(format!("rate `{text}`: the count must be between 1 and 1000000"));
        }
        Ok(Rate { count, per, burst: count })
    }

    /// Time between two exchanges at the steady rate.
    pub fn interval(&self) -> Duration {
        self.per / self.count
    }

    /// How far ahead of the steady rate a bucket may run: `burst - 1` intervals.
    pub fn tolerance(&self) -> Duration {
        self.interval() * self.burst.saturating_sub(1)
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let unit = match self.per.as_secs() {
            1 => "second",
            60 => "minute",
            3600 => "hour",
            _ => "day",
        };
        write!(f, "{}/{unit}", self.count)?;
        if self.burst != self.count {
            write!(f, " (burst {})", self.burst)?;
        }
        Ok(())
    }
}

/// A policy's limits, all optional.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub per_identity: Option<Rate>,
    pub per_capability: Option<Rate>,
    pub max_active: Option<u32>,
}

impl Limits {
    /// Whether an exchange is charged against a rate bucket.
    pub fn charges_rate(&self) -> bool {
        self.per_identity.is_some() || self.per_capability.is_some()
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    per_identity: Option<String>,
    per_capability: Option<String>,
    burst: Option<u32>,
    max_active: Option<u32>,
}

impl RawLimits {
    pub(super) fn compile(self, errors: &mut Vec<String>) -> Limits {
        let mut rate = |name: &str, text: Option<String>| {
            let text = text?;
            match Rate::parse(&text) {
                Ok(mut r) => {
                    if let Some(burst) = self.burst {
                        if burst == 0 {
                            errors.push("limits: burst must be at least 1".to_owned());
                            return None;
                        }
                        // A burst larger than the rate's own count would let more through in one
                        // window than the rate says.
                        r.burst = burst.min(r.count);
                    }
                    Some(r)
                }
                Err(e) => {
                    errors.push(format!("limits.{name}: {e}"));
                    None
                }
            }
        };
        let per_identity = rate("per_identity", self.per_identity);
        let per_capability = rate("per_capability", self.per_capability);
        if self.burst.is_some() && per_identity.is_none() && per_capability.is_none() {
            errors.push("limits: burst needs per_identity or per_capability".to_owned());
        }
        if self.max_active == Some(0) {
            errors.push("limits: max_active must be at least 1 (remove the policy to refuse everything)".to_owned());
        }
        Limits { per_identity, per_capability, max_active: self.max_active }
    }
}

/// One step of GCRA for a bucket whose theoretical arrival time is `tat` (`None` for a bucket
/// never used, or pruned): the new time to store when the exchange may go, or how long to wait.
pub fn gcra(
    tat: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
    interval: Duration,
    tolerance: Duration,
) -> Result<DateTime<Utc>, Duration> {
    let interval = chrono::Duration::from_std(interval).unwrap_or(chrono::Duration::MAX);
    let tolerance = chrono::Duration::from_std(tolerance).unwrap_or(chrono::Duration::MAX);
    let tat = tat.filter(|t| *t > now).unwrap_or(now);
    let ahead = tat - now;
    if ahead > tolerance {
        return Err((ahead - tolerance).to_std().unwrap_or_default());
    }
    Ok(tat + interval)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(1_700_000_000_000 + ms).unwrap()
    }

    #[test]
    fn rates_parse_and_refuse_nonsense() {
        let r = Rate::parse("30/hour").unwrap();
        assert_eq!((r.count, r.per, r.burst), (30, Duration::from_secs(3600), 30));
        assert_eq!(r.interval(), Duration::from_secs(120));
        for bad in ["30", "0/hour", "x/hour", "30/fortnight", "-1/hour", "30/"] {
            assert!(Rate::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn gcra_lets_a_burst_through_then_the_steady_rate() {
        // 3 per minute, burst 3: three at once, then one every 20 s.
        let r = Rate { count: 3, per: Duration::from_secs(60), burst: 3 };
        let mut tat = None;
        for _ in 0..3 {
            tat = Some(gcra(tat, t(0), r.interval(), r.tolerance()).unwrap());
        }
        let wait = gcra(tat, t(0), r.interval(), r.tolerance()).unwrap_err();
        assert_eq!(wait, Duration::from_secs(20));
        assert!(gcra(tat, t(19_999), r.interval(), r.tolerance()).is_err());
        tat = Some(gcra(tat, t(20_000), r.interval(), r.tolerance()).unwrap());
        assert!(gcra(tat, t(20_000), r.interval(), r.tolerance()).is_err());
        // A bucket left alone refills: after a minute, a full burst again.
        let mut tat = Some(gcra(tat, t(120_000), r.interval(), r.tolerance()).unwrap());
        for _ in 0..2 {
            tat = Some(gcra(tat, t(120_000), r.interval(), r.tolerance()).unwrap());
        }
        assert!(gcra(tat, t(120_000), r.interval(), r.tolerance()).is_err());
    }

    #[test]
    fn limits_that_make_no_sense_do_not_load() {
        let compile = |text: &str| {
            let raw: RawLimits = toml::from_str(text).unwrap();
            let mut errors = Vec::new();
            let limits = raw.compile(&mut errors);
            (limits, errors)
        };
        let (limits, errors) = compile("per_identity = \"30/hour\"\nburst = 50\nmax_active = 5");
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(limits.per_identity.map(|r| r.burst), Some(30), "a burst is capped at the rate's count");
        assert_eq!(limits.max_active, Some(5));
        for (text, expected) in [
            ("per_identity = \"lots\"", "limits.per_identity"),
            ("per_capability = \"5/week\"", "limits.per_capability"),
            ("burst = 3", "burst needs"),
            ("per_identity = \"1/hour\"\nburst = 0", "at least 1"),
            ("max_active = 0", "max_active must be at least 1"),
        ] {
            let (_, errors) = compile(text);
            assert!(errors.iter().any(|e| e.contains(expected)), "{text}: {errors:?}");
        }
        assert!(toml::from_str::<RawLimits>("per_hour = 3").is_err(), "unknown keys are refused");
    }

    #[test]
    fn burst_one_is_the_steady_rate() {
        let r = Rate { count: 2, per: Duration::from_secs(10), burst: 1 };
        let tat = Some(gcra(None, t(0), r.interval(), r.tolerance()).unwrap());
        assert_eq!(gcra(tat, t(0), r.interval(), r.tolerance()).unwrap_err(), Duration::from_secs(5));
        assert!(gcra(tat, t(5_000), r.interval(), r.tolerance()).is_ok());
    }
}
