// An OIDC issuer for latchkey's tests, shaped like GitHub Actions' token issuer.
//
// The issuer itself is npm `oauth2-mock-server` (discovery, JWKS, signing): an implementation
// that is not ours, so a test that passes against it says something about latchkey. This file
// only adds GitHub Actions claims and the key-rotation controls that tests need.
//
//   node server.js          listens on 127.0.0.1:$OIDC_ISSUER_PORT (default: a free port) and
//                           prints one line, {"url": "http://127.0.0.1:PORT"}, when it answers.
//   OIDC_ISSUER_ALG         algorithm of the first signing key: RS256 (default) or ES256.
//
// Endpoints (besides the library's /.well-known/openid-configuration, /jwks, /token):
//   POST /token             grant_type=client_credentials, aud=<audience> (repeat for several),
//                           claims=<JSON object merged into the payload; null removes a claim>,
//                           header=<JSON object merged into the JOSE header; null removes>.
//   POST /_control/rotate   alg=RS256|ES256 (default: the current one): a new key signs from now
//                           on; the old keys stay published in the JWKS. Answers {kid, alg}.
//   POST /_control/retire   unpublish every key but the signing key. Answers {kids}.
//   POST /_control/issuers  alg=RS256|ES256: start another issuer, with its own port and keys,
//                           in this process, for tests that change keys. Answers {url}.
//   POST /_control/outage   url=<an issuer of this process>, mode=refused|hanging|up: the issuer
//                           at url goes down, for tests of an issuer outage. `refused` closes its
//                           port (connections are refused, open ones are cut); `hanging` accepts
//                           connections and never answers; `up` serves again, on the same port,
//                           with the same keys. Send it to another issuer of the process: the
//                           one that is down cannot take it. Answers {url, mode}.
// Control parameters may come as a form, as JSON or in the query string.

import { createServer } from 'node:http';
import { AssertionError } from 'node:assert';
import { randomUUID } from 'node:crypto';
import { OAuth2Issuer, OAuth2Service } from 'oauth2-mock-server';

const HOST = '127.0.0.1';
const ALGORITHMS = ['RS256', 'ES256'];

// Claims of a push to main in acme/widgets. Ids are strings, as GitHub sends them.
const GITHUB_DEFAULTS = {
  repository: 'acme/widgets',
  repository_owner_id: '1234567',
  repository_id: '7654321',
  repository_visibility: 'private',
  ref: 'refs/heads/main',
  ref_protected: 'true',
  sha: 'a3f5c0d2e1b4a6978c0d1e2f3a4b5c6d7e8f9a0b',
  workflow: 'CI',
  workflow_sha: 'a3f5c0d2e1b4a6978c0d1e2f3a4b5c6d7e8f9a0b',
  job_workflow_sha: 'a3f5c0d2e1b4a6978c0d1e2f3a4b5c6d7e8f9a0b',
  head_ref: '',
  base_ref: '',
  event_name: 'push',
  actor: 'octocat',
  actor_id: '583231',
  run_id: '9876543210',
  run_number: '42',
  run_attempt: '1',
  runner_environment: 'github-hosted',
};

// Claims that GitHub derives from others; derived from the caller's values unless the caller
// sets them too, so that overriding `repository` or `ref` gives a consistent token.
function derivedClaims(c) {
  const workflowRef = `${c.repository}/.github/workflows/ci.yml@${c.ref}`;
  let sub = `repo:${c.repository}:ref:${c.ref}`;
  if (typeof c.environment === 'string') sub = `repo:${c.repository}:environment:${c.environment}`;
  else if (String(c.event_name).startsWith('pull_request')) sub = `repo:${c.repository}:pull_request`;
  return {
    sub,
    repository_owner: String(c.repository).split('/')[0],
    ref_type: String(c.ref).startsWith('refs/tags/') ? 'tag' : 'branch',
    workflow_ref: workflowRef,
    job_workflow_ref: workflowRef,
  };
}

function parseObject(text, field) {
  if (text === undefined || text === '') return {};
  let value;
  try {
    value = JSON.parse(text);
  } catch {
    throw new AssertionError({ message: `'${field}' is not JSON` });
  }
  if (value === null || typeof value !== 'object' || Array.isArray(value)) {
    throw new AssertionError({ message: `'${field}' must be a JSON object` });
  }
  return value;
}

// Merges `overrides` into `target`; a null value removes the key. It becomes undefined rather
// than deleted: JSON leaves it out, and it still overrides the library's defaults (header `typ`).
function merge(target, overrides) {
  for (const [name, value] of Object.entries(overrides)) {
    target[name] = value === null ? undefined : value;
  }
}

function checkAlg(alg) {
  if (!ALGORITHMS.includes(alg)) throw new AssertionError({ message: `alg must be one of ${ALGORITHMS}` });
  return alg;
}

// The library would sign with each of its keys in turn; this issuer signs with the newest only.
class RotatingIssuer extends OAuth2Issuer {
  signingKid = undefined;
  published = new Set();

