// The extension's service worker: follows each tab an activation (`/go`) opened until the click's
// session ends (converted or expired) or the tab closes, reports its redirect chain, navigations and
// promo codes to tracker with TrackerClient, puts the content script into that tab's pages (and no
// other tab's), and tells it to show or hide the re-activation banner.
import { TrackerClient } from "./tracker-client.js";
import { accountOf, credentialsFrom, shippedService, trimmed } from "./credentials.js";

// tab id -> {clickId, merchant, landingHost, lastUrl, state, action}; kept in storage.session,
// because the browser stops an idle service worker and starts it again for the next event.
const tabs = new Map();
const watches = new Map(); // click id -> stop()
const ENDED = new Set(["converted", "expired"]); // the click's session is over: nothing more to watch
const log = []; // the last reports and actions, for the service worker's console (and tests)
let client = null;
let clientKey = "";
const settings = { baseUrl: "", token: "" };

async function load() {
  const saved = await chrome.storage.local.get(["baseUrl", "token"]);
  settings.baseUrl = trimmed(saved.baseUrl) || shippedService();
  settings.token = saved.token || "";
}

const ready = (async () => {
  await load();
  const { tabs: saved } = await chrome.storage.session.get("tabs");
  for (const [tabId, tab] of Object.entries(saved || {})) tabs.set(Number(tabId), tab);
  for (const tab of tabs.values()) follow(tab.clickId);
})();

chrome.storage.onChanged.addListener((changes, area) => {
  if (area === "local" && (changes.baseUrl || changes.token)) load();
});

function tracker() {
  if (!settings.baseUrl || !settings.token) return null;
  const key = `${settings.baseUrl} ${settings.token}`;
  if (key !== clientKey) {
    client = new TrackerClient({ baseUrl: settings.baseUrl, token: settings.token });
    clientKey = key;
    for (const stop of watches.values()) stop();
    watches.clear();
  }
  return client;
}

function save() {
  chrome.storage.session.set({ tabs: Object.fromEntries(tabs) });
}

function note(tabId, what, detail) {
  const tab = tabs.get(tabId);
  log.push({ tab: tabId, click: tab ? tab.clickId : null, what, detail, at: new Date().toISOString() });
  if (log.length > 200) log.splice(0, log.length - 200);
}

/** The activation URL (our user token is in it: it is never reported as a navigation). */
function activationUrl(merchant, to) {
  const url = new URL(`${settings.baseUrl}/go/${encodeURIComponent(merchant)}`);
  url.searchParams.set("u", settings.token);
  url.searchParams.set("src", "ext");
  if (to) url.searchParams.set("to", to);
  return url.href;
}

async function activate(merchant, to, tabId) {
  await ready;
  await load(); // just signed in, perhaps
  if (!tracker()) throw new Error("not connected: sign in on our site first");
  const url = activationUrl(merchant, to);
  return tabId === undefined ? (await chrome.tabs.create({ url })).id : (await chrome.tabs.update(tabId, { url })).id;
}

function follow(clickId) {
  const current = tracker();
  if (!current || watches.has(clickId)) return;
  watches.set(clickId, current.watch(clickId, (change) => apply(change)));
}

function tell(tabId, show) {
  chrome.tabs.sendMessage(tabId, { type: "tracker-state", show }).catch(() => {
    // no content script there yet: it asks for the state when it starts ("hello")
  });
  // The toolbar badge is out of every page's reach: it stays even if a page fights the banner.
  chrome.action.setBadgeText({ tabId, text: show ? "!" : "" }).catch(() => {});
  if (show) chrome.action.setBadgeBackgroundColor({ tabId, color: "#e8590c" }).catch(() => {});
}

/** Stops following a tab: its session is over, or it is gone. */
function unfollow(tabId) {
  const tab = tabs.get(tabId);
  if (!tab) return;
  tabs.delete(tabId);
  save();
  if (![...tabs.values()].some((t) => t.clickId === tab.clickId) && watches.has(tab.clickId)) {
    watches.get(tab.clickId)();
    watches.delete(tab.clickId);
  }
}

function apply(change) {
  if (!change || !change.click_id) return;
  for (const [tabId, tab] of [...tabs]) {
    if (tab.clickId !== change.click_id) continue;
    tell(tabId, change.action === "reactivate" && !ENDED.has(change.state));
    if (ENDED.has(change.state)) {
      note(tabId, "session-ended", change.state);
      unfollow(tabId);
      continue;
    }
    tab.state = change.state;
    tab.action = change.action;
    save();
  }
}

let check = null;
/** Reports leave in batches anyway; this sends them soon and applies the answer, so that the banner
 *  does not depend on the event stream alone. */
function report(tabId, what, detail, send) {
  const tab = tabs.get(tabId);
  const current = tracker();
  if (!tab || !current) return;
  note(tabId, what, detail);
  send(current, tab.clickId);
  clearTimeout(check);
  check = setTimeout(() => current.flush().then(apply), 300);
}

function ours(url) {
  return settings.baseUrl !== "" && url.startsWith(`${settings.baseUrl}/`);
}

