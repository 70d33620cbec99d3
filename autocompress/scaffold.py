"""``autocompress new-plugin NAME``: write a technique plugin package that works before it is edited.

The skeleton is a real, installable package: a ``pyproject.toml`` with the ``autocompress`` entry point,
a plugin module with a :class:`~autocompress.technique.Technique` subclass and its ``register_techniques``
hook, and ``tests/test_contract.py`` running :class:`autocompress.testing.TechniqueContract`. The
technique's transform is a placeholder with a real, measurable effect (magnitude pruning of FFN neurons,
with ``restore`` and identity/example settings), because the contract suite checks that a technique changes
what it claims to change: a no-op placeholder would either fail the suite or teach the author to claim
nothing. The author replaces the marked block (and the claims) with their own transform; the suite then
tells them what they broke.

Templates are plain strings filled with :class:`string.Template` (``$name``), so the generated Python can
use braces freely.
"""

from __future__ import annotations

import keyword
import re
from pathlib import Path
from string import Template

from .errors import PluginError

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")
MAX_NAME_LENGTH = 40

PYPROJECT = Template('''\
[build-system]
requires = ["setuptools>=69"]
build-backend = "setuptools.build_meta"

[project]
name = "$dist"
version = "0.1.0"
description = "autocompress technique plugin: $name"
readme = "README.md"
requires-python = ">=3.10"
dependencies = ["autocompress>=$autocompress_version", "torch>=2.4"]

[project.optional-dependencies]
test = ["pytest>=8"]

# This line makes autocompress find the technique: entry-point name = the module holding the
# @hookimpl register_techniques function.
[project.entry-points.autocompress]
$name = "$package.plugin"

[tool.setuptools.packages.find]
include = ["$package*"]

[tool.pytest.ini_options]
testpaths = ["tests"]
''')

INIT = Template('''\
"""$dist: an autocompress technique plugin (the plugin module is $package.plugin)."""

from __future__ import annotations

__version__ = "0.1.0"
''')

PLUGIN = Template('''\
"""$class_name: an autocompress technique plugin.

TODO: say what the technique does, cite its source, and say honestly what it saves (size, latency, FLOPs)
and what it does not. The transform below is a working placeholder, magnitude pruning of FFN neurons, so
the package passes autocompress's contract suite (tests/test_contract.py) before you change anything.
Replace the block marked TODO in ``apply`` (and ``restore``, ``params``, ``reduces``) with your own
technique, then run ``pytest``: the suite tells you what no longer holds. Guide: docs/plugins.md in the
autocompress repository.

Use only autocompress's public API: autocompress.technique, autocompress.surgery, autocompress.hookimpl.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn

from autocompress import hookimpl
from autocompress.surgery import encoder_layers, ffn_sizes, prune_ffn_neurons
from autocompress.technique import FloatParam, Stage, Technique, TechniqueContext


class $class_name(Technique):
    name = "$name"
    description = "TODO: one sentence shown by 'autocompress plugins'."
    stage = Stage.STRUCTURE  # STRUCTURE (before recovery training), TRAINING or POST_TRAINING
    # Within the stage: after head_pruning (10), before low_rank (20), which replaces the Linears this
    # placeholder reads weights from.
    order = 15
    # The search space: each parameter's range (or choices) and the default used when a spec fixes nothing.
    params = (
        FloatParam("fraction", 0.0, 0.9, 0.0, help="fraction of each layer's FFN neurons removed (0 = none)"),
    )
    # {"other_technique": "why they cannot be combined"}; leave empty unless truly impossible.
    incompatible_with: dict[str, str] = {}
    # What the transform really reduces; the contract suite checks params, size, flops and tokens.
    reduces = frozenset({"params", "flops", "latency", "size"})

    def identity_params(self) -> dict[str, Any] | None:
        """Settings that must leave the outputs unchanged (the contract checks it); None if there are none."""
        return {"fraction": 0.0}

    def example_params(self) -> dict[str, Any]:
        """A setting with a clearly observable effect on a tiny model (the contract checks ``reduces``)."""
        return {"fraction": 0.5}

    def supports(self, model: nn.Module, *, device: str = "cpu") -> str | None:
        try:
            if len(encoder_layers(model)) == 0:
                raise ValueError
        except (AttributeError, ValueError):
            return f"$name needs a BERT-like model (.bert.encoder.layer); got {type(model).__name__}"
        return None

    def apply(self, model: nn.Module, *, params: Mapping[str, Any], ctx: TechniqueContext) -> dict[str, Any] | None:
        full = {**self.defaults(), **params}
        # ---- TODO: replace this placeholder transform (magnitude pruning of FFN neurons) with yours ----
        widths = ffn_sizes(model)
        keep: list[list[int]] = []
        for layer, width in zip(encoder_layers(model), widths):
            # A neuron's magnitude: norm of its input row times norm of its output column.
            score = layer.intermediate.dense.weight.norm(dim=1) * layer.output.dense.weight.norm(dim=0)
            n_keep = max(1, width - int(math.floor(float(full["fraction"]) * width + 0.5)))
            order = torch.argsort(score.detach().float().cpu(), descending=True, stable=True)
            keep.append(sorted(order[:n_keep].tolist()))
        if [len(k) for k in keep] == widths:
            return None  # nothing removed: no recipe step (and no recovery training for it)
        prune_ffn_neurons(model, keep)  # slices the weights: the neurons are physically gone
        ctx.log(f"$name: FFN widths {widths} -> {[len(k) for k in keep]}")
        # The record must be JSON-able and enough for restore() to rebuild the structure.
        return {"ffn_before": widths, "kept_neurons": keep}
        # ---- end of the placeholder ----------------------------------------------------------------

    def restore(self, model: nn.Module, *, phase: str, params: Mapping[str, Any],
                record: Mapping[str, Any] | None) -> None:
        """Rebuild on a fresh base model the structure ``apply`` recorded; the weights are loaded after."""
        if phase != "apply" or not record:
            return
        if list(record["ffn_before"]) != ffn_sizes(model):
            raise ValueError(f"$name record was made on FFN widths {record['ffn_before']}; this model has "
                             f"{ffn_sizes(model)}")
        prune_ffn_neurons(model, [list(k) for k in record["kept_neurons"]])


@hookimpl
def register_techniques(register) -> None:
    register($class_name())
''')

