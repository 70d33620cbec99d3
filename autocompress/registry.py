"""Plugin manager and technique registry.

Plugins are found three ways, all through one pluggy manager:

* the ``autocompress`` entry-point group — this is how the built-in techniques in ``plugins/`` are
  registered (they ship in this distribution's own entry points) and how third-party packages are found;
* ``--plugin`` values: a dotted module name or a path to a ``.py`` file;
* ``AUTOCOMPRESS_PLUGINS`` selects which entry-point plugins load: unset or ``all`` loads all,
  ``builtin`` loads only this distribution's, ``none`` loads none, or a comma-separated list of names.

A plugin that fails to import or registers something invalid is reported (``load_errors``) and skipped;
the others keep working.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import pluggy

from . import hookspecs
from .errors import PluginError, SpecError, close_matches
from .technique import CategoricalParam, FloatParam, IntParam, Stage, Technique

ENTRY_POINT_GROUP = "autocompress"
BUILTIN_DISTRIBUTION = "autocompress"
PLUGINS_ENV = "AUTOCOMPRESS_PLUGINS"


@dataclass
class RegisteredTechnique:
    technique: Technique
    plugin: str  # plugin name (entry point name, module or file)
    source: str  # "builtin", "entry-point", "--plugin"


@dataclass
class Registry:
    """The techniques every loaded plugin registered, and the plugins that failed."""

    techniques: dict[str, RegisteredTechnique] = field(default_factory=dict)
    load_errors: list[tuple[str, str]] = field(default_factory=list)  # (plugin, reason)
    plugin_manager: pluggy.PluginManager | None = None

    def names(self) -> list[str]:
        return sorted(self.techniques)

    def get(self, name: str) -> Technique:
        try:
            return self.techniques[name].technique
        except KeyError:
            known = ", ".join(self.names()) or "(none loaded)"
            raise SpecError(
                f"unknown technique {name!r}.{close_matches(name, self.names())} Known techniques: "
                f"{known}. Run 'autocompress plugins' to list them, or load a plugin with --plugin."
            ) from None

    def ordered(self, names: Iterable[str]) -> list[Technique]:
        """Techniques in pipeline order (stage, then order, then name)."""
        techs = [self.get(n) for n in names]
        return sorted(techs, key=lambda t: (int(t.stage), t.order, t.name))


def _validate_technique(obj: Any, plugin: str) -> Technique:
    """Check what a plugin registered; every message names the plugin."""
    where = f"plugin {plugin!r}"
    if isinstance(obj, type) and issubclass(obj, Technique):
        raise PluginError(f"{where} registered the class {obj.__name__}; register an instance: register({obj.__name__}())")
    if not isinstance(obj, Technique):
        raise PluginError(
            f"{where} registered {obj!r} ({type(obj).__name__}); register() takes an instance of "
            "autocompress.technique.Technique"
        )
    name = obj.name
    if not isinstance(name, str) or not name.isidentifier():
        raise PluginError(f"{where}: technique {type(obj).__name__}.name must be an identifier, got {name!r}")
    if not isinstance(obj.stage, Stage):
        raise PluginError(f"{where}: technique {name!r} has stage {obj.stage!r}; use a Stage member")
    seen: set[str] = set()
    for p in obj.params:
        if not isinstance(p, (FloatParam, IntParam, CategoricalParam)):
            raise PluginError(f"{where}: technique {name!r} has a param {p!r} that is not a FloatParam, IntParam or CategoricalParam")
        if p.name in seen or p.name == "enabled":
            raise PluginError(f"{where}: technique {name!r} declares param {p.name!r} twice (or uses the reserved name 'enabled')")
        seen.add(p.name)
        if isinstance(p, (FloatParam, IntParam)) and p.low > p.high:
            raise PluginError(f"{where}: technique {name!r} param {p.name!r} has low {p.low} > high {p.high}")
        if isinstance(p, CategoricalParam) and not p.choices:
            raise PluginError(f"{where}: technique {name!r} param {p.name!r} has no choices")
        try:
            p.check(p.default)
        except ValueError as exc:
            raise PluginError(f"{where}: technique {name!r} param {p.name!r} default is invalid: {exc}") from None
    if not isinstance(obj.incompatible_with, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in obj.incompatible_with.items()
    ):
        raise PluginError(f"{where}: technique {name!r}.incompatible_with must map technique names to reasons (str -> str)")
    return obj


def _selected(ep_name: str, dist: str | None, selection: str) -> bool:
    if selection in ("", "all"):
        return True
    if selection == "none":
        return False
    if selection == "builtin":
        return dist == BUILTIN_DISTRIBUTION
    wanted = {s.strip() for s in selection.split(",") if s.strip()}
    return ep_name in wanted or (dist == BUILTIN_DISTRIBUTION and "builtin" in wanted)


def _load_module(spec: str) -> Any:
    """Import a dotted module name or a ``.py`` file path."""
    path = Path(spec)
    if spec.endswith(".py") or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"no such plugin file: {spec}")
        mod_name = f"autocompress_local_plugin_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        assert module_spec and module_spec.loader
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[mod_name] = module
        module_spec.loader.exec_module(module)
        return module
    return importlib.import_module(spec)


def _short_reason(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


def load_registry(*, extra_plugins: Sequence[str] = (), selection: str | None = None) -> Registry:
    """Build a plugin manager, load plugins and collect their techniques."""
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    registry = Registry(plugin_manager=pm)
    selection = (os.environ.get(PLUGINS_ENV, "all") if selection is None else selection).strip()
    sources: dict[str, str] = {}

    seen_eps: set[str] = set()
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist is not None else None
        key = f"{dist}:{ep.name}"
        if key in seen_eps or not _selected(ep.name, dist, selection):
            continue
        seen_eps.add(key)
        try:
            module = ep.load()
            pm.register(module, name=ep.name)
        except Exception as exc:  # a broken plugin must not take the tool down
            registry.load_errors.append((ep.name, _short_reason(exc)))
            continue
        sources[ep.name] = "builtin" if dist == BUILTIN_DISTRIBUTION else f"entry-point ({dist})"

    for spec in extra_plugins:
        try:
            module = _load_module(spec)
            if pm.is_registered(module):
                continue  # already loaded through its entry point (an installed plugin named again)
            pm.register(module, name=spec)
        except Exception as exc:
            registry.load_errors.append((spec, _short_reason(exc)))
            continue
        sources[spec] = "--plugin"

    for impl in pm.hook.register_techniques.get_hookimpls():
        plugin = impl.plugin_name
        collected: list[Technique] = []
        try:
            impl.function(register=lambda obj, _p=plugin, _c=collected: _c.append(_validate_technique(obj, _p)))
        except PluginError as exc:
            registry.load_errors.append((plugin, str(exc)))
            continue
        except Exception as exc:
            registry.load_errors.append((plugin, f"register_techniques raised {_short_reason(exc)}"))
            continue
        for tech in collected:
            if tech.name in registry.techniques:
                other = registry.techniques[tech.name].plugin
                registry.load_errors.append(
                    (plugin, f"technique {tech.name!r} is already registered by plugin {other!r}; rename it")
                )
                continue
            registry.techniques[tech.name] = RegisteredTechnique(tech, plugin, sources.get(plugin, "?"))
    return registry


def describe(registry: Registry) -> list[dict[str, Any]]:
    """JSON-able description of every technique (for ``autocompress plugins``)."""
    rows = []
    for name in registry.names():
        reg = registry.techniques[name]
        t = reg.technique
        rows.append(
            {
                "name": name,
                "plugin": reg.plugin,
                "source": reg.source,
                "stage": t.stage.name.lower(),
                "description": t.description,
                "requires": sorted(r.value for r in t.requires),
                "incompatible_with": dict(t.incompatible_with),
                "reduces": sorted(t.reduces),
                "onnx": onnx_summary(t, plugin=reg.plugin),
                "params": [
                    {
                        "name": p.name,
                        "type": p.kind,
                        "domain": p.domain(),
                        "default": p.default,
                        "searched": p.searched,
                        "help": p.help,
                    }
                    for p in t.params
                ],
            }
        )
    return rows


def onnx_summary(tech: Any, *, plugin: str = "?") -> dict[str, Any]:
    """Whether ``autocompress export --onnx`` handles this technique: ``onnx_support`` asked at the defaults and
    at every other choice of each categorical parameter (the knobs that switch code paths, e.g. a dtype), so
    the listing shows the exceptions (``{"defaults": None | reason, "refused": {"dtype=bf16": reason}}``). A
    plugin whose ``onnx_support`` raises is reported as such rather than hiding the technique."""
    def ask(params: dict[str, Any]) -> str | None:
        try:
            return tech.onnx_support(params)
        except Exception as exc:  # noqa: BLE001 - a third-party hook; report, do not crash the listing
            return f"onnx_support raised {type(exc).__name__}: {exc} (plugin {plugin})"

    defaults = tech.defaults()
    refused: dict[str, str] = {}
    for p in tech.params:
        for choice in getattr(p, "choices", ()):
            if choice != p.default:
                why = ask({**defaults, p.name: choice})
                if why is not None:
                    refused[f"{p.name}={choice}"] = why
    return {"defaults": ask(defaults), "refused": refused}