// Listeners are registered at the top level, synchronously, so that the browser wakes the worker for them.
chrome.webRequest.onHeadersReceived.addListener(
  (details) => {
    ready.then(() => {
      if (!ours(details.url)) return;
      const url = new URL(details.url);
      // Our user's activation only: a page may send the tab through /go with another user's token.
      if (!url.pathname.startsWith("/go/") || url.searchParams.get("u") !== settings.token) return;
      const header = (details.responseHeaders || []).find((h) => h.name.toLowerCase() === "x-click-id");
      if (!header || !header.value) return;
      unfollow(details.tabId);
      const merchant = decodeURIComponent(url.pathname.split("/")[2] || "");
      tabs.set(details.tabId, { clickId: header.value, merchant, landingHost: null, lastUrl: null, state: "active", action: "none" });
      save();
      note(details.tabId, "activation", merchant);
      follow(header.value);
    });
  },
  { urls: ["<all_urls>"], types: ["main_frame"] },
  ["responseHeaders"],
);

// Server redirects (the network's hop, a coupon site's) never commit, so webNavigation does not see them.
chrome.webRequest.onBeforeRedirect.addListener(
  (details) => {
    ready.then(() => {
      if (!ours(details.redirectUrl)) {
        report(details.tabId, "navigation", details.redirectUrl, (c, id) => c.navigation(id, details.redirectUrl));
      }
    });
  },
  { urls: ["<all_urls>"], types: ["main_frame"] },
);

function navigated(details) {
  if (details.frameId !== 0) return;
  ready.then(() => {
    const tab = tabs.get(details.tabId);
    if (!tab || ours(details.url) || !/^https?:/.test(details.url)) return;
    if (!tab.landingHost) tab.landingHost = new URL(details.url).hostname;
    tab.lastUrl = details.url;
    save();
    report(details.tabId, "navigation", details.url, (c, id) => c.navigation(id, details.url));
  });
}
chrome.webNavigation.onCommitted.addListener(navigated);
chrome.webNavigation.onHistoryStateUpdated.addListener(navigated); // single-page stores

// The content script goes into the followed tab's pages only, once each has its document.
chrome.webNavigation.onDOMContentLoaded.addListener((details) => {
  if (details.frameId !== 0) return;
  ready.then(() => {
    if (!tabs.has(details.tabId) || ours(details.url) || !/^https?:/.test(details.url)) return;
    chrome.scripting.executeScript({ target: { tabId: details.tabId, frameIds: [0] }, files: ["content.js"] })
      .catch(() => {}); // a page we have no host permission for (plain http): reported, but no banner there
  });
});

chrome.tabs.onRemoved.addListener((tabId) => {
  ready.then(() => {
    if (!tabs.has(tabId)) return;
    unfollow(tabId);
    if (client) client.flush();
  });
});

/** Back to the page the shopper was on, if it is on the store, without its query (which may hold
 *  the foreign parameter); elsewhere, to the merchant's default page. */
function reactivate(tabId, where) {
  const tab = tabs.get(tabId);
  if (!tab) return { ok: false };
  note(tabId, "reactivate", where || "");
  let here = null;
  try {
    here = where ? new URL(where) : null;
  } catch {
    here = null;
  }
  const to = here && here.hostname === tab.landingHost ? here.origin + here.pathname : undefined;
  return activate(tab.merchant, to, tabId).then(() => ({ ok: true }));
}

async function onMessage(message, sender) {
  await ready;
  const tabId = sender.tab && sender.tab.id;
  const tab = tabId !== undefined ? tabs.get(tabId) : undefined;
  // The popup and the options page, not a content script in some web page.
  const ownPage = String(sender.url || "").startsWith(chrome.runtime.getURL(""));
  switch (message && message.type) {
    case "hello": // a content script started: should it show the banner?
      return { show: Boolean(tab && tab.action === "reactivate") };
    case "promo":
      if (tab && typeof message.code === "string" && message.code.trim()) {
        const code = message.code.trim().slice(0, 64);
        report(tabId, "promo_code", code, (c, id) => c.promoCode(id, code));
      }
      return { ok: Boolean(tab) };
    case "reactivate": // the banner's button, pressed by the shopper (the content script checks)
      return sender.tab && !ownPage ? reactivate(tabId, sender.url) : { ok: false };
    case "reactivate-tab": // the popup's button, for the tab it was opened over
      return ownPage ? reactivate(message.tabId, (tabs.get(message.tabId) || {}).lastUrl) : { ok: false };
    case "status": { // the popup: who is connected, and is this tab's cashback at risk?
      if (!ownPage) return undefined;
      const followed = tabs.get(message.tabId);
      return { account: accountOf(settings.token), service: settings.baseUrl,
               tab: followed ? { merchant: followed.merchant, state: followed.state, action: followed.action } : null };
    }
    case "activate": // from the popup
      return ownPage ? { tabId: await activate(message.merchant, message.to) } : { ok: false };
    default:
      return undefined;
  }
}

chrome.runtime.onMessage.addListener((message, sender, respond) => {
  Promise.resolve(onMessage(message, sender)).then(respond, (error) => respond({ error: String(error && error.message) }));
  return true; // the answer comes asynchronously
});

// Our sign-in page hands over the shopper's token (credentials.js says who may, and what).
chrome.runtime.onMessageExternal.addListener((message, sender, respond) => {
  const verdict = credentialsFrom(message, sender);
  if (!verdict.ok) {
    respond(verdict);
    return false;
  }
  chrome.storage.local.set(verdict.stored).then(() => respond({ ok: true, account: verdict.account }));
  return true;
});

// For the service worker's console and tests.
globalThis.trackerExtension = { activate, tabs, ready, log };
