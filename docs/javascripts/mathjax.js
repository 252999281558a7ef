// MathJax configuration for pymdownx.arithmatex (generic mode). MathJax itself is served by
// the site (javascripts/vendor/mathjax/), so the math renders with no network.
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
  svg: {
    // One shared set of glyph paths per page instead of a copy in every formula.
    fontCache: "global",
  },
};

document$.subscribe(() => {
  if (window.MathJax && window.MathJax.typesetPromise) {
    MathJax.typesetPromise();
  }
});
