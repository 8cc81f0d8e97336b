// MathJax 3 settings for pymdownx.arithmatex in "generic" mode.
// arithmatex wraps every formula in an element of class "arithmatex" and writes it
// with \( \) (inline) or \[ \] (display) delimiters; only those elements are typeset.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex",
  },
};

// mkdocs-material swaps page content without a full reload ("instant" navigation);
// its document$ observable fires after each swap, so typeset the new page then.
function danLayersTypeset() {
  if (!window.MathJax || !window.MathJax.typesetPromise) {
    return; // MathJax not loaded yet (or blocked): nothing to do
  }
  window.MathJax.startup.output.clearCache();
  window.MathJax.typesetClear();
  window.MathJax.texReset();
  window.MathJax.typesetPromise();
}

if (typeof document$ !== "undefined") {
  document$.subscribe(danLayersTypeset);
}
