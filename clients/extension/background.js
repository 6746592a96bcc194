// The extension's service worker: follows each tab an activation (`/go`) opened, reports its
// redirect chain, navigations and promo codes to tracker with TrackerClient, follows the click's
// state, and tells the tab's content script to show or hide the re-activation banner.
import { TrackerClient } from "./tracker-client.js";

// tab id -> {clickId, merchant, landingHost, state, action}; kept in storage.session, because
// the browser stops an idle service worker and starts it again for the next event.
const tabs = new Map();
const watches = new Map(); // click id -> stop()
let client = null;
let clientKey = "";
let settings = { baseUrl: "", token: "" };

const ready = (async () => {
  Object.assign(settings, await chrome.storage.local.get(["baseUrl", "token"]));
  const { tabs: saved } = await chrome.storage.session.get("tabs");
  for (const [tabId, tab] of Object.entries(saved || {})) tabs.set(Number(tabId), tab);
  for (const tab of tabs.values()) follow(tab.clickId);
})();

chrome.storage.onChanged.addListener((changes, area) => {
  if (area !== "local") return;
  for (const name of ["baseUrl", "token"]) if (changes[name]) settings[name] = changes[name].newValue || "";
});

function base() {
  return (settings.baseUrl || "").replace(/\/+$/, "");
}

function tracker() {
  if (!base() || !settings.token) return null;
  const key = `${base()} ${settings.token}`;
  if (key !== clientKey) {
    client = new TrackerClient({ baseUrl: base(), token: settings.token });
    clientKey = key;
    for (const stop of watches.values()) stop();
    watches.clear();
  }
  return client;
}

function save() {
  chrome.storage.session.set({ tabs: Object.fromEntries(tabs) });
}

/** The activation URL (our user token is in it: it is never reported as a navigation). */
function activationUrl(merchant, to) {
  const url = new URL(`${base()}/go/${encodeURIComponent(merchant)}`);
  url.searchParams.set("u", settings.token);
  url.searchParams.set("src", "ext");
  if (to) url.searchParams.set("to", to);
  return url.href;
}

async function activate(merchant, to, tabId) {
  await ready;
  Object.assign(settings, await chrome.storage.local.get(["baseUrl", "token"])); // just signed in, perhaps
  if (!tracker()) throw new Error("set the service's URL and the user token first (options page)");
  const url = activationUrl(merchant, to);
  return tabId === undefined ? (await chrome.tabs.create({ url })).id : (await chrome.tabs.update(tabId, { url })).id;
}

function follow(clickId) {
  const current = tracker();
  if (!current || watches.has(clickId)) return;
  watches.set(clickId, current.watch(clickId, (change) => apply(change)));
}

function apply(change) {
  if (!change || !change.click_id) return;
  for (const [tabId, tab] of tabs) {
    if (tab.clickId !== change.click_id) continue;
    tab.state = change.state;
    tab.action = change.action;
    save();
    chrome.tabs.sendMessage(tabId, { type: "tracker-state", show: tab.action === "reactivate" }).catch(() => {
      // no content script there yet: it asks for the state when it starts ("hello")
    });
  }
}

let check = null;
/** Reports leave in batches anyway; this sends them soon and applies the answer, so that the banner
 *  does not depend on the event stream alone. */
function report(tabId, send) {
  const tab = tabs.get(tabId);
  const current = tracker();
  if (!tab || !current) return;
  send(current, tab.clickId);
  clearTimeout(check);
  check = setTimeout(() => current.flush().then(apply), 300);
}

function ours(url) {
  return base() !== "" && url.startsWith(`${base()}/`);
}

