//! Start-up: from a configuration to a running broker.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::app::{AdminKeys, App, AppState, Clock, KillSnapshot, Swap};
use crate::backend::Backend;
use crate::backend::aws::AwsBackend;
use crate::backend::github::GithubBackend;
use crate::backend::jwt::JwtBackend;
use crate::backend::vault::VaultBackend;
use crate::config::Config;
use crate::http::DevIssuer;
use crate::metrics::Metrics;
use crate::oidc::{StaticKeySource, Verifier};
use crate::policy::{BackendKind, IssuerInfo, LoadContext, PolicySet, VaultPolicyLimits};
use crate::seal::Sealer;

/// Kill rules older than this make `/readyz` unready. With a store other replicas share, the
/// rules held in memory must also be this fresh for an exchange to go on (DESIGN: a kill reaches
/// every replica within one second); the refresher re-reads them every 250 ms and at once when
/// another replica announces a change.
pub const KILL_FRESHNESS: Duration = Duration::from_secs(1);

/// How often every issuer's keys are fetched: a rotation is seen before its first token, and an
/// issuer's outage shows in its health within this long (one small GET per issuer and replica).
const KEY_REFRESH: Duration = Duration::from_secs(60);

/// How often an issuer whose last fetch failed is tried again, so that its recovery shows as
/// soon; the same floor as fetches caused by unknown keys.
const KEY_RETRY: Duration = Duration::from_secs(crate::oidc::MIN_REFRESH_INTERVAL_SECS.unsigned_abs());

/// What the policy loader needs from the configuration. Vault's token role is not read here
/// (`policy check` works offline): see [`app_policy_context`].
pub fn policy_context(config: &Config) -> LoadContext {
    let mut backends = Vec::new();
    if !config.backends.github.is_empty() {
        backends.push(BackendKind::Github);
    }
    if config.backends.aws.is_some() {
        backends.push(BackendKind::Aws);
    }
    if config.backends.vault.is_some() {
        backends.push(BackendKind::Vault);
    }
    if config.backends.jwt.enabled {
        backends.push(BackendKind::Jwt);
    }
    LoadContext {
        issuers: config
            .issuers
            .iter()
            .map(|i| {
                let info = IssuerInfo { kind: i.kind, required_claims: i.required_claims.keys().cloned().collect() };
                (i.id.clone(), info)
            })
            .collect(),
        backends,
        github_apps: config.backends.github.iter().map(|a| a.id.clone()).collect(),
        aws_role_path: config.backends.aws.as_ref().and_then(|a| a.role_path.clone()),
        vault_policies: None,
    }
}

/// The policy loader's context for a running broker: the configuration plus what start-up
/// learnt from the backends (the Vault token role's allowed policies).
pub fn app_policy_context(app: &App) -> LoadContext {
    LoadContext { vault_policies: app.vault_policies.clone(), ..policy_context(&app.config) }
}

/// Builds the Vault backend and reads its token role. Vault being down does not stop the
/// broker: its grants then fail at mint (503) until it is back, and policies are checked
/// against the role at mint instead of at load.
async fn build_vault(
    config: &Config,
    vault: &crate::config::VaultConfig,
    clock: Arc<dyn Clock>,
) -> anyhow::Result<(Arc<dyn Backend>, Option<VaultPolicyLimits>)> {
    let backend = VaultBackend::new(vault, |p| config.resolve(p), config.limits.outbound_timeout, clock)
        .context("configuring the vault backend")?;
    let limits = match backend.read_role().await {
        Ok(facts) => Some(facts.limits),
        Err(e) => {
            tracing::warn!(
                error = %e,
                "cannot read the Vault token role; token grants' policies are checked when minted instead"
            );
            None
        }
    };
    Ok((Arc::new(backend), limits))
}

/// Options that differ between `serve`, `dev` and tests.
#[derive(Debug)]
pub struct Options {
    pub clock: Arc<dyn Clock>,
    /// Apply pending migrations (`dev`, tests); `serve` refuses an unmigrated store instead.
    pub migrate: bool,
    /// `latchkey dev`'s built-in issuer, which takes its keys from memory.
    pub dev_issuer: Option<DevIssuer>,
    /// A sealer to use instead of the key files (`dev`, tests).
    pub sealer: Option<Sealer>,
    /// Backends that replace the configured ones of their kind: doubles, in tests, for
    /// services that have no local server.
    pub backends: Vec<Arc<dyn Backend>>,
}

