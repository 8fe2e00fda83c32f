// Audit Explorer: the few things a page cannot do without a script. Every page works without it.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  // "/" jumps to the search bar, as in most search tools (not while typing in a field).
  document.addEventListener("keydown", (event) => {
    const typing = ["INPUT", "TEXTAREA", "SELECT"].includes(document.activeElement.tagName);
    if (event.key === "/" && !typing && !event.ctrlKey && !event.metaKey && !event.altKey) {
      const box = document.getElementById("q");
      if (box) { event.preventDefault(); box.focus(); box.select(); }
      else { window.location.href = "/ui/search"; }
    }
  });
  // Copy buttons copy the text of the element they name.
  for (const button of document.querySelectorAll("button[data-copy]")) {
    button.addEventListener("click", async () => {
      const text = document.getElementById(button.dataset.copy).textContent;
      try {
        await navigator.clipboard.writeText(text);
        button.textContent = "Copied";
      } catch {
        const range = document.createRange();
        range.selectNodeContents(document.getElementById(button.dataset.copy));
        window.getSelection().removeAllRanges();
        window.getSelection().addRange(range);
        button.textContent = "Selected: press Ctrl-C";
      }
    });
  }
  // A sign-in link of the form /ui/login#key=ak_... (printed by `audit-platform demo`): the key
  // rides in the fragment, which the browser never sends to a server or puts in a Referer. It
  // is only filled in, never sent by itself: a link submitted on opening would let anyone sign
  // a person in under their own key (login CSRF) and replace that person's session. The page
  // says which key it is and waits for a click on Sign in.
  const form = document.getElementById("login");
  const fragment = new URLSearchParams(window.location.hash.slice(1));
  if (form && fragment.get("key")) {
    const key = fragment.get("key");
    form.elements.key.value = key;
    history.replaceState(null, "", window.location.pathname + window.location.search);
    const id = /^(ak_[0-9a-f]{12})_/.exec(key);
    document.getElementById("link-key-id").textContent = id ? id[1] : "(not a key of the form ak_…)";
    document.getElementById("link-key").hidden = false;
    form.querySelector("button[type=submit]").focus();
  }
});