// Listeners are registered at the top level, synchronously, so that the browser wakes the worker for them.
chrome.webRequest.onHeadersReceived.addListener(
  (details) => {
    ready.then(() => {
      if (!ours(details.url) || !new URL(details.url).pathname.startsWith("/go/")) return;
      const header = (details.responseHeaders || []).find((h) => h.name.toLowerCase() === "x-click-id");
      if (!header || !header.value) return;
      const previous = tabs.get(details.tabId);
      if (previous && watches.has(previous.clickId)) {
        watches.get(previous.clickId)();
        watches.delete(previous.clickId);
      }
      const merchant = decodeURIComponent(new URL(details.url).pathname.split("/")[2] || "");
      tabs.set(details.tabId, { clickId: header.value, merchant, landingHost: null, state: "active", action: "none" });
      save();
      follow(header.value);
    });
  },
  { urls: ["http://*/*", "https://*/*"], types: ["main_frame"] },
  ["responseHeaders"],
);

// Server redirects (the network's hop) never commit, so webNavigation does not see them.
chrome.webRequest.onBeforeRedirect.addListener(
  (details) => {
    ready.then(() => {
      if (!ours(details.redirectUrl)) report(details.tabId, (c, id) => c.navigation(id, details.redirectUrl));
    });
  },
  { urls: ["http://*/*", "https://*/*"], types: ["main_frame"] },
);

function navigated(details) {
  if (details.frameId !== 0) return;
  ready.then(() => {
    const tab = tabs.get(details.tabId);
    if (!tab || ours(details.url) || !/^https?:/.test(details.url)) return;
    if (!tab.landingHost) {
      tab.landingHost = new URL(details.url).hostname;
      save();
    }
    report(details.tabId, (c, id) => c.navigation(id, details.url));
  });
}
chrome.webNavigation.onCommitted.addListener(navigated);
chrome.webNavigation.onHistoryStateUpdated.addListener(navigated); // single-page stores

chrome.tabs.onRemoved.addListener((tabId) => {
  ready.then(() => {
    const tab = tabs.get(tabId);
    if (!tab) return;
    tabs.delete(tabId);
    save();
    if (![...tabs.values()].some((t) => t.clickId === tab.clickId) && watches.has(tab.clickId)) {
      watches.get(tab.clickId)();
      watches.delete(tab.clickId);
    }
    if (client) client.flush();
  });
});

async function onMessage(message, sender) {
  await ready;
  const tabId = sender.tab && sender.tab.id;
  const tab = tabId !== undefined ? tabs.get(tabId) : undefined;
  switch (message && message.type) {
    case "hello": // a content script started: should it show the banner?
      return { show: Boolean(tab && tab.action === "reactivate") };
    case "promo":
      if (tab && typeof message.code === "string" && message.code.trim()) {
        report(tabId, (c, id) => c.promoCode(id, message.code.trim().slice(0, 64)));
      }
      return { ok: Boolean(tab) };
    case "reactivate": {
      if (!tab) return { ok: false };
      // Back to the page the shopper was on, if it is on the store, without its query (which
      // may hold the foreign parameter); elsewhere, to the merchant's default page.
      const here = sender.tab.url ? new URL(sender.tab.url) : null;
      const to = here && here.hostname === tab.landingHost ? here.origin + here.pathname : undefined;
      await activate(tab.merchant, to, tabId);
      return { ok: true };
    }
    case "activate": // from the popup
      return { tabId: await activate(message.merchant, message.to) };
    default:
      return undefined;
  }
}

chrome.runtime.onMessage.addListener((message, sender, respond) => {
  onMessage(message, sender).then(respond, (error) => respond({ error: String(error && error.message) }));
  return true; // the answer comes asynchronously
});

// Our site hands over the service's URL and the user's token after sign-in
// (manifest: externally_connectable lists its origins).
chrome.runtime.onMessageExternal.addListener((message, sender, respond) => {
  if (message && message.type === "credentials" && typeof message.token === "string") {
    chrome.storage.local.set({ baseUrl: String(message.baseUrl || ""), token: message.token }).then(() => respond({ ok: true }));
    return true;
  }
  return false;
});

// For the popup, the options page and tests (service worker console).
globalThis.trackerExtension = { activate, tabs, ready };
