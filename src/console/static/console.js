// The idemd console's only script. Pages work without it; it adds the browser's own time zone
// next to each UTC time, and keeps a confirmation form from being sent twice. It reads the
// page, never a token: sessions are an HttpOnly cookie it cannot see.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const zone = Intl.DateTimeFormat().resolvedOptions().timeZone || "local time";
  for (const element of document.querySelectorAll("time[datetime]")) {
    const at = new Date(element.getAttribute("datetime"));
    if (Number.isNaN(at.getTime())) continue;
    const local = document.createElement("span");
    local.className = "local";
    local.textContent = `${at.toLocaleString()} (${zone})`;
    element.after(local);
  }
  for (const form of document.querySelectorAll("form.card")) {
    form.addEventListener("submit", () => {
      for (const button of form.querySelectorAll("button[type=submit]")) button.disabled = true;
    });
  }
});
