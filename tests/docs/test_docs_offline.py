"""The built site shows everything with no network, and its API pages show constants' values.

A reader who opens the docs offline (a saved copy, an air-gapped machine, a local
`mkdocs serve` on a train) must get the whole page: the math typeset, the styles, the fonts,
the figures and the search. So no page may load a script, a stylesheet, a font, an image or a
frame from another host, no stylesheet may import or point at one, and the math renderer that
the pages reference must be a file of the site. Links that the reader follows
(`<a href="https://...">`) are fine.
"""

from __future__ import annotations

import ast
import importlib
import json
import pkgutil
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import keras
import pytest

import keras_softquantile

# Pages whose Markdown has math: pymdownx.arithmatex must have marked it up for the renderer.
MATH_PAGES = ("theory", "why-zero-gradient", "faq")

# Link relations that only name another document; every other `<link>` loads something.
_NAVIGATION_RELS = {"alternate", "author", "canonical", "help", "license", "me", "next", "prev"}
# Attributes through which an element loads content it shows or runs.
_LOADING_ATTRIBUTES = {
    "audio": ("src",),
    "embed": ("src",),
    "frame": ("src",),
    "iframe": ("src",),
    "img": ("src", "srcset"),
    "input": ("src",),
    "object": ("data",),
    "script": ("src",),
    "source": ("src", "srcset"),
    "track": ("src",),
    "video": ("src", "poster"),
}
_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source"}
_VOID |= {"track", "wbr"}
# `url(` or `@import` followed by an absolute or protocol-relative address.
_CSS_OUTSIDE = re.compile(
    r"""(?:url\(\s*|@import\s+(?:url\(\s*)?)["']?\s*((?:https?:)?//[^"')\s;]*)""", re.IGNORECASE
)
_CONSTANT = re.compile(r"^[A-Z][A-Z0-9_]*$")


def _is_outside(url: str) -> bool:
    url = url.strip().lower()
    return url.startswith(("http:", "https:", "//"))


class _Page(HTMLParser):
    """The resources an HTML page loads, its inline styles, and the text of chosen elements."""

    def __init__(self) -> None:
        super().__init__()
        self.loads: list[tuple[str, str, str]] = []  # (tag, attribute, url)
        self.styles: list[str] = []
        self.classes: set[str] = set()
        self.signatures: list[str] = []  # text of each mkdocstrings signature block
        self.cells: list[str] = []  # text of each table cell
        self.ids: set[str] = set()
        self._open: list[tuple[list[str], int]] = []  # (text parts, depth it closes at)
        self._depth = 0
        self._in_style = False

    def handle_starttag(self, tag, attrs) -> None:
        attributes = {name: value or "" for name, value in attrs}
        self.classes.update(attributes.get("class", "").split())
        if attributes.get("id"):
            self.ids.add(attributes["id"])
        for name in _LOADING_ATTRIBUTES.get(tag, ()):
            if attributes.get(name):
                for candidate in attributes[name].split(","):
                    url = candidate.split()[0] if name.endswith("srcset") else candidate
                    self.loads.append((tag, name, url.strip()))
                if name != "srcset":
                    break
        if tag == "link" and attributes.get("href"):
            rels = set(attributes.get("rel", "").lower().split())
            if not rels <= _NAVIGATION_RELS:
                self.loads.append(
                    (f"link rel={' '.join(sorted(rels))}", "href", attributes["href"])
                )
        if attributes.get("style"):
            self.styles.append(attributes["style"])
        self._in_style = tag == "style"
        if tag in _VOID:
            return
        self._depth += 1
        classes = attributes.get("class", "").split()
        if (tag == "div" and "doc-signature" in classes) or tag == "td":
            self._open.append(([], self._depth))

    def handle_startendtag(self, tag, attrs) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in _VOID:
            self.handle_endtag(tag)

    def handle_endtag(self, tag) -> None:
        if tag in _VOID:
            return
        self._in_style = False
        if self._open and self._open[-1][1] == self._depth:
            parts, _ = self._open.pop()
            text = " ".join("".join(parts).split())
            (self.cells if tag == "td" else self.signatures).append(text)
            if self._open:
                self._open[-1][0].append(text)
        self._depth -= 1

    def handle_data(self, data) -> None:
        if self._in_style:
            self.styles.append(data)
        if self._open:
            self._open[-1][0].append(data)