/// Builds the application: sealing key, ledger, verifier, backends, policies, kill rules.
pub async fn build(config: Config, options: Options) -> anyhow::Result<AppState> {
    let clock = options.clock;
    let sealer = match options.sealer {
        Some(s) => s,
        None => Sealer::load(
            &config.resolve(&config.sealing.key_file),
            &config.sealing.previous_key_files.iter().map(|p| config.resolve(p)).collect::<Vec<_>>(),
        )
        .context("serve refuses to start without its sealing key")?,
    };
    let checkpoint_key = match &config.audit.checkpoint_key_file {
        Some(path) => Some(
            crate::checkpoint::CheckpointKey::load(&config.resolve(path))
                .context("serve refuses to start without its configured checkpoint key")?,
        ),
        None => {
            tracing::warn!("no [audit] checkpoint_key_file: the audit chain gets no signed checkpoints");
            None
        }
    };
    let admin_oidc = config
        .admin_oidc
        .as_ref()
        .map(|c| crate::app::AdminOidc::new(c, config.limits.outbound_timeout, clock.clone()))
        .transpose()
        .context("configuring [admin_oidc]")?;
    let store_url = resolve_store_url(&config);
    let ledger = crate::ledger::open(&store_url, options.migrate, &config.store.postgres())
        .await
        .context("opening the store")?;
    let mut verifier =
        Verifier::new(&config.issuers, &config.server.audience, config.limits.outbound_timeout, clock.clone())
            .context("configuring issuers")?;
    if let Some(dev) = &options.dev_issuer {
        let id = config.issuers.iter().find(|i| i.url == dev.url()).map(|i| i.id.clone()).unwrap_or_default();
        verifier =
            verifier.with_key_source(&id, Arc::new(StaticKeySource::from_json(dev.jwks().to_string().as_bytes())?));
    }
    let now = clock.now();
    let metrics = Metrics::new();
    let jwt = Arc::new(JwtBackend::load_or_create(&*ledger, &sealer, config.public_url(), now).await?);
    let mut backends: HashMap<BackendKind, Arc<dyn Backend>> = HashMap::new();
    if config.backends.jwt.enabled {
        backends.insert(BackendKind::Jwt, jwt.clone());
    }
    // An injected backend replaces the configured one of its kind, which is then not built.
    let injected: Vec<BackendKind> = options.backends.iter().map(|b| b.kind()).collect();
    if !config.backends.github.is_empty() && !injected.contains(&BackendKind::Github) {
        let github = GithubBackend::new(&config.backends.github, |p| config.resolve(p), config.limits.outbound_timeout)
            .context("configuring the GitHub backend")?
            .with_metrics(&metrics);
        backends.insert(BackendKind::Github, Arc::new(github));
    }
    if let Some(aws) = &config.backends.aws
        && !injected.contains(&BackendKind::Aws)
    {
        let backend = AwsBackend::new(aws, config.limits.outbound_timeout, clock.clone()).await;
        backends.insert(BackendKind::Aws, Arc::new(backend));
    }
    let mut vault_policies = None;
    if let Some(vault) = &config.backends.vault
        && !injected.contains(&BackendKind::Vault)
    {
        let (backend, limits) = build_vault(&config, vault, clock.clone()).await?;
        backends.insert(BackendKind::Vault, backend);
        vault_policies = limits;
    }
    for backend in options.backends {
        backends.insert(backend.kind(), backend);
    }
    let policy_dir = config.resolve(&config.policies.dir);
    let context = LoadContext { vault_policies: vault_policies.clone(), ..policy_context(&config) };
    let policies = PolicySet::load_dir(&policy_dir, &context).map_err(|errors| {
        let list: Vec<String> = errors.iter().map(|e| format!("  {e}")).collect();
        anyhow::anyhow!("policies in {} do not load:\n{}", policy_dir.display(), list.join("\n"))
    })?;
    let kill_state = ledger.kill_state(now).await.context("reading kill rules")?;
    let backend_slots = backends
        .keys()
        .map(|k| (*k, Arc::new(tokio::sync::Semaphore::new(config.limits.backend_concurrency))))
        .collect();
    let app = App {
        admin_keys: Swap::new(AdminKeys::new(&config.admin_keys)),
        admin_oidc: Swap::new(admin_oidc),
        checkpoint_key,
        clock,
        ledger,
        verifier,
        policies: Swap::new(policies),
        kills: Swap::new(KillSnapshot::new(kill_state, now)),
        backends,
        vault_policies,
        jwt,
        sealer,
        metrics,
        jobs_wake: tokio::sync::Notify::new(),
        per_ip: config.limits.per_ip.map(|mut rate| {
            rate.burst = config.limits.per_ip_burst.unwrap_or(rate.count).min(rate.count);
            crate::http::ip_limit::IpLimiter::new(rate)
        }),
        backend_slots,
        config,
    };
    Ok(AppState(Arc::new(app)))
}

