"""Griffe extensions for the API pages: render this package's docstring conventions and show
the values of its constants.

The docstrings follow the Keras style: `>>>` examples inside the description and a
"Call arguments:" block of `name: description` lines. Markdown would turn the first into
nested block quotes and run the second together into one paragraph, so before parsing
`KerasStyleDocstrings` fences every example as a `pycon` code block and turns the call
arguments into a list.

Signatures name module constants as defaults (`epsilon=DEFAULT_EPSILON`), which tells a reader
nothing. `ConstantValues` shows the constant's literal value instead (`epsilon=0.01`) and gives
each module constant the comment block written above it as its docstring, so an API page that
lists a constant shows its value and what it is for. The source files are not changed.
"""

from __future__ import annotations

import ast
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


_CONSTANT = re.compile(r"^[A-Z][A-Z0-9_]*$")


def _literal(attribute: griffe.Object | griffe.Alias) -> str | None:
    """The value of a constant as written in its module, if it is a literal; else None."""
    if attribute.is_alias:
        try:
            attribute = attribute.final_target
        except (griffe.AliasResolutionError, griffe.CyclicAliasError):
            return None
    if not attribute.is_attribute or attribute.value is None:
        return None
    text = str(attribute.value)
    try:
        ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None
    return text


def _comment_above(attribute: griffe.Attribute) -> str | None:
    """The `#` comment lines directly above a module attribute, without the `#`s."""
    if attribute.lineno is None:
        return None
    lines = attribute.module.lines
    first = attribute.lineno - 1
    while first > 0 and lines[first - 1].startswith("#"):
        first -= 1
    comment = [line[1:].strip() for line in lines[first : attribute.lineno - 1]]
    return "\n".join(comment) or None


class ConstantValues(griffe.Extension):
    """Shows the literal value of a constant used as a default, and documents constants."""

    def on_object(self, *, obj: griffe.Object, **kwargs) -> None:
        del kwargs
        if obj.is_function:
            for parameter in obj.parameters:
                default = parameter.default
                if not isinstance(default, griffe.ExprName) or not _CONSTANT.match(default.name):
                    continue
                scope = default.parent if isinstance(default.parent, griffe.Object) else obj
                member = scope.members.get(default.name) or obj.module.members.get(default.name)
                value = None if member is None else _literal(member)
                if value is not None:
                    parameter.default = value
        elif (
            obj.is_attribute
            and obj.parent is not None
            and obj.parent.is_module
            and _CONSTANT.match(obj.name)
            and obj.docstring is None
        ):
            comment = _comment_above(obj)
            if comment is not None:
                obj.docstring = griffe.Docstring(comment, lineno=obj.lineno, parent=obj)
