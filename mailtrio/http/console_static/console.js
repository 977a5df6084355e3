// The console works without this file; it only adds "select all" to the list forms.
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  document.querySelectorAll("input.select-all").forEach(function (all) {
    var form = all.closest("form");
    if (!form) { return; }
    all.addEventListener("change", function () {
      form.querySelectorAll('input[type="checkbox"][name="delivery_id"]').forEach(function (box) {
        box.checked = all.checked;
      });
    });
  });
});
