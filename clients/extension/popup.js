// The "activate" action: opens /go for a store in a new tab, which the service worker then follows.
const form = document.getElementById("activate");
form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const data = new FormData(form);
  const answer = await chrome.runtime.sendMessage({ type: "activate", merchant: data.get("merchant"), to: data.get("to") || undefined });
  document.getElementById("status").textContent = answer && answer.error ? answer.error : "Activated";
});
