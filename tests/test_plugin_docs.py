"""docs/plugins.md keeps up with the code: every hookspec is documented under a heading (and has a
docstring), every part of the technique contract and the plugin-selection variable are mentioned, relative
links resolve, and the example plugin sticks to the public API."""

from __future__ import annotations

import ast
import dataclasses
import re

import pluggy
import pytest

from autocompress import hookspecs
from autocompress.registry import PLUGINS_ENV
from autocompress.technique import Requirement, Technique, TechniqueContext, TrainingHooks
from conftest import ROOT

DOC = ROOT / "docs" / "plugins.md"
TEXT = DOC.read_text(encoding="utf-8")
HEADINGS = [line for line in TEXT.splitlines() if re.match(r"#{1,6} ", line)]


def hookspec_names() -> list[str]:
    """The hooks pluggy sees in autocompress.hookspecs (not a hand-kept list)."""
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    names = [name for name, caller in vars(pm.hook).items() if isinstance(caller, pluggy.HookCaller)]
    assert names, "no hookspecs found in autocompress.hookspecs"
    return sorted(names)


def mentioned(name: str) -> bool:
    return re.search(rf"`[^`\n]*\b{re.escape(name)}\b[^`\n]*`", TEXT) is not None


@pytest.mark.parametrize("hook", hookspec_names())
def test_every_hookspec_is_documented_under_a_heading(hook):
    assert any(re.search(rf"\b{re.escape(hook)}\b", h) for h in HEADINGS), (
        f"hookspec {hook!r} (autocompress/hookspecs.py) has no heading in docs/plugins.md; add a "
        f"'### `{hook}(...)`' section under '## 2. Hooks'")


@pytest.mark.parametrize("hook", hookspec_names())
def test_every_hookspec_has_a_docstring(hook):
    doc = getattr(hookspecs, hook).__doc__ or ""
    assert len(doc.strip()) > 40, f"hookspec {hook!r} needs a docstring that says what to register and why"


def technique_contract() -> list[str]:
    """Public attributes and methods a Technique subclass may set or override."""
    own = [n for n, v in vars(Technique).items() if not n.startswith("_")]
    hinted = [n for n in Technique.__annotations__ if not n.startswith("_")]
    # defaults() and param() are helpers a plugin calls, not part of what it implements
    return sorted(set(own + hinted) - {"defaults", "param"})


@pytest.mark.parametrize("name", technique_contract())
def test_technique_contract_is_documented(name):
    assert mentioned(name), f"Technique.{name} is not mentioned (in backticks) in docs/plugins.md"


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(TrainingHooks)])
def test_training_hooks_fields_are_documented(name):
    assert mentioned(name), f"TrainingHooks.{name} is not mentioned (in backticks) in docs/plugins.md"


@pytest.mark.parametrize("name", [n for n in vars(TechniqueContext) if not n.startswith("_")] + ["device", "seed"])
def test_context_services_are_documented(name):
    assert mentioned(name), f"TechniqueContext.{name} is not mentioned (in backticks) in docs/plugins.md"


@pytest.mark.parametrize("member", [r.name for r in Requirement])
def test_requirements_are_documented(member):
    assert mentioned(member), f"Requirement.{member} is not mentioned in docs/plugins.md"


def test_plugin_selection_variable_is_documented():
    assert any(PLUGINS_ENV in h for h in HEADINGS)
    for value in ("all", "builtin", "none"):
        assert f"`{value}`" in TEXT
    assert "[project.entry-points.autocompress]" in TEXT and "TechniqueContract" in TEXT


def test_relative_links_resolve():
    for doc in (DOC, ROOT / "README.md", ROOT / "examples" / "autocompress-layerdrop" / "README.md"):
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text(encoding="utf-8")):
            if "://" in target:
                continue
            assert (doc.parent / target).exists(), f"{doc.relative_to(ROOT)} links to missing {target}"
    assert "docs/plugins.md" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_anchor_links_point_at_headings():
    def slug(heading: str) -> str:  # GitHub's rule: lower-case, drop punctuation except - and _, spaces -> -
        text = heading.lstrip("#").strip().lower()
        return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")

    slugs = {slug(h) for h in HEADINGS}
    for anchor in re.findall(r"\]\(#([^)]+)\)", TEXT):
        assert anchor in slugs, f"docs/plugins.md links to #{anchor}, which is no heading"


def test_example_plugin_uses_only_the_public_api():
    public = {"autocompress", "autocompress.technique", "autocompress.surgery", "autocompress.testing"}
    pkg = ROOT / "examples" / "autocompress-layerdrop"
    for path in [*pkg.glob("autocompress_layerdrop/*.py"), *pkg.glob("tests/*.py")]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        imported |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
        ours = {m for m in imported if m == "autocompress" or m.startswith("autocompress.")}
        assert ours <= public, f"{path.name} imports non-public {sorted(ours - public)}"
        assert not any(m.startswith("plugins") for m in imported), f"{path.name} imports a built-in plugin"
