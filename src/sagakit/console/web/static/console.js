// Live updates: re-fetch this page every few seconds and swap the #live block,
// unless the operator is typing or the tab is hidden. No framework, no build.
(function () {
  const every = parseFloat(document.body.dataset.refresh || "5") * 1000;
  async function refresh() {
    const live = document.getElementById("live");
    const busy = document.activeElement && ["INPUT", "SELECT", "TEXTAREA"].includes(document.activeElement.tagName);
    if (!live || busy || document.hidden) return;
    const res = await fetch(location.href, { credentials: "same-origin" });
    if (!res.ok) return;
    const doc = new DOMParser().parseFromString(await res.text(), "text/html");
    const fresh = doc.getElementById("live");
    if (fresh) live.innerHTML = fresh.innerHTML;
  }
  if (every > 0) setInterval(() => refresh().catch(() => {}), every);
})();
