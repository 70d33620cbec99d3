"""Resolve a spec's ``techniques`` section against the registry into a search space, and sample it.

Per technique the spec says ``enabled: true | false | search`` and, per parameter, one of:

* a scalar — fixed value;
* ``[low, high]`` or ``{low, high, log, step}`` — a range, for numeric parameters;
* a list or ``{choices: [...]}`` — a subset of the choices, for categorical parameters.

Unset parameters are searched over the technique's declared range (or choices) when the technique marks
them ``searched``, and fixed at their default otherwise (e.g. the number of batches used for scoring). Everything is checked against the
technique's declared domain, so a spec cannot ask for what a technique does not support.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence, Union

from .errors import SpecError, close_matches
from .registry import Registry
from .spec import Spec
from .technique import CategoricalParam, FloatParam, IntParam, Param, Technique


@dataclass(frozen=True)
class Fixed:
    value: Any


@dataclass(frozen=True)
class FloatRange:
    low: float
    high: float
    log: bool = False


@dataclass(frozen=True)
class IntRange:
    low: int
    high: int
    step: int = 1


@dataclass(frozen=True)
class Choices:
    choices: tuple[Any, ...]


Domain = Union[Fixed, FloatRange, IntRange, Choices]


@dataclass
class TechniqueSpace:
    technique: Technique
    enabled: Union[bool, str]  # True, False or "search"
    domains: dict[str, Domain] = field(default_factory=dict)


@dataclass
class SearchSpace:
    techniques: list[TechniqueSpace]  # in pipeline order

    def active(self) -> list[TechniqueSpace]:
        return [t for t in self.techniques if t.enabled is not False]


def _resolve_param(p: Param, raw: Any, where: str) -> Domain:
    def check(v: Any, label: str = "") -> Any:
        try:
            return p.check(v)
        except ValueError as exc:
            raise SpecError(f"{where}{label}: {exc}. Allowed: {p.domain()}.") from None

    if raw is None:
        if not p.searched:
            return Fixed(p.default)
        if isinstance(p, FloatParam):
            return FloatRange(p.low, p.high, p.log)
        if isinstance(p, IntParam):
            return IntRange(p.low, p.high, p.step)
        return Choices(tuple(p.choices))
    if isinstance(p, CategoricalParam):
        choices = raw.get("choices") if isinstance(raw, dict) else raw
        if isinstance(raw, dict) and set(raw) - {"choices"}:
            raise SpecError(f"{where}: a categorical parameter takes a value, a list of choices or {{choices: [...]}}; got keys {sorted(raw)}")
        if isinstance(choices, list):
            if not choices:
                raise SpecError(f"{where}: empty list of choices; give at least one of {p.domain()}")
            return Choices(tuple(dict.fromkeys(check(c) for c in choices)))
        return Fixed(check(choices))
    # numeric
    if isinstance(raw, (list, tuple)):
        if len(raw) != 2:
            raise SpecError(f"{where}: a range is [low, high] (two numbers), got {raw!r}")
        raw = {"low": raw[0], "high": raw[1]}
    if isinstance(raw, dict):
        extra = set(raw) - {"low", "high", "log", "step"}
        if extra or not {"low", "high"} <= set(raw):
            raise SpecError(f"{where}: a range takes keys low, high (and log or step), got {sorted(raw)}")
        low, high = check(raw["low"], ".low"), check(raw["high"], ".high")
        if low > high:
            raise SpecError(f"{where}: inverted range, low {low} > high {high}; swap them")
        if low == high:
            return Fixed(low)
        if isinstance(p, FloatParam):
            log = bool(raw.get("log", p.log))
            if log and low <= 0:
                raise SpecError(f"{where}: a log range needs low > 0, got {low}")
            return FloatRange(low, high, log)
        step = raw.get("step", p.step)
        if not isinstance(step, int) or step < 1:
            raise SpecError(f"{where}.step: must be a positive integer, got {step!r}")
        return IntRange(low, high, step)
    return Fixed(check(raw))


def resolve_space(spec: Spec, registry: Registry) -> SearchSpace:
    """Check the techniques section against the registry; raise :class:`SpecError` on any problem."""
    spaces: dict[str, TechniqueSpace] = {}
    for name, tspec in spec.techniques.items():
        where = f"techniques.{name}"
        if name not in registry.techniques:
            registry.get(name)  # raises with the known names and a close match
        tech = registry.get(name)
        known = {p.name: p for p in tech.params}
        domains: dict[str, Domain] = {}
        for pname, raw in tspec.params.items():
            if pname not in known:
                listed = ", ".join(known) or "(no parameters)"
                raise SpecError(
                    f"{where}.params: {name!r} has no parameter {pname!r}.{close_matches(pname, list(known))} "
                    f"Its parameters: {listed}."
                )
            domains[pname] = _resolve_param(known[pname], raw, f"{where}.params.{pname}")
        for p in tech.params:
            domains.setdefault(p.name, _resolve_param(p, None, f"{where}.params.{p.name}"))
        fixed = {k: d.value for k, d in domains.items() if isinstance(d, Fixed)}
        if len(fixed) == len(domains):
            try:
                tech.validate({**tech.defaults(), **fixed})
            except ValueError as exc:
                raise SpecError(f"{where}.params: {exc}") from None
        spaces[name] = TechniqueSpace(tech, tspec.enabled, domains)

    # Incompatibilities are declared by either side; both forced on cannot be searched.
    forced = [n for n, s in spaces.items() if s.enabled is True]
    for a in forced:
        for b in forced:
            reason = incompatibility(spaces[a].technique, spaces[b].technique)
            if a < b and reason:
                raise SpecError(
                    f"techniques.{a} and techniques.{b} are both enabled: true, but they are incompatible: "
                    f"{reason}. Set one of them to enabled: search or false."
                )
    if not any(s.enabled is not False for s in spaces.values()):
        raise SpecError("techniques: every technique is enabled: false; enable at least one (true or search)")
    ordered = registry.ordered(spaces)
    return SearchSpace([spaces[t.name] for t in ordered])


def enqueued_params(space: SearchSpace, pipeline: Mapping[str, Mapping[str, Any]], *, where: str) -> dict[str, Any]:
    """The Optuna parameters that make :func:`sample` return exactly ``pipeline`` (``{technique: params}``;
    techniques left out are off; a parameter left out takes the value the spec fixes, else the technique's
    default)."""
    spaces = {ts.technique.name: ts for ts in space.techniques}
    for name in pipeline:
        if name not in spaces:
            raise SpecError(f"{where}: {name!r} is not in the spec's techniques section; add it there "
                            f"(known here: {', '.join(spaces)})")
        if spaces[name].enabled is False:
            raise SpecError(f"{where}: techniques.{name} is enabled: false; set it to search to enqueue it")
    for ts in space.active():
        if ts.enabled is True and ts.technique.name not in pipeline:
            raise SpecError(f"{where}: techniques.{ts.technique.name} is enabled: true, so every pipeline must "
                            f"include it; add it or set it to enabled: search")
    clash = first_incompatible([spaces[n].technique for n in pipeline])
    if clash:
        raise SpecError(f"{where}: {clash[0]} and {clash[1]} are incompatible: {clash[2]}")
    fixed: dict[str, Any] = {}
    for ts in space.active():
        tech = ts.technique
        on = tech.name in pipeline
        if ts.enabled == "search":
            fixed[f"{tech.name}.enabled"] = on
        if not on:
            continue
        given = dict(pipeline[tech.name] or {})
        known = {p.name: p for p in tech.params}
        for pname in given:
            if pname not in known:
                raise SpecError(f"{where}.{tech.name}: no parameter {pname!r}.{close_matches(pname, list(known))} "
                                f"Its parameters: {', '.join(known) or '(none)'}.")
        spec_fixed = {k: d.value for k, d in ts.domains.items() if isinstance(d, Fixed)}
        values = {**tech.defaults(), **spec_fixed, **given}
        for pname, dom in ts.domains.items():
            try:
                value = known[pname].check(values[pname])
            except ValueError as exc:
                raise SpecError(f"{where}.{tech.name}.{pname}: {exc}") from None
            if isinstance(dom, Fixed):
                if value != dom.value:
                    raise SpecError(f"{where}.{tech.name}.{pname}: {value!r}, but the spec fixes it at "
                                    f"{dom.value!r}; widen techniques.{tech.name}.params.{pname}")
                continue
            inside = (value in dom.choices if isinstance(dom, Choices) else dom.low <= value <= dom.high)
            if not inside:
                raise SpecError(f"{where}.{tech.name}.{pname}: {value!r} is outside the spec's search domain "
                                f"{dom}; widen techniques.{tech.name}.params.{pname}")
            fixed[f"{tech.name}.{pname}"] = value
        try:
            tech.validate(values)
        except ValueError as exc:
            raise SpecError(f"{where}.{tech.name}: {exc}") from None
    return fixed


def incompatibility(a: Technique, b: Technique) -> str | None:
    if a.name == b.name:
        return None
    return a.incompatible_with.get(b.name) or b.incompatible_with.get(a.name)


def first_incompatible(techniques: Sequence[Technique]) -> tuple[str, str, str] | None:
    """``(a, b, reason)`` for the first incompatible pair among ``techniques``, or None if all compose."""
    for i, a in enumerate(techniques):
        for b in techniques[i + 1:]:
            reason = incompatibility(a, b)
            if reason:
                return a.name, b.name, reason
    return None


def sample(space: SearchSpace, suggest: "Suggester") -> dict[str, dict[str, Any]]:
    """Sample a pipeline: ``{technique: params}`` for the enabled techniques, in pipeline order.

    Conditional: a technique's parameters are only suggested when it is on, and a technique that is
    incompatible with one already on is not offered (its flag is not suggested at all), so every sampled
    pipeline is valid and the sampler never sees an impossible combination.
    """
    chosen: dict[str, dict[str, Any]] = {}
    forced = [ts.technique for ts in space.active() if ts.enabled is True]
    for ts in space.active():
        tech = ts.technique
        others = forced + [t.technique for t in space.techniques if t.technique.name in chosen]
        if ts.enabled is not True and any(incompatibility(tech, other) for other in others):
            continue
        on = True if ts.enabled is True else suggest.categorical(f"{tech.name}.enabled", (True, False))
        if not on:
            continue
        params: dict[str, Any] = {}
        for pname, dom in ts.domains.items():
            key = f"{tech.name}.{pname}"
            if isinstance(dom, Fixed):
                params[pname] = dom.value
            elif isinstance(dom, FloatRange):
                params[pname] = suggest.float(key, dom.low, dom.high, log=dom.log)
            elif isinstance(dom, IntRange):
                params[pname] = suggest.int(key, dom.low, dom.high, step=dom.step)
            else:
                params[pname] = dom.choices[0] if len(dom.choices) == 1 else suggest.categorical(key, dom.choices)
        chosen[tech.name] = params
    return chosen


class Suggester:
    """Adapter over an Optuna trial (or anything with ``suggest_*``)."""

    def __init__(self, trial: Any) -> None:
        self.trial = trial

    def float(self, name: str, low: float, high: float, *, log: bool = False) -> float:
        return self.trial.suggest_float(name, low, high, log=log)

    def int(self, name: str, low: int, high: int, *, step: int = 1) -> int:
        return self.trial.suggest_int(name, low, high, step=step)

    def categorical(self, name: str, choices: tuple[Any, ...]) -> Any:
        return self.trial.suggest_categorical(name, list(choices))


def describe_space(space: SearchSpace) -> dict[str, Mapping[str, Any]]:
    out: dict[str, Mapping[str, Any]] = {}
    for ts in space.techniques:
        out[ts.technique.name] = {"enabled": ts.enabled, "params": {k: repr(v) for k, v in ts.domains.items()}}
    return out