/// `sqlite://relative.db` resolves against the config file's directory.
pub fn resolve_store_url(config: &Config) -> String {
    match config.store.url.strip_prefix("sqlite://") {
        Some(path) => format!("sqlite://{}", config.resolve(std::path::Path::new(path)).display()),
        None => config.store.url.clone(),
    }
}

/// A running broker: where it listens, and how to stop it.
#[derive(Debug)]
pub struct Running {
    pub addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    pub tls: bool,
    handle: axum_server::Handle<SocketAddr>,
    admin_handle: Option<axum_server::Handle<SocketAddr>>,
    tasks: Vec<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Running {
    pub fn url(&self) -> String {
        format!("{}://{}", if self.tls { "https" } else { "http" }, self.addr)
    }

    /// Stops accepting, lets requests in flight finish (bounded), and returns.
    pub async fn shutdown(self) {
        self.handle.graceful_shutdown(Some(Duration::from_secs(10)));
        if let Some(h) = &self.admin_handle {
            h.graceful_shutdown(Some(Duration::from_secs(1)));
        }
        for t in self.tasks {
            let _ = t.await;
        }
    }

    /// Waits until the listeners stop.
    pub async fn wait(self) -> anyhow::Result<()> {
        for t in self.tasks {
            t.await??;
        }
        Ok(())
    }

    pub fn handle(&self) -> axum_server::Handle<SocketAddr> {
        self.handle.clone()
    }
}

/// Disconnects HTTP/1 clients that take longer than `timeout` to send a request head (the
/// whole of it, counted from the first byte of each request), so that clients trickling headers
/// byte by byte (slow-loris) cannot pile up connections. hyper enforces the timeout only when it
/// has a timer: without one, its documented default of 30 s silently does nothing.
fn bound_header_reads(
    builder: &mut hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>,
    timeout: Duration,
) {
    builder.http1().timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(timeout);
    // HTTP/2 (TLS with ALPN, or prior knowledge): a peer that stops answering pings is dropped.
    builder.http2().timer(hyper_util::rt::TokioTimer::new()).keep_alive_interval(timeout).keep_alive_timeout(timeout);
}

/// Drops a connection whose first bytes do not arrive within the timeout. hyper first reads
/// enough bytes to tell HTTP/2's preface from HTTP/1, without any timeout, and its header-read
/// timeout starts only after that: a client that connects and sends nothing, or trickles the
/// HTTP/2 preface, would otherwise hold its connection for ever. Under TLS this sees the
/// handshake's first bytes, and the handshake itself has its own 10 s limit.
#[derive(Debug, Clone, Copy)]
struct FirstBytes(Duration);

impl<S: Send + 'static> axum_server::accept::Accept<tokio::net::TcpStream, S> for FirstBytes {
    type Stream = tokio::net::TcpStream;
    type Service = S;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = std::io::Result<(tokio::net::TcpStream, S)>> + Send + 'static>,
    >;

    fn accept(&self, stream: tokio::net::TcpStream, service: S) -> Self::Future {
        let timeout = self.0;
        Box::pin(async move {
            match tokio::time::timeout(timeout, version_decidable(&stream)).await {
                Ok(Ok(())) => Ok((stream, service)),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "no request within the timeout")),
            }
        })
    }
}

