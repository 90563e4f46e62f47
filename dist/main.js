// The main step of the latchkey action: install latchkey if needed, then
// `latchkey exchange --format github`, which masks every secret first and then writes
// $GITHUB_ENV, $GITHUB_OUTPUT and $GITHUB_STATE (exchange_id, release_token for the post step).
// Only Node's standard library: an action that runs with a job's OIDC token has no npm dependencies.
'use strict';

const { spawnSync } = require('child_process');
const crypto = require('crypto');
const fs = require('fs');
const os = require('os');
const path = require('path');

const REPOSITORY = 'https://github.com/latchkey-dev/latchkey';
const ASSET = 'latchkey-x86_64-unknown-linux-gnu.tar.gz';

function input(name, required) {
  const value = (process.env[`INPUT_${name.replace(/ /g, '_').toUpperCase()}`] || '').trim();
  if (required && !value) {
    throw new Error(`the input "${name}" is required`);
  }
  return value;
}

// GitHub's NAME<<DELIMITER syntax, with a delimiter the value cannot contain.
function saveState(name, value) {
  const file = process.env.GITHUB_STATE;
  if (!file) {
    throw new Error('$GITHUB_STATE is not set: this action runs inside GitHub Actions');
  }
  const delimiter = `ghadelimiter_${crypto.randomBytes(12).toString('hex')}`;
  fs.appendFileSync(file, `${name}<<${delimiter}${os.EOL}${value}${os.EOL}${delimiter}${os.EOL}`);
}

function run(command, args, options) {
  const result = spawnSync(command, args, { stdio: 'inherit', ...options });
  if (result.error) {
    throw new Error(`cannot run ${command}: ${result.error.message}`);
  }
  if (result.status !== 0) {
    throw new Error(`${command} ${args[0]} failed (exit status ${result.status})`);
  }
}

function onPath(command) {
  for (const dir of (process.env.PATH || '').split(path.delimiter)) {
    const candidate = path.join(dir || '.', command);
    try {
      fs.accessSync(candidate, fs.constants.X_OK);
      if (fs.statSync(candidate).isFile()) {
        return candidate;
      }
    } catch {
      // not here
    }
  }
  return null;
}

function findFile(dir, name) {
  for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
    const full = path.join(dir, entry.name);
    if (entry.isFile() && entry.name === name) {
      return full;
    }
    if (entry.isDirectory()) {
      const found = findFile(full, name);
      if (found) {
        return found;
      }
    }
  }
  return null;
}

// The latchkey binary: a given release, else the one on PATH, else built with cargo.
function install(version, sha256) {
  const temp = process.env.RUNNER_TEMP || os.tmpdir();
  if (version) {
    if (!/^[0-9A-Za-z][0-9A-Za-z.+-]*$/.test(version)) {
      throw new Error(`the input "version" must look like 0.1.0, not ${JSON.stringify(version)}`);
    }
    if (process.platform !== 'linux' || process.arch !== 'x64') {
      throw new Error('released binaries are for x86_64 Linux: leave "version" empty to build latchkey with cargo');
    }
    const dir = path.join(temp, `latchkey-${version}`);
    fs.mkdirSync(dir, { recursive: true });
    const archive = path.join(dir, ASSET);
    const url = `${REPOSITORY}/releases/download/v${version}/${ASSET}`;
    console.log(`latchkey: downloading ${url}`);
    run('curl', ['--fail', '--silent', '--show-error', '--location', '--proto', '=https', '--retry', '3',
      '--output', archive, url]);
    if (sha256) {
      const actual = crypto.createHash('sha256').update(fs.readFileSync(archive)).digest('hex');
      if (actual !== sha256.toLowerCase()) {
        throw new Error(`${ASSET} has SHA-256 ${actual}, not the expected ${sha256}`);
      }
    }
    run('tar', ['-xzf', archive, '-C', dir]);
    const binary = findFile(dir, 'latchkey');
    if (!binary) {
      throw new Error(`${ASSET} holds no latchkey binary`);
    }
    fs.chmodSync(binary, 0o755);
    return binary;
  }
  const existing = onPath('latchkey');
  if (existing) {
    return existing;
  }
  const root = path.join(temp, 'latchkey-cargo');
  console.log('latchkey: not on PATH; building it with cargo install --locked (set the input "version" to skip this)');
  run('cargo', ['install', '--locked', '--git', REPOSITORY, '--root', root, 'latchkey']);
  return path.join(root, 'bin', 'latchkey');
}

function main() {
  const capability = input('capability', true);
  const url = input('url', true);
  const audience = input('audience', false);
  const narrow = input('narrow', false);
  const binary = install(input('version', false), input('sha256', false));
  // For the post step, which releases with the same binary and broker.
  saveState('latchkey_bin', binary);
  saveState('latchkey_url', url);
  const args = ['exchange', '--format', 'github', '--capability', capability, '--url', url];
  if (audience) {
    args.push('--audience', audience);
  }
  if (narrow) {
    args.push('--narrow', narrow);
  }
  run(binary, args);
}

try {
  main();
} catch (e) {
  console.log(`::error title=latchkey::${String(e.message).replace(/\r?\n/g, ' ')}`);
  process.exitCode = 1;
}
