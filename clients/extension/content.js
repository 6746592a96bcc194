// Put by the service worker into the pages of a followed tab only (top frame): reports promo codes the
// shopper typed into coupon fields, and shows the re-activation banner when the worker says this
// tab's click was overwritten.
//
// The page is not to be believed: its scripts can fire any event and set any field. So only the
// browser's own events (`isTrusted`) count, a code counts only if the shopper's own typing put it in
// the field, the banner lives in a closed shadow root (no page script reaches its button), only a real
// click on that button activates, and a banner the page removes or hides comes back.
(() => {
  if (window.top !== window || window.__trackerContent) return;
  window.__trackerContent = true; // this script's own world: the page cannot set it
  const BANNER = "tracker-cashback-banner";
  const PROMO = /promo|coupon|voucher|discount|gift.?code|промо|купон/i;

  function send(message) {
    try {
      return chrome.runtime.sendMessage(message).catch(() => undefined);
    } catch {
      return Promise.resolve(undefined); // the extension was reloaded: this page's script is orphaned
    }
  }

  // ---- Promo codes -------------------------------------------------------------------------------
  function promoField(element) {
    if (!(element instanceof HTMLInputElement) || !["text", "search", ""].includes(element.type)) return false;
    const words = [element.name, element.id, element.placeholder, element.getAttribute("aria-label"),
      element.className, element.autocomplete].join(" ");
    return PROMO.test(words);
  }

  // field -> its value right after the shopper's last keystroke, paste, drop or autofill in it. A value
  // a script wrote afterwards differs, and is not the shopper's. A trusted `input` is not enough: a
  // script's document.execCommand("insertText") fires one too (and a trusted `change` on blur), but
  // never the `beforeinput` that the browser sends first for what the shopper does; so an `input`
  // counts only right after a trusted `beforeinput` of the same field, kind and text (or when the
  // browser autofilled the field).
  const typed = new WeakMap();
  let intent = null; // the shopper's last beforeinput, until the end of the task that sent it
  document.addEventListener("beforeinput", (event) => {
    if (!event.isTrusted || !promoField(event.target)) return;
    const mine = { field: event.target, kind: event.inputType, data: event.data };
    intent = mine;
    setTimeout(() => {
      if (intent === mine) intent = null;
    }, 0);
  }, true);
  document.addEventListener("input", (event) => {
    const field = event.target;
    if (!event.isTrusted || !promoField(field)) return;
    const shopper = (intent && intent.field === field && intent.kind === event.inputType && intent.data === event.data)
      || field.matches(":autofill");
    intent = null;
    if (shopper) typed.set(field, field.value);
    else typed.delete(field);
  }, true);

  const reported = new Set();
  function report(element) {
    if (typed.get(element) !== element.value) return;
    const code = element.value.trim();
    if (!code || code.length > 64 || reported.has(code)) return;
    reported.add(code);
    send({ type: "promo", code });
  }

  function reportIn(scope) {
    if (scope) scope.querySelectorAll("input").forEach((input) => promoField(input) && report(input));
  }

  // A code counts once it is committed: the field changed, Enter, its form sent, or an "Apply" button.
  document.addEventListener("change", (event) => {
    if (event.isTrusted && promoField(event.target)) report(event.target);
  }, true);
  document.addEventListener("keydown", (event) => {
    if (event.isTrusted && event.key === "Enter" && promoField(event.target)) report(event.target);
  }, true);
  document.addEventListener("submit", (event) => {
    if (event.isTrusted) reportIn(event.target); // a script's requestSubmit() is trusted: `typed` decides
  }, true);
  document.addEventListener("click", (event) => {
    if (!event.isTrusted) return;
    const button = event.target instanceof Element && event.target.closest("button, input[type=submit], input[type=button]");
    if (button) reportIn(button.form || button.parentElement);
  }, true);

  // ---- The banner --------------------------------------------------------------------------------
  // Every property of the host is set inline with !important: inline important declarations beat the
  // page's style sheets, whatever their specificity. As a popover it is in the top layer, above
  // whatever z-index the page uses and out of its ancestors' opacity, clipping and transforms.
  const HOST_STYLE = "all: initial !important; display: block !important; position: fixed !important;"
    + " inset: 0 0 auto 0 !important; z-index: 2147483647 !important; margin: 0 !important;"
    + " padding: 0 !important; border: 0 !important; width: 100% !important; height: auto !important;"
    + " max-height: none !important; overflow: visible !important; background: transparent !important;"
    + " visibility: visible !important; opacity: 1 !important; pointer-events: auto !important;";
  const OWN = { id: BANNER, popover: "manual", style: HOST_STYLE };
  const banner = { host: null, wanted: false, repairs: 0, since: 0, timer: null };

  function build() {
    const host = document.createElement("div");
    const root = host.attachShadow({ mode: "closed" }); // host.shadowRoot is null for the page
    root.innerHTML = `<style>
      .bar { display: flex; align-items: center; gap: 16px; padding: 14px 20px; background: #fff4e5;
             border-bottom: 3px solid #e8590c; font: 15px/1.4 system-ui, sans-serif; color: #222;
             box-shadow: 0 2px 8px rgba(0,0,0,.15); }
      .text { flex: 1; } strong { color: #c2410c; }
      button { font: inherit; font-weight: 600; padding: 8px 16px; border: 0; border-radius: 6px;
               background: #e8590c; color: #fff; cursor: pointer; }
      .close { background: transparent; color: #555; padding: 8px; }
    </style>
    <div class="bar" role="alert">
      <div class="text"><strong>Your cashback is at risk.</strong> Another link or promo code has replaced
        our cashback link for this purchase. Activate cashback again before you pay.</div>
      <button class="again" type="button">Activate cashback again</button>
      <button class="close" type="button" aria-label="Dismiss">✕</button>
    </div>`;
    root.querySelector(".again").addEventListener("click", (event) => {
      if (event.isTrusted) send({ type: "reactivate" });
    });
    root.querySelector(".close").addEventListener("click", (event) => {
      if (event.isTrusted) hide(); // the shopper's choice; the toolbar badge stays
    });
    host.addEventListener("toggle", () => repair()); // the page called hidePopover()
    new MutationObserver(() => repair()).observe(host, { attributes: true });
    return host;
  }

  const watchRoot = new MutationObserver(() => repair());

  /** Puts the banner back where the shopper sees it, as it was. A page that keeps undoing it gets
   *  a bounded number of repairs a second (no endless fight freezing the tab), then one a second. */
  function repair() {
    const host = banner.host;
    if (!banner.wanted || !host) return;
    const now = Date.now();
    if (now - banner.since > 1000) {
      banner.since = now;
      banner.repairs = 0;
    }
    if (++banner.repairs > 50) return; // the interval below comes back to it
    const root = document.documentElement;
    if (!root) return;
    if (host.parentNode !== root) root.appendChild(host);
    for (const name of host.getAttributeNames()) if (!(name in OWN)) host.removeAttribute(name);
    for (const [name, value] of Object.entries(OWN)) if (host.getAttribute(name) !== value) host.setAttribute(name, value);
    try {
      if (!host.matches(":popover-open")) host.showPopover();
    } catch {
      // no popover support, or the document is not ready: the fixed position and z-index remain
    }
  }

  function show() {
    banner.wanted = true;
    if (!banner.host) banner.host = build();
    repair();
    watchRoot.disconnect();
    watchRoot.observe(document, { childList: true }); // the root element replaced
    if (document.documentElement) watchRoot.observe(document.documentElement, { childList: true });
    if (banner.timer === null) banner.timer = setInterval(repair, 1000);
  }

  function hide() {
    banner.wanted = false;
    watchRoot.disconnect();
    clearInterval(banner.timer);
    banner.timer = null;
    if (banner.host) banner.host.remove();
  }

  chrome.runtime.onMessage.addListener((message) => {
    if (message && message.type === "tracker-state") (message.show ? show : hide)();
  });
  send({ type: "hello" }).then((answer) => answer && answer.show && show());
})();