/// Waits (peeking, consuming nothing) until the bytes received so far are no longer a prefix of
/// the HTTP/2 preface, or are the whole of it, or the peer closed: hyper can then choose a
/// protocol at once, and the protocol's own timeouts take over.
async fn version_decidable(stream: &tokio::net::TcpStream) -> std::io::Result<()> {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut buf = [0u8; PREFACE.len()];
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 || n == PREFACE.len() || buf[..n] != PREFACE[..n] {
            return Ok(());
        }
        // Part of the preface only: `peek` would return at once again, so wait a little.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Makes aws-lc-rs the process's one rustls crypto provider, before any TLS client or server is
/// built. Idempotent. The dependency tree holds no other provider (`scripts/test.sh` checks that
/// `ring` is not built), so rustls can never find two and refuse to choose.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// Binds the listeners (TLS when a certificate is configured), starts the background work
/// (unless `background` is false: tests that drive the workers themselves), and returns once the
/// broker accepts connections.
pub async fn start(app: AppState, dev_issuer: Option<DevIssuer>, background: bool) -> anyhow::Result<Running> {
    install_crypto_provider();
    let config = &app.config;
    let router = crate::http::router(app.clone(), dev_issuer);
    let handle = axum_server::Handle::new();
    let listener = std::net::TcpListener::bind(config.server.listen)
        .with_context(|| format!("cannot listen on {}", config.server.listen))?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let tls = config.server.tls_cert_file.is_some();
    let mut tasks = Vec::new();
    // Handlers see the peer's address (`[limits] per_ip`).
    let service = router.into_make_service_with_connect_info::<SocketAddr>();
    match (&config.server.tls_cert_file, &config.server.tls_key_file) {
        (Some(cert), Some(key)) => {
            let tls = axum_server::tls_rustls::RustlsConfig::from_pem_file(config.resolve(cert), config.resolve(key))
                .await
                .context("loading the TLS certificate and key")?;
            let acceptor = axum_server::tls_rustls::RustlsAcceptor::new(tls)
                .acceptor(FirstBytes(config.server.header_read_timeout));
            let mut server = axum_server::from_tcp(listener)?.acceptor(acceptor).handle(handle.clone());
            bound_header_reads(server.http_builder(), config.server.header_read_timeout);
            tasks.push(tokio::spawn(async move { server.serve(service).await }));
        }
        (None, None) => {
            let mut server = axum_server::from_tcp(listener)?
                .acceptor(FirstBytes(config.server.header_read_timeout))
                .handle(handle.clone());
            bound_header_reads(server.http_builder(), config.server.header_read_timeout);
            tasks.push(tokio::spawn(async move { server.serve(service).await }));
        }
        _ => bail!("server.tls_cert_file and server.tls_key_file go together"),
    }
    let mut admin_addr = None;
    let mut admin_handle = None;
    if let Some(admin) = config.server.admin_listen {
        let listener = std::net::TcpListener::bind(admin).with_context(|| format!("cannot listen on {admin}"))?;
        listener.set_nonblocking(true)?;
        admin_addr = Some(listener.local_addr()?);
        let h = axum_server::Handle::new();
        let mut server =
            axum_server::from_tcp(listener)?.acceptor(FirstBytes(config.server.header_read_timeout)).handle(h.clone());
        bound_header_reads(server.http_builder(), config.server.header_read_timeout);
        let service = crate::http::ops_router(app.clone()).into_make_service();
        tasks.push(tokio::spawn(async move { server.serve(service).await }));
        admin_handle = Some(h);
    }
    app.verifier.refresh_all().await;
    if let Err(e) = crate::worker::reconcile(&app).await {
        tracing::warn!(error = %e, "start-up reconciliation could not reach the ledger");
    }
    // Blobs still sealed with a previous sealing key move to the current one before anything
    // else may need them; the pass runs again every minute.
    if let Err(e) = crate::keys::reseal(&app).await {
        tracing::warn!(error = %e, "start-up re-seal pass could not reach the ledger");
    }
    // Rules that lapsed while no broker ran get their `kill.lapsed` event now.
    if let Err(e) = crate::worker::record_lapses(&app).await {
        tracing::warn!(error = %e, "could not record lapsed kill rules");
    }
    if background {
        crate::worker::spawn_all(&app);
        crate::checkpoint::spawn_periodic(&app);
        crate::stream::spawn(&app)?;
        // Keys an issuer publishes ahead of a rotation are picked up before its first token, and
        // an issuer's outage shows in /readyz and latchkey_issuer_up within a minute.
        app.verifier.spawn_periodic_refresh(KEY_REFRESH, KEY_RETRY);
    }
    Ok(Running { addr, admin_addr, tls, handle, admin_handle, tasks })
}

/// Sets up logging: `RUST_LOG` filters, `LATCHKEY_LOG_FORMAT=json` for machines.
pub fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("LATCHKEY_LOG_FORMAT").is_ok_and(|v| v == "json");
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if json { builder.json().flatten_event(true).try_init() } else { builder.try_init() };
}