@pytest.fixture(scope="module")
def pages(site) -> dict[str, _Page]:
    """Every HTML file of the built site, by its path in the site."""
    parsed = {}
    for path in sorted(site.rglob("*.html")):
        page = _Page()
        page.feed(path.read_text(encoding="utf-8"))
        parsed[str(path.relative_to(site))] = page
    return parsed


def _local_file(site: Path, page: str, url: str) -> Path:
    """The file of the site that a relative or root-relative `url` on `page` names."""
    path = unquote(urlsplit(url).path)
    base = site if path.startswith("/") else (site / page).parent
    target = (base / path.lstrip("/")).resolve()
    return target / "index.html" if target.is_dir() else target


def test_the_checks_see_what_loads_from_outside():
    page = _Page()
    page.feed(
        '<link rel="stylesheet" href="https://a.example/x.css"><link rel="canonical" '
        'href="https://a.example/"><link rel="preconnect" href="//fonts.example">'
        '<script src="https://a.example/x.js"></script><img srcset="../a.png 1x, '
        'https://a.example/b.png 2x"><iframe src="http://a.example/"></iframe>'
        '<a href="https://a.example/read-on">read on</a><div style="background: '
        'url(\'https://a.example/c.png\')"></div><style>@import "https://a.example/d.css";'
        "</style><table><tr><td>A <code>B</code></td></tr></table>"
    )
    outside = sorted(url for _, _, url in page.loads if _is_outside(url))
    assert outside == [
        "//fonts.example",
        "http://a.example/",
        "https://a.example/b.png",
        "https://a.example/x.css",
        "https://a.example/x.js",
    ]
    in_styles = [url for style in page.styles for url in _CSS_OUTSIDE.findall(style)]
    assert in_styles == ["https://a.example/c.png", "https://a.example/d.css"]
    assert page.cells == ["A B"]
    css = "a{background:url(\"data:image/svg+xml;utf8,<svg xmlns='http://www.w3.org/2000/svg'/>\")}"
    css += "@import url(https://a.example/e.css);b{src:url( //a.example/f.woff2)}"
    assert _CSS_OUTSIDE.findall(css) == ["https://a.example/e.css", "//a.example/f.woff2"]


def test_no_page_loads_anything_from_another_host(site, pages):
    offenders = []
    for name, page in pages.items():
        offenders += [
            f"{name}: <{tag} {attr}={url}>" for tag, attr, url in page.loads if _is_outside(url)
        ]
        offenders += [
            f"{name}: inline style loads {url}"
            for style in page.styles
            for url in _CSS_OUTSIDE.findall(style)
        ]
        if "mermaid" in page.classes:
            offenders.append(f"{name}: a mermaid diagram (the theme loads mermaid from unpkg.com)")
    for path in sorted(site.rglob("*.css")):
        css = path.read_text(encoding="utf-8", errors="replace")
        offenders += [f"{path.relative_to(site)}: loads {url}" for url in _CSS_OUTSIDE.findall(css)]
    for path in sorted([*site.rglob("*.css"), *site.rglob("*.js")]):
        text = path.read_text(encoding="utf-8", errors="replace")
        if "fonts.googleapis.com" in text or "fonts.gstatic.com" in text:
            offenders.append(f"{path.relative_to(site)}: names Google Fonts")
    assert not offenders, "the site needs the network to show these:\n" + "\n".join(offenders)


def test_every_local_resource_exists(site, pages):
    missing = [
        f"{name}: <{tag} {attr}={url}>"
        for name, page in pages.items()
        for tag, attr, url in page.loads
        if not _is_outside(url)
        and not url.startswith(("data:", "#"))
        and not _local_file(site, name, url).is_file()
    ]
    assert not missing, "pages reference files the site does not have:\n" + "\n".join(missing)


