"""A griffe extension for the API reference: the docstrings' Sphinx roles as Markdown.

The docstrings cross-reference with ``:func:`name``` / ``:class:`~mod.Name```; mkdocstrings
renders Markdown, where those would show as literal text. Each becomes a link when its
target is documented in ``docs/api.md`` (a ``::: identifier`` line), plain code otherwise.
"""

from __future__ import annotations

import re
from pathlib import Path

import griffe

ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|exc):`(?P<tilde>~?)(?P<target>[^`]+)`")
API = Path(__file__).with_name("api.md")


class SphinxRoles(griffe.Extension):
    """Rewrite ``:role:`target``` in every docstring griffe loads."""

    def __init__(self) -> None:
        super().__init__()
        self.documented = re.findall(r"^::: (\S+)", API.read_text(), re.M)

    def resolve(self, target: str) -> str | None:
        """The documented identifier ``target`` names (full, or by its last parts)."""
        if target in self.documented:
            return target
        for suffix in (target, target.rsplit(".", 1)[-1]):  # then by its name alone
            matches = [d for d in self.documented if d.endswith("." + suffix)]
            if len(matches) == 1:
                return matches[0]
        return None

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is None:
            return

        def replace(m: re.Match) -> str:
            target = m["target"]
            shown = target.rsplit(".", 1)[-1] if m["tilde"] else target
            full = self.resolve(target)
            return f"[`{shown}`][{full}]" if full else f"`{shown}`"

        obj.docstring.value = ROLE.sub(replace, obj.docstring.value)
