// Runs in every page (top frame only): reports promo codes typed into coupon fields, and shows the
// re-activation banner when the service worker says this tab's click was overwritten. The service
// worker ignores reports from tabs no activation opened.
(() => {
  if (window.top !== window || window.__trackerContent) return;
  window.__trackerContent = true;
  const BANNER = "tracker-cashback-banner";
  const PROMO = /promo|coupon|voucher|discount|gift.?code|промо|купон/i;

  function send(message) {
    try {
      return chrome.runtime.sendMessage(message).catch(() => undefined);
    } catch {
      return Promise.resolve(undefined); // the extension was reloaded: this page's script is orphaned
    }
  }

  function show() {
    if (document.getElementById(BANNER)) return;
    const host = document.createElement("div");
    host.id = BANNER;
    // A shadow root keeps the store's styles out of the banner and ours out of the store.
    const root = host.attachShadow({ mode: "open" });
    root.innerHTML = `<style>
      :host { all: initial; position: fixed; top: 0; left: 0; right: 0; z-index: 2147483647; }
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
    root.querySelector(".again").addEventListener("click", () => send({ type: "reactivate" }));
    root.querySelector(".close").addEventListener("click", () => host.remove());
    document.documentElement.appendChild(host);
  }

  function hide() {
    const host = document.getElementById(BANNER);
    if (host) host.remove();
  }

  chrome.runtime.onMessage.addListener((message) => {
    if (message && message.type === "tracker-state") (message.show ? show : hide)();
  });
  send({ type: "hello" }).then((answer) => answer && answer.show && show());

  function promoField(element) {
    if (!(element instanceof HTMLInputElement) || !["text", "search", ""].includes(element.type)) return false;
    const words = [element.name, element.id, element.placeholder, element.getAttribute("aria-label"),
      element.className, element.autocomplete].join(" ");
    return PROMO.test(words);
  }

  const reported = new Set();
  function report(element) {
    const code = element.value.trim();
    if (!code || code.length > 64 || reported.has(code)) return;
    reported.add(code);
    send({ type: "promo", code });
  }

  function reportIn(scope) {
    if (scope) scope.querySelectorAll("input").forEach((input) => promoField(input) && report(input));
  }

  // A code counts once it is committed: the field changed, Enter, its form sent, or an "Apply" button.
  document.addEventListener("change", (event) => promoField(event.target) && report(event.target), true);
  document.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && promoField(event.target)) report(event.target);
  }, true);
  document.addEventListener("submit", (event) => reportIn(event.target), true);
  document.addEventListener("click", (event) => {
    const button = event.target instanceof Element && event.target.closest("button, input[type=submit], input[type=button]");
    if (button) reportIn(button.form || button.parentElement);
  }, true);
})();
