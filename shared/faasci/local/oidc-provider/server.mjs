// The local stack's OpenID Connect provider: npm's oidc-provider (OpenID-certified), with
// static clients of the client_credentials grant whose access tokens are RS256 JWTs for the
// audience `faasci`, carrying the client's `roles`. faasci/local/oidc.py writes the state
// folder (config.json: issuer, port, clients; signing-key.json: the private JWK) and starts
//   node server.mjs <node_modules folder holding oidc-provider> <state folder>
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';

const [modules, state] = process.argv.slice(2);
if (!modules || !state) {
  console.error('usage: node server.mjs NODE_MODULES STATE_FOLDER');
  process.exit(2);
}
// Installed outside the source tree (scripts/install), so no node_modules sits in shared/,
// which every function's build context copies.
const entry = join(modules, 'oidc-provider', 'lib', 'index.js');
const { default: Provider, errors } = await import(pathToFileURL(entry).href);

const config = JSON.parse(readFileSync(join(state, 'config.json'), 'utf8'));
const key = JSON.parse(readFileSync(join(state, 'signing-key.json'), 'utf8'));
const roles = new Map(config.clients.map((c) => [c.client_id, c.roles]));
const RESOURCE = config.resource; // the resource indicator (an absolute URI) of faas-ci

const provider = new Provider(config.issuer, {
  clients: config.clients.map((c) => ({
    client_id: c.client_id,
    client_secret: c.client_secret,
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    token_endpoint_auth_method: 'client_secret_basic',
  })),
  jwks: { keys: [key] },
  // No browser flows here: only client_credentials. Cookie keys exist to silence the default.
  cookies: { keys: [randomBytes(32).toString('base64url')] },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: async () => RESOURCE,
      useGrantedResource: async () => true,
      getResourceServerInfo: async (ctx, indicator) => {
        if (indicator !== RESOURCE) throw new errors.InvalidTarget();
        return {
          audience: config.audience,
          scope: '',
          accessTokenTTL: config.access_token_ttl,
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg: 'RS256' } },
        };
      },
    },
  },
  extraTokenClaims: async (ctx, token) => ({ roles: roles.get(token.clientId) ?? [] }),
  ttl: { ClientCredentials: config.access_token_ttl },
});
provider.proxy = false;
provider.on('server_error', (ctx, err) => console.error('server_error', err));
provider.on('grant.error', (ctx, err) => console.error(`refused ${ctx.oidc?.client?.clientId ?? '?'}: ${err.message}`));

provider.listen(config.port, '127.0.0.1', () => {
  console.log(`oidc-provider on ${config.issuer} (${config.clients.length} clients)`);
});
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => process.exit(0)); // no state to save: tokens are stateless JWTs
}
