// plughost console: progressive enhancement only. Every page works without it.
// - quarantine countdowns tick every second;
// - the overview's table refreshes itself every few seconds (same page, same cookie),
//   except while the focus is inside it.
"use strict";
(function () {
  function tick() {
    document.querySelectorAll(".countdown[data-seconds]").forEach(function (el) {
      var left = Math.max(0, parseFloat(el.dataset.seconds) - 1);
      el.dataset.seconds = String(left);
      el.textContent = Math.round(left) + " s";
    });
  }
  function refresh(wrap) {
    var seconds = parseFloat(wrap.dataset.refresh) || 5;
    setInterval(function () {
      if (document.hidden) return;
      var controller = new AbortController();
      var timer = setTimeout(function () { controller.abort(); }, 4000);
      fetch(location.href, { credentials: "same-origin", signal: controller.signal })
        .then(function (r) { return r.ok ? r.text() : null; })
        .then(function (html) {
          if (!html) return;
          var doc = new DOMParser().parseFromString(html, "text/html");
          ["[data-refresh]", "#summary"].forEach(function (sel) {
            var fresh = doc.querySelector(sel), old = document.querySelector(sel);
            // Never pull the table out from under a keyboard or screen-reader user.
            if (fresh && old && !old.contains(document.activeElement)) old.replaceWith(fresh);
          });
        })
        .catch(function () { /* offline or slow: the next tick tries again */ })
        .finally(function () { clearTimeout(timer); });
    }, seconds * 1000);
  }
  document.addEventListener("DOMContentLoaded", function () {
    setInterval(tick, 1000);
    var wrap = document.querySelector("[data-refresh]");
    if (wrap) refresh(wrap);
  });
})();
