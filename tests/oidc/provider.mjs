// The company's OpenID Connect provider as the console's sign-in tests meet it: the certified
// `oidc-provider` package (pinned in package.json), its development login form (any password), and
// one confidential client, the console, with the redirect URI given on the command line.
//
//   node provider.mjs --redirect-uri URI [--redirect-uri URI…] --client-id ID --client-secret SECRET [--issuer-host HOST]
//
// Listens on 127.0.0.1, a port of the kernel's choosing, and prints one JSON line
// {"port": N, "issuer": "http://HOST:N"} once it serves. --issuer-host names another host in the
// issuer it publishes (a provider that is not the one tracker was told about).
import http from 'node:http';
import { parseArgs } from 'node:util';

import Provider from 'oidc-provider';

const { values: args } = parseArgs({
  options: {
    'redirect-uri': { type: 'string', multiple: true },
    'client-id': { type: 'string', default: 'tracker-console' },
    'client-secret': { type: 'string', default: 'console-secret-0123456789abcdefghij' },
    'issuer-host': { type: 'string', default: '127.0.0.1' },
  },
});

// The agents: a login of the dev form is the account id. Roles in the `roles` claim, and nested
// where a provider such as Keycloak puts them (realm_access.roles).
const ACCOUNTS = {
  'sofia.support': { email: 'sofia@example.com', email_verified: true, roles: ['support'] },
  'oleg.operator': { roles: ['operator', 'finance'] },  // no e-mail: named agent:oleg.operator
  'ada.admin': { email: 'ada@example.com', email_verified: true, roles: ['admin'] },
  'nina.norole': { email: 'nina@example.com', email_verified: true, roles: ['marketing'] },
};

const server = http.createServer();
server.listen(0, '127.0.0.1', () => {
  const { port } = server.address();
  const issuer = `http://${args['issuer-host']}:${port}`;
  const provider = new Provider(issuer, {
    clients: [{
      client_id: args['client-id'],
      client_secret: args['client-secret'],
      redirect_uris: args['redirect-uri'],
      grant_types: ['authorization_code'],
      response_types: ['code'],
      token_endpoint_auth_method: 'client_secret_basic',
    }],
    claims: {
      openid: ['sub', 'roles', 'realm_access'],
      email: ['email', 'email_verified'],
      profile: ['name'],
    },
    conformIdTokenClaims: false,  // the scopes' claims in the ID token itself, as tracker reads them
    pkce: { required: () => true },
    cookies: { keys: ['tracker-tests-provider-cookie-key'] },
    async findAccount(ctx, id) {
      const known = ACCOUNTS[id];
      if (!known) return undefined;
      return {
        accountId: id,
        async claims() {
          return { sub: id, name: id, realm_access: { roles: known.roles }, ...known };
        },
      };
    },
    // The console is the company's own application: no consent screen after the login form.
    async loadExistingGrant(ctx) {
      const grant = new ctx.oidc.provider.Grant({ clientId: ctx.oidc.client.clientId,
                                                  accountId: ctx.oidc.session.accountId });
      grant.addOIDCScope(ctx.oidc.params.scope);
      grant.addOIDCClaims(['roles', 'realm_access', 'email', 'email_verified', 'name']);
      await grant.save();
      return grant;
    },
  });
  provider.on('server_error', (ctx, err) => console.error('server_error', err));
  server.on('request', provider.callback());
  process.stdout.write(JSON.stringify({ port, issuer }) + '\n');
});

process.on('SIGTERM', () => server.close(() => process.exit(0)));