CONTRACT_TEST = Template('''\
"""autocompress's contract suite on $name: identity settings, claimed reductions, save/reload, CUDA when
present, and composition with every other installed technique."""

from __future__ import annotations

from autocompress.testing import TechniqueContract

from $package.plugin import $class_name


class Test${class_name}Contract(TechniqueContract):
    technique = $class_name()
    # Lets the suite run from a source tree that is not installed; once installed, the entry point loads
    # the same module and this entry is skipped.
    plugins = ("$package.plugin",)
''')

GITIGNORE = Template("build/\ndist/\n*.egg-info/\n__pycache__/\n.pytest_cache/\n")

README = Template('''\
# $dist

An autocompress technique plugin that registers the technique `$name`.

Generated by `autocompress new-plugin $name`. The transform in `$package/plugin.py` is a working
placeholder (magnitude pruning of FFN neurons). Replace the block marked TODO with your technique;
see docs/plugins.md in the autocompress repository for the contract.

```bash
pip install -e .          # registers the `autocompress` entry point
autocompress plugins      # lists $name
pytest                    # autocompress's contract suite on $name
```

Use it in a search spec:

```yaml
techniques:
  $name: {enabled: search, params: {fraction: [0.1, 0.5]}}
```
''')


def validate_name(name: str) -> None:
    """Refuse names that would not make a valid technique, package and entry point, with the fix."""
    if not isinstance(name, str) or not name:
        raise PluginError("new-plugin NAME: give a technique name such as 'my_pruning'")
    suggestion = re.sub(r"[^a-z0-9_]", "_", name.strip().lower()).strip("_")
    if suggestion and not suggestion[0].isalpha():
        suggestion = f"t_{suggestion}"
    hint = f" Try {suggestion!r}." if suggestion and suggestion != name and NAME_PATTERN.match(suggestion) else ""
    if not NAME_PATTERN.match(name):
        raise PluginError(f"new-plugin NAME {name!r}: a technique name is lower-case letters, digits and "
                          f"underscores, starting with a letter (it becomes the technique name, the entry-point "
                          f"name and part of the package name).{hint}")
    if keyword.iskeyword(name):
        raise PluginError(f"new-plugin NAME {name!r} is a Python keyword; pick another name, e.g. '{name}_technique'")
    if len(name) > MAX_NAME_LENGTH:
        raise PluginError(f"new-plugin NAME {name!r} is {len(name)} characters; use at most {MAX_NAME_LENGTH}")
    installed = _installed_plugin_names()
    if name in installed:
        raise PluginError(f"new-plugin NAME {name!r}: a plugin of that name is already installed (from "
                          f"{installed[name]}); technique names must be unique, so pick another NAME")


def _installed_plugin_names() -> dict[str, str]:
    """Entry-point names in the ``autocompress`` group, without importing any plugin (no torch import)."""
    import importlib.metadata

    from .registry import ENTRY_POINT_GROUP

    return {ep.name: (ep.dist.name if ep.dist is not None else "unknown distribution")
            for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def names_for(name: str) -> dict[str, str]:
    """The distribution, package and class names derived from a technique name."""
    return {
        "name": name,
        "dist": "autocompress-" + name.replace("_", "-"),
        "package": f"autocompress_{name}",
        "class_name": "".join(part.capitalize() for part in name.split("_") if part),
    }


def new_plugin(name: str, *, out: str | Path = ".") -> Path:
    """Write the plugin package for technique ``name`` under ``out`` and return its folder.

    Refuses (``PluginError``) an invalid or already installed name and an existing target folder, so it
    never overwrites anyone's work.
    """
    from . import __version__

    validate_name(name)
    names = names_for(name)
    target = Path(out) / names["dist"]
    if target.exists():
        raise PluginError(f"new-plugin: {str(target)!r} already exists; pick another NAME, or pass --out DIR to "
                          f"create the package in another folder (nothing was written)")
    values = {**names, "autocompress_version": __version__}
    files = {
        "pyproject.toml": PYPROJECT,
        "README.md": README,
        ".gitignore": GITIGNORE,
        f"{names['package']}/__init__.py": INIT,
        f"{names['package']}/plugin.py": PLUGIN,
        "tests/test_contract.py": CONTRACT_TEST,
    }
    for rel, template in files.items():
        path = target / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(template.substitute(values), encoding="utf-8")
    return target


def created_files(target: Path) -> list[str]:
    """The files under ``target``, relative and sorted (for the command's summary)."""
    return sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
