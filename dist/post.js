// The post step of the latchkey action: gives the exchange back, whatever the job did. GitHub
// hands the main step's saved state to this step as STATE_<name> variables.
'use strict';

const { spawnSync } = require('child_process');

function main() {
  const exchangeId = process.env.STATE_exchange_id || '';
  const releaseToken = process.env.STATE_release_token || '';
  if (!exchangeId || !releaseToken) {
    console.log('latchkey: no exchange to release (the main step did not complete one)');
    return;
  }
  const binary = process.env.STATE_latchkey_bin || 'latchkey';
  const url = process.env.STATE_latchkey_url || (process.env.INPUT_URL || '').trim();
  // The token goes through the environment, never the command line, where `ps` would show it.
  const result = spawnSync(binary, ['release', exchangeId, '--url', url], {
    stdio: 'inherit',
    env: { ...process.env, LATCHKEY_RELEASE_TOKEN: releaseToken },
  });
  if (result.error || result.status !== 0) {
    // A warning, not a failure: the credentials still end at their TTL.
    const why = result.error ? result.error.message : `exit status ${result.status}`;
    console.log(`::warning title=latchkey::could not release exchange ${exchangeId} (${why}); its credentials end at their TTL`);
  }
}

main();
