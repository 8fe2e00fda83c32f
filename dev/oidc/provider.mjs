// An OpenID provider for the Explorer's single sign-on tests and the demo: panva's oidc-provider
// (OpenID Certified), with its development sign-in pages (any password is accepted) and the
// accounts given as JSON: {"alice": {"groups": ["audit-admins"], "email": "...", "name": "..."}}.
// An account not listed signs in with no groups. Not for production: it keeps everything in
// memory and trusts any password.
//
// node provider.mjs PORT CLIENT_ID CLIENT_SECRET REDIRECT_URIS ACCOUNTS_JSON
// (REDIRECT_URIS: the Explorer's callbacks, comma-separated)
import Provider from 'oidc-provider';

const [port, clientId, clientSecret, redirectUris, accountsJson] = process.argv.slice(2);
const accounts = JSON.parse(accountsJson || '{}');
const issuer = `http://127.0.0.1:${port}`;

const provider = new Provider(issuer, {
  clients: [
    {
      client_id: clientId,
      client_secret: clientSecret,
      redirect_uris: redirectUris.split(','),
      grant_types: ['authorization_code'],
      response_types: ['code'],
      token_endpoint_auth_method: 'client_secret_basic',
    },
  ],
  // PKCE with S256 for every authorization request, confidential client or not.
  pkce: { required: () => true, methods: ['S256'] },
  claims: {
    openid: ['sub'],
    profile: ['name', 'preferred_username'],
    email: ['email'],
    groups: ['groups'],
  },
  scopes: ['openid', 'profile', 'email', 'groups'],
  // The groups in the ID token itself, which the Explorer verifies, not only at userinfo.
  conformIdTokenClaims: false,
  ttl: { IdToken: 300, AccessToken: 300, Session: 3600, Grant: 3600, Interaction: 600 },
  findAccount: (ctx, sub) => ({
    accountId: sub,
    claims: () => {
      const found = accounts[sub] || {};
      return {
        sub,
        preferred_username: sub,
        name: found.name || sub,
        email: found.email || `${sub}@example.com`,
        groups: found.groups || [],
      };
    },
  }),
  features: { devInteractions: { enabled: true }, rpInitiatedLogout: { enabled: true } },
});
provider.proxy = false;
provider.listen(Number(port), '127.0.0.1', () => {
  console.log(`oidc-provider listening on ${issuer}`);
});
