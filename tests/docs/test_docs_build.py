"""The documentation site: it builds in strict mode, documents every public name, and the
Python examples on its pages run.

`mkdocs build --strict` fails on a broken link, a missing page, an unresolved API reference or
a docstring that mkdocstrings cannot render. The API check is data-driven: every name in the
`__all__` of the package, of every public module listed there (recursively) and of
`keras_softquantile.testing` must be the object of an anchor on an API page, so a new public
name fails this test until it is documented.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import textwrap
import types
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
ROOT_MODULES = ("keras_softquantile", "keras_softquantile.testing")
# Pages whose ```python blocks run, in order, in one fresh interpreter per page. Blocks fenced
# as ```py are highlighted but not run (for example, code that must start its own process).
EXAMPLE_TIMEOUT_S = 300

# The `docs` extra is part of `dev`, which CI installs: a missing tool fails here, loudly,
# instead of skipping the check.
for _tool in ("mkdocs", "mkdocstrings_handlers.python", "material"):
    importlib.import_module(_tool)


class _Anchors(HTMLParser):
    """Collects the `id` attributes of an HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs) -> None:
        del tag
        for name, value in attrs:
            if name == "id" and value:
                self.ids.add(value)


def _built_page(page: Path, site: Path) -> Path:
    """Where mkdocs (with directory URLs) writes the HTML of a Markdown page."""
    relative = page.relative_to(DOCS).with_suffix("")
    if relative.name == "index":
        return site / relative.parent / "index.html"
    return site / relative / "index.html"


def test_site_builds_with_every_page(site):
    for page in DOCS.rglob("*.md"):
        assert _built_page(page, site).is_file(), f"{page.relative_to(ROOT)} was not built"


def _resolve(path: str):
    """The object a dotted anchor like `keras_softquantile.ops.transport.solve_newton` names."""
    parts = path.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        try:
            for attribute in parts[split:]:
                obj = getattr(obj, attribute)
        except AttributeError:
            return None
        return obj
    return None


def _public_names() -> dict[str, object]:
    """`module.name -> object` for every name in the `__all__` of the public modules."""
    names: dict[str, object] = {}
    pending = [importlib.import_module(m) for m in ROOT_MODULES]
    seen: set[str] = set()
    while pending:
        module = pending.pop()
        if module.__name__ in seen:
            continue
        seen.add(module.__name__)
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name)
            names[f"{module.__name__}.{name}"] = obj
            if isinstance(obj, types.ModuleType):
                pending.append(obj)
    return names


def test_every_public_name_is_on_an_api_page(site):
    documented: dict[int, str] = {}
    anchors: set[str] = set()
    for page in (site / "api").rglob("index.html"):
        parser = _Anchors()
        parser.feed(page.read_text(encoding="utf-8"))
        for anchor in parser.ids:
            if anchor.startswith("keras_softquantile"):
                anchors.add(anchor)
                obj = _resolve(anchor)
                if obj is not None:
                    documented[id(obj)] = anchor
    public = _public_names()
    assert public, "no public names found"

    def is_documented(path: str, obj) -> bool:
        if isinstance(obj, types.ModuleType) and getattr(obj, "__all__", None):
            # A public module is documented through its own public names (checked too).
            return True
        if isinstance(obj, type | types.FunctionType | types.ModuleType):
            # By identity: a re-export (keras_softquantile.SoftTopK) documented once is
            # documented.
            return id(obj) in documented
        return path in anchors

    missing = sorted(path for path, obj in public.items() if not is_documented(path, obj))
    assert not missing, (
        "public names missing from the API pages (add them to docs/api/*.md): " + ", ".join(missing)
    )


def _python_blocks(page: Path) -> list[str]:
    blocks, current = [], None
    for line in page.read_text(encoding="utf-8").splitlines():
        if current is None and line.strip() == "```python":
            current = []
        elif current is not None and line.strip() == "```":
            blocks.append("\n".join(current))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


_PAGES_WITH_EXAMPLES = sorted(
    str(page.relative_to(DOCS)) for page in DOCS.rglob("*.md") if _python_blocks(page)
)


@pytest.mark.slow
@pytest.mark.parametrize("page", _PAGES_WITH_EXAMPLES)
def test_page_examples_run(page, tmp_path):
    blocks = [textwrap.dedent(b) for b in _python_blocks(DOCS / page)]
    numbered = [f"# --- block {i + 1} of {page}\n{b}" for i, b in enumerate(blocks)]
    # A page's blocks run as one script, in order; a block that picks its own Keras backend
    # (read once, at import) runs in a process of its own.
    own_backend = [b for b in numbered if 'os.environ["KERAS_BACKEND"]' in b]
    scripts = ["\n\n".join(b for b in numbered if b not in own_backend), *own_backend]
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "MPLBACKEND": "Agg"}
    for number, script in enumerate(s for s in scripts if s):
        path = tmp_path / f"examples_{number}.py"
        path.write_text(script, encoding="utf-8")
        completed = subprocess.run(
            [sys.executable, str(path)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=EXAMPLE_TIMEOUT_S,
            env=environment,
        )
        assert completed.returncode == 0, (
            f"the examples of docs/{page} failed:\n{script[:300]}\n{completed.stdout[-3000:]}\n"
            f"{re.sub(r'(?m)^.*(oneDNN|cuda|absl|TF-TRT).*$', '', completed.stderr)[-5000:]}"
        )
