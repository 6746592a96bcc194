// The toolbar popup: which account the extension reports for (so that a swapped token shows), whether
// this tab's cashback is at risk (out of the page's reach, whatever the page does to the banner), and
// the "activate" action, which opens /go for a store in a new tab that the service worker then follows.
const [current] = await chrome.tabs.query({ active: true, currentWindow: true });
const tabId = current ? current.id : undefined;
const status = await chrome.runtime.sendMessage({ type: "status", tabId });
const account = document.getElementById("account");
if (status && status.account) {
  account.textContent = "Connected as ";
  const who = document.createElement("strong");
  who.textContent = status.account;
  account.append(who, ` (${new URL(status.service).host})`);
}
if (status && status.tab && status.tab.action === "reactivate") {
  document.getElementById("risk").hidden = false;
  document.getElementById("again").addEventListener("click", async () => {
    const answer = await chrome.runtime.sendMessage({ type: "reactivate-tab", tabId });
    document.getElementById("status").textContent = answer && answer.ok ? "Activated again" : "Could not activate";
  });
}

const form = document.getElementById("activate");
form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const data = new FormData(form);
  const answer = await chrome.runtime.sendMessage({ type: "activate", merchant: data.get("merchant"), to: data.get("to") || undefined });
  document.getElementById("status").textContent = answer && answer.error ? answer.error : "Activated";
});
