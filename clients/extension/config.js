// What a deployment sets (and nothing else may change): the service this extension reports to, and
// the one page of our site allowed to hand over the shopper's credentials after sign-in. The sign-in
// page must be https; the service too, but for a loopback address in development. Its origin must
// also be in manifest.json's host_permissions, and the sign-in page in externally_connectable.
export const CONFIG = Object.freeze({
  serviceUrl: "https://t.example.com",
  signInUrl: "https://app.example.com/extension/connect",
});
