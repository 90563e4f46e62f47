//! Prometheus metrics served at `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExchangeLabels {
    pub capability: String,
    /// `allowed`, `denied`, `limited`, `invalid`, `failed`.
    pub decision: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    pub capability: String,
    /// `per_identity`, `per_capability`, `max_active`, `per_ip`.
    pub limit: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IssuerLabels {
    pub issuer: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabels {
    pub outcome: String,
}

/// Every metric latchkey exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub exchanges: Family<ExchangeLabels, Counter>,
    pub exchange_seconds: Histogram,
    /// Exchanges refused by a limit, by capability and limit.
    pub limits_hit: Family<LimitLabels, Counter>,
    pub jwks_refreshes: Family<IssuerLabels, Gauge>,
    pub jwks_refresh_failures: Family<IssuerLabels, Gauge>,
    pub issuer_up: Family<IssuerLabels, Gauge>,
    pub job_queue_depth: Gauge,
    pub jobs: Family<JobLabels, Counter>,
    pub policy_reload_failures: Counter,
    /// Credentials possibly issued without a recorded handle: an alert, each one.
    pub possibly_issued: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("latchkey");
        let exchanges = Family::<ExchangeLabels, Counter>::default();
        registry.register("exchanges", "Token exchanges by capability and decision", exchanges.clone());
        let buckets = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
        let exchange_seconds = Histogram::new(buckets);
        registry.register("exchange_duration_seconds", "Time to answer a token exchange", exchange_seconds.clone());
        let limits_hit = Family::<LimitLabels, Counter>::default();
        registry.register("limits_hit", "Exchanges refused by a limit (429 slow_down)", limits_hit.clone());
        let jwks_refreshes = Family::<IssuerLabels, Gauge>::default();
        registry.register("jwks_refreshes", "JWKS fetches per issuer since start", jwks_refreshes.clone());
        let jwks_refresh_failures = Family::<IssuerLabels, Gauge>::default();
        registry.register(
            "jwks_refresh_failures",
            "Failed JWKS fetches per issuer since start",
            jwks_refresh_failures.clone(),
        );
        let issuer_up = Family::<IssuerLabels, Gauge>::default();
        registry.register("issuer_up", "1 when the issuer's last key refresh succeeded", issuer_up.clone());
        let job_queue_depth = Gauge::default();
        registry.register("job_queue_depth", "Background jobs not yet done", job_queue_depth.clone());
        let jobs = Family::<JobLabels, Counter>::default();
        registry.register("jobs", "Background jobs run, by outcome", jobs.clone());
        let policy_reload_failures = Counter::default();
        registry.register("policy_reload_failures", "Policy reloads refused", policy_reload_failures.clone());
        let possibly_issued = Counter::default();
        registry.register(
            "credentials_possibly_issued",
            "Credentials left by a crash between mint and record that cannot be revoked (alert on any)",
            possibly_issued.clone(),
        );
        Metrics {
            registry,
            exchanges,
            exchange_seconds,
            limits_hit,
            jwks_refreshes,
            jwks_refresh_failures,
            issuer_up,
            job_queue_depth,
            jobs,
            policy_reload_failures,
            possibly_issued,
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
