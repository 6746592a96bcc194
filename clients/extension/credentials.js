// Who may set the extension's credentials (the service's URL and the shopper's token), and which
// account they name. Only the exact sign-in page of our site, over https, in a tab's top frame, for
// the service this build ships with: any other page of our origin (a blog post, a user's profile
// page, a page an attacker got a script onto) could otherwise swap in an attacker's token and
// collect the shopper's later cashback.
import { CONFIG } from "./config.js";

// A user token is "<user id>.<signature>" (the service's tokens.py): the id is readable, not secret.
const TOKEN = /^([A-Za-z0-9_@:.-]{1,64})\.[A-Za-z0-9_-]{22}$/;

export function trimmed(url) {
  return String(url || "").replace(/\/+$/, "");
}

/** The service URL of this build, or "" when config.js names none we may use. */
export function shippedService() {
  let url;
  try {
    url = new URL(CONFIG.serviceUrl);
  } catch {
    return "";
  }
  const loopback = ["127.0.0.1", "localhost", "[::1]"].includes(url.hostname);
  return url.protocol === "https:" || (url.protocol === "http:" && loopback) ? trimmed(url.href) : "";
}

/** The user id a token names ("" for anything that is not a token). */
export function accountOf(token) {
  const match = TOKEN.exec(String(token || ""));
  return match ? match[1] : "";
}

/** A credentials message from a web page: {ok: true, account, stored} to keep, or {ok: false, error}. */
export function credentialsFrom(message, sender) {
  const refuse = (error) => ({ ok: false, error });
  if (!message || message.type !== "credentials") return refuse("not a credentials message");
  let from;
  let page;
  try {
    from = new URL(sender.url);
    page = new URL(CONFIG.signInUrl);
  } catch {
    return refuse("credentials come only from our sign-in page");
  }
  if (page.protocol !== "https:" || from.protocol !== "https:" || from.origin !== page.origin
      || from.pathname !== page.pathname || (sender.origin && sender.origin !== page.origin)
      || (sender.frameId !== undefined && sender.frameId !== 0)) {
    return refuse("credentials come only from our sign-in page");
  }
  const service = shippedService();
  if (!service || (message.baseUrl !== undefined && trimmed(message.baseUrl) !== service)) {
    return refuse("this extension reports only to the service it was built for");
  }
  const account = accountOf(message.token);
  if (!account) return refuse("not a user token");
  return { ok: true, account, stored: { baseUrl: service, token: message.token } };
}
