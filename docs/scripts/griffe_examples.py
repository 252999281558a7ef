"""Griffe extension for the API pages: renders this package's docstring conventions.

The docstrings follow the Keras style: `>>>` examples inside the description and a
"Call arguments:" block of `name: description` lines. Markdown would turn the first into
nested block quotes and run the second together into one paragraph, so before parsing this
extension fences every example as a `pycon` code block and turns the call arguments into a
list. The source docstrings are not changed.
"""

from __future__ import annotations

import re

import griffe

_PROMPT = re.compile(r"^(\s*)>>> ")
_SECTION = re.compile(r"^(\s*)Call arguments:\s*$")
_ITEM = re.compile(r"^(\s+)(\*{0,2}\w+)(: .*)$")


def _fence_examples(lines: list[str]) -> list[str]:
    """Wraps each run of `>>>` lines and their output (up to a blank line) in a fence."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = _PROMPT.match(lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        indent = match.group(1)
        block = []
        while i < len(lines) and lines[i].strip() and lines[i].startswith(indent):
            block.append(lines[i])
            i += 1
        out.extend([f"{indent}```pycon", *block, f"{indent}```"])
    return out


def _list_call_arguments(lines: list[str]) -> list[str]:
    """Turns the `name: text` lines of a "Call arguments:" block into list items."""
    out: list[str] = []
    inside: str | None = None
    for line in lines:
        section = _SECTION.match(line)
        if section:
            inside = section.group(1)
            out.append(line)
            continue
        if inside is not None:
            if line.strip() and len(line) - len(line.lstrip()) <= len(inside):
                inside = None
            else:
                item = _ITEM.match(line)
                if item and len(item.group(1)) == len(inside) + 4:
                    line = f"{item.group(1)}- `{item.group(2)}`{item.group(3)}"
        out.append(line)
    return out


class KerasStyleDocstrings(griffe.Extension):
    """Rewrites `>>>` examples and "Call arguments:" blocks into Markdown before parsing."""

    def on_object(self, *, obj: griffe.Object, **kwargs) -> None:
        del kwargs
        if obj.docstring is None:
            return
        lines = obj.docstring.value.splitlines()
        obj.docstring.value = "\n".join(_list_call_arguments(_fence_examples(lines)))
