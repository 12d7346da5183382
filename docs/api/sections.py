"""Griffe extension: read statscope's docstrings as Sphinx's napoleon would.

statscope's docstrings spell the examples section ``Example:``, as the Google style guide and
napoleon do, and cross-reference with Sphinx roles (``:func:`statscope.open_run```). griffe knows
only ``Examples:``, and would render the doctests as Markdown (where ``>>>`` starts a quote and
``[...]`` a link) and the roles as literal text. This extension renames the section and turns
each role into a link where its target is in the reference (code text where not). Loaded by
mkdocs.yml for the API reference.
"""

import re

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)
_ROLE = re.compile(r":(?:func|class|meth|mod|data|attr|exc|obj):`(~?)([\w.]+)(?:\(\))?`")


def _link(match: re.Match) -> str:
    short, target = match.groups()
    text = target.rsplit(".", 1)[-1] if short else target
    # optional: a target outside the reference (a private module) stays code, without a warning
    return f'<autoref identifier="{target}" optional><code>{text}</code></autoref>'


class NapoleonDocstrings(griffe.Extension):
    """Rename ``Example:`` section headers to ``Examples:``; turn Sphinx roles into links."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            value = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
            obj.docstring.value = _ROLE.sub(_link, value)
