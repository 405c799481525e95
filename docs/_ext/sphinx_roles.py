"""A griffe extension for the API pages: the package's docstrings use Sphinx cross-reference roles
(``:func:`mmkernels.get_backend```, ``:class:`~mmkernels.nn.GatedFusion```, ``:mod:`.gemms```),
which Markdown would print as they are. Each role becomes an *optional* autorefs link: a link
where the target is documented on the site, plain code where it is not (no warning either way,
so ``mkdocs build --strict`` stays quiet about private helpers a docstring names).

Static analysis only: nothing of mmkernels (or torch) is imported."""
from __future__ import annotations

import html
import re

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|mod|meth|data|attr|exc|obj):`(?P<target>[^`]+)`")


def _module_of(obj):
    while obj is not None and not obj.is_module:
        obj = obj.parent
    return obj


def _resolve(obj, target: str) -> str:
    """The full dotted path ``target`` names from ``obj``'s docstring."""
    if target.startswith("."):                       # relative to the module's package
        module = _module_of(obj)
        base = module.path if module.is_init_module else module.parent.path
        return base + target if not target.startswith("..") else target.lstrip(".")
    if target.split(".", 1)[0] == "mmkernels":
        return target
    head, _, rest = target.partition(".")
    scope = obj if obj.is_module or obj.is_class else obj.parent
    while scope is not None:                          # names visible where the docstring is
        if head in scope.members:
            member = scope.members[head]
            path = member.target_path if member.is_alias else member.path
            return path + ("." + rest if rest else "")
        scope = scope.parent
    return target


def _link(obj, match: re.Match) -> str:
    target = match["target"].strip()
    short = target.startswith("~")
    target = target.lstrip("~")
    shown = target.rsplit(".", 1)[-1] if short else target.lstrip(".")
    path = _resolve(obj, target)
    return (f'<autoref identifier="{html.escape(path)}" optional>'
            f"<code>{html.escape(shown)}</code></autoref>")


class SphinxRoles(griffe.Extension):
    """Rewrite the roles of every docstring once the object tree is complete."""

    def on_object(self, *, obj, **kwargs) -> None:
        docstring = obj.docstring
        if docstring is not None and ":" in docstring.value:
            docstring.value = ROLE.sub(lambda m: _link(obj, m), docstring.value)
