// Development only: the service's URL and a user token (`tracker token USER_ID`), in chrome.storage.local.
const form = document.getElementById("settings");
const saved = await chrome.storage.local.get(["baseUrl", "token"]);
form.baseUrl.value = saved.baseUrl || "";
form.token.value = saved.token || "";
form.addEventListener("submit", async (event) => {
  event.preventDefault();
  await chrome.storage.local.set({ baseUrl: form.baseUrl.value.replace(/\/+$/, ""), token: form.token.value.trim() });
  document.getElementById("status").textContent = "Saved";
});
