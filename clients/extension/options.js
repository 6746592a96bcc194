// Which account the extension reports for, a way to disconnect it, and, for development, the
// service's URL and a user token (`tracker token USER_ID`) set by hand in chrome.storage.local.
import { accountOf, shippedService } from "./credentials.js";

const form = document.getElementById("settings");
async function refresh() {
  const saved = await chrome.storage.local.get(["baseUrl", "token"]);
  const account = accountOf(saved.token);
  const base = saved.baseUrl || shippedService();
  document.getElementById("account").textContent = account
    ? `Connected as ${account} (${base})` : "Not connected: sign in on our site.";
  form.baseUrl.value = base;
  form.token.value = saved.token || "";
}
await refresh();
document.getElementById("disconnect").addEventListener("click", async () => {
  await chrome.storage.local.remove(["token"]);
  await refresh();
});
form.addEventListener("submit", async (event) => {
  event.preventDefault();
  await chrome.storage.local.set({ baseUrl: form.baseUrl.value.replace(/\/+$/, ""), token: form.token.value.trim() });
  document.getElementById("status").textContent = "Saved";
  await refresh();
});