  async addSigningKey(alg) {
    const jwk = await this.keys.generate(checkAlg(alg));
    this.signingKid = jwk.kid;
    this.published.add(jwk.kid);
    return { kid: jwk.kid, alg };
  }

  get signingAlg() {
    return this.keys.toJSON().find((k) => k.kid === this.signingKid).alg;
  }

  retire() {
    this.published = new Set([this.signingKid]);
    return { kids: [...this.published] };
  }

  // The public keys still published; the library's keystore never forgets a key.
  jwks() {
    return { keys: this.keys.toJSON().filter((k) => this.published.has(k.kid)) };
  }

  buildToken(opts) {
    return super.buildToken({ ...opts, kid: opts?.kid ?? this.signingKid });
  }
}

async function readParams(req) {
  const url = new URL(req.url, `http://${HOST}`);
  const params = Object.fromEntries(url.searchParams);
  let body = '';
  for await (const chunk of req) {
    body += chunk;
    if (body.length > 65536) throw new AssertionError({ message: 'body too large' });
  }
  if (body === '') return params;
  if (String(req.headers['content-type']).startsWith('application/json')) {
    return { ...params, ...parseObject(body, 'body') };
  }
  return { ...params, ...Object.fromEntries(new URLSearchParams(body)) };
}

function sendJson(res, status, body) {
  res.writeHead(status, { 'content-type': 'application/json', 'cache-control': 'no-store' });
  res.end(JSON.stringify(body));
}

// Every issuer of this process by URL, with its server and its outage mode.
const running = new Map();

async function setOutage(params) {
  const entry = running.get(params.url);
  if (entry === undefined) throw new AssertionError({ message: `no issuer ${params.url} in this process` });
  if (!['refused', 'hanging', 'up'].includes(params.mode)) {
    throw new AssertionError({ message: 'mode must be refused, hanging or up' });
  }
  const { server, port } = entry;
  if (params.mode === 'refused' && server.listening) {
    await new Promise((resolve) => {
      server.close(resolve);
      server.closeAllConnections(); // keep-alive and hanging connections too
    });
  }
  if (params.mode !== 'refused' && !server.listening) {
    await new Promise((resolve, reject) => server.once('error', reject).listen(port, HOST, resolve));
  }
  if (params.mode === 'up') {
    for (const res of entry.held) res.destroy(); // requests left unanswered while hanging
    entry.held.clear();
  }
  entry.mode = params.mode;
  return { url: params.url, mode: params.mode };
}

async function startIssuer(port, alg) {
  const issuer = new RotatingIssuer(false); // false: the issuer URL never ends with '/'
  await issuer.addSigningKey(alg);
  const service = new OAuth2Service(issuer);

  service.on('beforeTokenSigning', (token, req) => {
    const overrides = parseObject(req.body.claims, 'claims');
    const derived = derivedClaims({ ...GITHUB_DEFAULTS, ...overrides });
    const payload = token.payload; // iss, iat, nbf, exp from the library; aud from the request
    payload.aud ??= `https://github.com/${derived.repository_owner}`; // GitHub's default audience
    delete payload.scope; // GitHub's tokens have none; the library adds it for client_credentials
    merge(payload, { ...GITHUB_DEFAULTS, ...derived, jti: randomUUID() });
    merge(payload, overrides);
    merge(token.header, parseObject(req.body.header, 'header'));
  });

  const control = {
    '/_control/rotate': async (params) => issuer.addSigningKey(params.alg ?? issuer.signingAlg),
    '/_control/retire': async () => issuer.retire(),
    '/_control/issuers': async (params) => ({ url: (await startIssuer(0, params.alg ?? 'RS256')).url }),
    '/_control/outage': setOutage,
  };
  const entry = { server: undefined, port: 0, mode: 'up', held: new Set() };

  const server = createServer(async (req, res) => {
    const path = new URL(req.url, `http://${HOST}`).pathname;
    if (entry.mode === 'hanging') {
      entry.held.add(res); // never answered; cut when the issuer is up again
      res.once('close', () => entry.held.delete(res));
      return;
    }
    try {
      if (req.method === 'GET' && path === '/jwks') return sendJson(res, 200, issuer.jwks());
      if (req.method === 'POST' && Object.hasOwn(control, path)) return sendJson(res, 200, await control[path](await readParams(req)));
    } catch (err) {
      if (!(err instanceof AssertionError)) console.error(err);
      return sendJson(res, 400, { error: 'invalid_request', error_description: err.message });
    }
    service.requestHandler(req, res);
  });
  await new Promise((resolve, reject) => server.once('error', reject).listen(port, HOST, resolve));
  issuer.url = `http://${HOST}:${server.address().port}`;
  Object.assign(entry, { server, port: server.address().port });
  running.set(issuer.url, entry);
  console.error(`issuer ${issuer.url} signs with ${alg} key ${issuer.signingKid}`);
  return issuer;
}

const first = await startIssuer(Number(process.env.OIDC_ISSUER_PORT ?? 0), process.env.OIDC_ISSUER_ALG ?? 'RS256');
console.log(JSON.stringify({ url: first.url }));
