() => {
  // The page's CSS (page.css, put in below by cir.ui.server); Enter in a slider's number box commits it
  // (as leaving the box does: the slider's release event); and the Review tab's keys:
  // u undo, a accept, r reject, n next, p previous (ignored while typing in a field).
  if (window.cirKeys) return;
  window.cirKeys = true;
  const style = document.createElement("style");
  style.textContent = PAGE_CSS;
  document.head.appendChild(style);
  const ids = {a: "review-accept", r: "review-reject", n: "review-next", p: "review-prev", u: "review-undo"};
  document.addEventListener("keydown", (e) => {
    const t = e.target;
    if (e.key === "Enter" && t && t.matches("input[type=number]") &&
        t.closest(".block")?.querySelector("input[type=range]")) { t.blur(); return; }
    if (e.ctrlKey || e.metaKey || e.altKey || (t && (t.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(t.tagName)))) return;
    const b = ids[e.key] && document.getElementById(ids[e.key]);
    if (b && b.offsetParent !== null) { e.preventDefault(); b.click(); }
  });
}