def test_math_is_marked_up_and_its_renderer_is_served_by_the_site(site, pages):
    config = (site / "javascripts" / "mathjax.js").read_text(encoding="utf-8")
    # arithmatex's generic mode wraps math in \( \) and \[ \]: the renderer must look for those.
    assert r'inlineMath: [["\\(", "\\)"]]' in config
    assert r'displayMath: [["\\[", "\\]"]]' in config
    assert 'processHtmlClass: "arithmatex"' in config
    for stem in MATH_PAGES:
        name = f"{stem}/index.html"
        page = pages[name]
        assert "arithmatex" in page.classes, f"{name} has no arithmatex math"
        scripts = [url for tag, _, url in page.loads if tag == "script"]
        # The renderer, not its configuration (javascripts/mathjax.js).
        renderers = [
            url
            for url in scripts
            if "mathjax" in urlsplit(url).path.lower() and not url.endswith("/mathjax.js")
        ]
        assert renderers, f"{name} loads no MathJax build (scripts: {scripts})"
        for url in renderers:
            assert not _is_outside(url), f"{name} loads MathJax from {url}"
            build = _local_file(site, name, url)
            assert build.is_file(), f"{name} loads {url}, which the site does not have"
            assert build.stat().st_size > 500_000, f"{build} is too small for a MathJax build"
            assert "MathJax" in build.read_text(encoding="utf-8", errors="replace")[:5_000_000]
    theory = (site / "theory" / "index.html").read_text(encoding="utf-8")
    assert theory.count('class="arithmatex"') >= 50, "the theory page lost its math"


def test_search_works_offline(site):
    index = json.loads((site / "search" / "search_index.json").read_text(encoding="utf-8"))
    locations = {doc["location"].split("#")[0] for doc in index["docs"]}
    assert {"theory/", "why-zero-gradient/", "api/ops/"} <= locations


def _other_backend(module_name: str) -> bool:
    """Whether `module_name` is the `ops._backend` module of a Keras backend other than the
    active one (it imports that framework, which need not be installed)."""
    prefix = "keras_softquantile.ops._backend._"
    if not module_name.startswith(prefix):
        return False
    backend = module_name[len(prefix) :]
    return backend in ("tensorflow", "jax", "torch") and backend != keras.backend.backend()


def _constants(*, public: bool) -> dict[str, object]:
    """`module.NAME -> value` for the constants with a literal value that the package's modules
    define (with `public`, only those of modules without a `_` in their dotted name)."""
    constants = {}
    names = [keras_softquantile.__name__]
    names += [
        info.name
        for info in pkgutil.walk_packages(keras_softquantile.__path__, "keras_softquantile.")
        if info.name != "keras_softquantile.__main__" and not _other_backend(info.name)
    ]
    for module_name in names:
        if public and any(part.startswith("_") for part in module_name.split(".")):
            continue
        module = importlib.import_module(module_name)
        source = Path(module.__file__).read_text(encoding="utf-8")
        # Also the constants a module imports by name from the package (the ops take their
        # shared defaults from one private home, `ops._validation`): they are its API too.
        imported = {
            alias.asname or alias.name
            for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.ImportFrom)
            and (node.module or "").startswith("keras_softquantile")
            for alias in node.names
        }
        for name, value in vars(module).items():
            defined_here = name in imported or re.search(rf"(?m)^{name}\s*(:[^=\n]*)?=", source)
            literal = isinstance(value, bool | int | float | str)
            if _CONSTANT.match(name) and defined_here and literal:
                constants[f"{module_name}.{name}"] = value
    return constants


def test_api_pages_show_the_values_of_constants(site, pages):
    api = {name: page for name, page in pages.items() if name.startswith("api/")}
    constants = _constants(public=True)
    assert "keras_softquantile.ops.selection.DEFAULT_EPSILON" in constants
    names = {path.rsplit(".", 1)[1] for path in _constants(public=False)}

    # No signature or parameter table names a constant where its value belongs.
    named = [
        f"{name}: {text}"
        for name, page in api.items()
        for text in page.signatures
        if re.search(r"=\s*[A-Z][A-Z0-9_]{2,}\s*[,)]", text)
    ]
    named += [
        f"{name}: default {text}"
        for name, page in api.items()
        for text in page.cells
        if text in names
    ]
    assert not named, "defaults shown by name instead of value:\n" + "\n".join(named)

    ops = pages["api/ops/index.html"]
    epsilon = constants["keras_softquantile.ops.selection.DEFAULT_EPSILON"]
    signature = next(text for text in ops.signatures if text.startswith("soft_topk_mask("))
    assert f"epsilon: float | Tensor = {epsilon!r}," in signature, signature

    # Every public constant is listed, with its value, on an API page.
    unlisted = []
    for path, value in constants.items():
        shown = f"{path.rsplit('.', 1)[1]} = {value!r}"
        if not any(path in page.ids and shown in page.signatures for page in api.values()):
            unlisted.append(f"{path} ({shown})")
    assert not unlisted, "constants missing from the API pages:\n" + "\n".join(unlisted)
