// homeport web UI: the only script (Content-Security-Policy: script-src 'self').
// 1. One-time login link: the secret arrives in the URL fragment (never sent to a server);
//    post it and wipe it from the address bar and history at once. (Also on a hash change:
//    opening a second link while on the login page changes only the fragment.)
// 2. Forms with data-confirm ask before destructive actions.
"use strict";
function homeportLinkLogin() {
  var form = document.getElementById("login-form");
  if (form && location.hash.indexOf("#link=") === 0) {
    var secret = decodeURIComponent(location.hash.slice(6));
    history.replaceState(null, "", location.pathname);
    document.getElementById("link").value = secret;
    form.submit();
  }
}
window.addEventListener("hashchange", homeportLinkLogin);
document.addEventListener("DOMContentLoaded", function () {
  homeportLinkLogin();
  document.querySelectorAll("form[data-confirm]").forEach(function (f) {
    f.addEventListener("submit", function (ev) {
      if (!window.confirm(f.getAttribute("data-confirm"))) {
        ev.preventDefault();
      }
    });
  });
});
