"""Pareto fronts, hypervolume and knee points over trial objective values.

Everything here is a small pure function over numpy arrays (in the spirit of Optuna's
``optuna/study/_multi_objective.py``) plus a thin layer over the engine's plain-dict trial rows.
Internally every comparison happens in *minimization space*: maximize columns are negated once by
``to_minimization`` so dominance, hypervolume and knee code never branch on direction.

A trial row is a JSON-able dict (``number``, ``state``, ``pipeline``, ``params``, ``metrics``,
``feasible``, ...); an objective is a ``(metric_name, "maximize" | "minimize")`` pair.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

import numpy as np

DIRECTIONS = ("maximize", "minimize")
# Quality metrics whose baseline difference is reported in points ((value - base) * 100).
QUALITY_METRICS = ("accuracy", "f1", "mcc")
_DELTA_NAMES = {"accuracy": "acc", "f1": "f1", "mcc": "mcc"}
LATENCY_RE = re.compile(r"^latency_bs(\d+)$")


# ---------------------------------------------------------------------------------------------- arrays


def _check(values: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    if arr.ndim == 1:  # a single objective given as a flat vector
        arr = arr.reshape(-1, 1)
    if arr.ndim != 2:
        raise ValueError(f"objective values must be a 2-D array (trials x objectives), got shape {arr.shape}")
    if arr.shape[1] != len(directions):
        raise ValueError(f"{arr.shape[1]} objective columns but {len(directions)} directions ({list(directions)})")
    bad = [d for d in directions if d not in DIRECTIONS]
    if bad:
        raise ValueError(f"directions must be 'maximize' or 'minimize', got {bad}")
    return arr


def to_minimization(values: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """Copy of ``values`` (n, k) with maximize columns negated, so smaller is better everywhere."""
    arr = _check(values, directions).copy()
    sign = np.array([-1.0 if d == "maximize" else 1.0 for d in directions])
    return arr * sign


def dominates(a: np.ndarray, b: np.ndarray) -> bool:
    """True when minimization vector ``a`` is no worse than ``b`` everywhere and better somewhere.

    NaN compares false, so a vector with NaN neither dominates nor (through this test alone) is
    dominated; ``pareto_mask`` removes NaN rows explicitly.
    """
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    return bool(np.all(a <= b) and np.any(a < b))


def pareto_mask(values: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """Boolean mask of the non-dominated rows of ``values`` (n, k).

    Exact duplicates of a non-dominated point are all kept (neither dominates the other), which
    matters when two trials produce identical measurements. Rows with any non-finite value are never
    on the front and never dominate anything: a missing measurement must not win or hide a trial.
    """
    v = to_minimization(values, directions)
    n = v.shape[0]
    valid = np.all(np.isfinite(v), axis=1)
    mask = valid.copy()
    if n == 0:
        return mask
    vv = v[valid]
    # O(n^2 k) with broadcasting: studies have tens to hundreds of trials, so this stays tiny.
    le = np.all(vv[:, None, :] <= vv[None, :, :], axis=2)  # le[j, i]: j no worse than i everywhere
    lt = np.any(vv[:, None, :] < vv[None, :, :], axis=2)  # lt[j, i]: j strictly better somewhere
    dominated = np.any(le & lt, axis=0)
    mask[np.flatnonzero(valid)] = ~dominated
    return mask


def pareto_front_indices(values: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """Row indices of the non-dominated rows, in their original order."""
    return np.flatnonzero(pareto_mask(values, directions))


def hypervolume(front_min: np.ndarray, reference: np.ndarray) -> float:
    """Exact hypervolume dominated by ``front_min`` (n, k) and bounded by ``reference`` (k,).

    Both are in minimization space. Points that do not strictly dominate the reference in every
    coordinate (and rows with NaN) add no volume and are ignored. Uses hypervolume-by-slicing:
    sort on the last objective, and each slab between consecutive values contributes its thickness
    times the (k-1)-dimensional hypervolume of the points at or below it. That is O(n^(k-1) log n),
    which is fine for the small fronts of a compression study (k = 2 or 3 in practice).
    """
    pts = np.asarray(front_min, dtype=float)
    ref = np.asarray(reference, dtype=float).reshape(-1)
    if pts.size == 0:
        return 0.0
    if pts.ndim == 1:
        pts = pts.reshape(1, -1)
    if pts.shape[1] != ref.shape[0]:
        raise ValueError(f"front has {pts.shape[1]} objectives but the reference point has {ref.shape[0]}")
    if not np.all(np.isfinite(ref)):
        raise ValueError(f"reference point must be finite, got {ref.tolist()}")
    with np.errstate(invalid="ignore"):
        pts = pts[np.all(pts < ref, axis=1)]  # NaN rows fail the comparison and drop out here
    return float(_hv(pts, ref))


def _hv(pts: np.ndarray, ref: np.ndarray) -> float:
    if len(pts) == 0:
        return 0.0
    k = pts.shape[1]
    if k == 1:
        return float(ref[0] - pts[:, 0].min())
    if k == 2:
        # Sweep by the first objective; each step adds the strip between this x and the next one,
        # as high as the best (smallest) second objective seen so far.
        order = np.argsort(pts[:, 0], kind="stable")
        xs, ys = pts[order, 0], pts[order, 1]
        nxt = np.append(xs[1:], ref[0])
        best_y = np.minimum.accumulate(ys)
        return float(np.sum((nxt - xs) * (ref[1] - best_y)))
    order = np.argsort(pts[:, -1], kind="stable")
    pts = pts[order]
    zs = np.append(pts[:, -1], ref[-1])
    total = 0.0
    for i in range(len(pts)):
        depth = zs[i + 1] - zs[i]
        if depth > 0:  # equal z values: the later slab covers the same volume, skip the empty one
            total += depth * _hv(pts[: i + 1, :-1], ref[:-1])
    return total


def knee_index(front_min: np.ndarray) -> int:
    """Index of the knee of a front given in minimization space (n, k).

    Each objective is first normalised to [0, 1] over the front (a constant column becomes 0), so
    milliseconds and megabytes weigh the same. For two objectives the knee is the point farthest from
    the straight line through the two extreme points (best in objective 1, best in objective 2), on the
    side of the ideal point, i.e. the point where giving up a little of one objective stops buying much
    of the other. If no point bulges toward the ideal point (one or two points, or a straight or concave
    front) and for three or more objectives, the knee is the point closest (Euclidean) to the ideal
    point (0, ..., 0) in the normalised space. Ties go to the lower index.
    """
    pts = np.asarray(front_min, dtype=float)
    if pts.ndim == 1:
        pts = pts.reshape(1, -1)
    if pts.shape[0] == 0:
        raise ValueError("knee_index needs at least one point; the front is empty")
    if not np.all(np.isfinite(pts)):
        raise ValueError("knee_index needs finite values; drop rows with NaN or inf first")
    if pts.shape[0] == 1:
        return 0
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    norm = (pts - lo) / span
    if norm.shape[1] == 2:
        a = norm[int(np.argmin(norm[:, 0]))]
        b = norm[int(np.argmin(norm[:, 1]))]
        d = b - a
        length = float(np.hypot(d[0], d[1]))
        if length > 0:
            # Signed distance to the line a-b, positive on the side of the ideal point (origin).
            cross = d[0] * (norm[:, 1] - a[1]) - d[1] * (norm[:, 0] - a[0])
            origin_side = d[0] * (0 - a[1]) - d[1] * (0 - a[0])
            signed = cross / length * (1.0 if origin_side >= 0 else -1.0)
            best = int(np.argmax(signed))
            if signed[best] > 1e-12:
                return best
    return int(np.argmin(np.linalg.norm(norm, axis=1)))


PICKS = ("knee", "best")


def pick_index(
    values: np.ndarray,
    directions: Sequence[str],
    how: str,
    *,
    column: int = 0,
    allowed: np.ndarray | Sequence[bool] | None = None,
) -> int | None:
    """Row of ``values`` (n, k; raw directions) chosen by ``how`` among the ``allowed`` rows, or ``None``
    when no row is allowed.

    * ``"knee"``: :func:`knee_index` over the allowed rows only, normalised over them, so a constraint
      that removes the extremes moves the knee to the best balance among what is left (the same rule the
      report uses for the whole front);
    * ``"best"``: the best value in ``column`` (its direction decides), ties broken by the remaining
      columns in order, then by the lower index, so the pick is deterministic.

    Rows with a non-finite value are never picked. Indices refer to ``values``, not to the allowed subset.
    """
    vmin = to_minimization(values, directions)
    if how not in PICKS:
        raise ValueError(f"how must be one of {PICKS}, got {how!r}")
    if not 0 <= column < vmin.shape[1]:
        raise ValueError(f"column {column} is out of range for {vmin.shape[1]} objective column(s)")
    ok = np.all(np.isfinite(vmin), axis=1)
    if allowed is not None:
        allowed = np.asarray(allowed, dtype=bool)
        if allowed.shape != ok.shape:
            raise ValueError(f"allowed has shape {allowed.shape}, values has {vmin.shape[0]} rows")
        ok &= allowed
    rows = np.flatnonzero(ok)
    if rows.size == 0:
        return None
    if how == "knee":
        return int(rows[knee_index(vmin[rows])])
    order = [column] + [j for j in range(vmin.shape[1]) if j != column]
    return int(min(rows, key=lambda i: (*vmin[i, order].tolist(), int(i))))


# ------------------------------------------------------------------------------------------- trial rows


def _finite(x: Any) -> bool:
    # bool is an int subclass; a True "latency" is a data bug, not a measurement.
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(float(x))


def normalize_objectives(objectives: Sequence[Any]) -> list[tuple[str, str]]:
    """``(name, direction)`` pairs from pairs or from ``{"name", "direction"}`` dicts (as results JSON stores them)."""
    out = []
    for obj in objectives:
        name, direction = (obj.get("name"), obj.get("direction")) if isinstance(obj, Mapping) else tuple(obj)
        if direction not in DIRECTIONS:
            raise ValueError(f"objective {name!r}: direction must be 'maximize' or 'minimize', got {direction!r}")
        out.append((str(name), str(direction)))
    return out


def is_complete(row: Mapping[str, Any], objectives: Sequence[tuple[str, str]]) -> bool:
    """A COMPLETE trial with a finite value for every objective metric."""
    metrics = row.get("metrics") or {}
    return row.get("state") == "COMPLETE" and all(_finite(metrics.get(name)) for name, _ in objectives)


def objective_matrix(rows: Sequence[Mapping[str, Any]], objectives: Sequence[tuple[str, str]]) -> np.ndarray:
    """(n, k) array of objective values (raw directions); missing or non-numeric values become NaN."""
    out = np.full((len(rows), len(objectives)), np.nan)
    for i, row in enumerate(rows):
        metrics = row.get("metrics") or {}
        for j, (name, _) in enumerate(objectives):
            if _finite(metrics.get(name)):
                out[i, j] = float(metrics[name])
    return out


def front_rows(
    rows: Sequence[Mapping[str, Any]],
    objectives: Sequence[tuple[str, str]],
    *,
    feasible_only: bool = True,
) -> list[dict[str, Any]]:
    """The non-dominated trials, best first by the first objective (ties: later objectives, then number).

    Only COMPLETE trials with every objective measured compete (``superseded`` ones dominate but are not shown); with ``feasible_only`` the trials that
    break a spec constraint are dropped *before* dominance, so an infeasible trial cannot push a
    feasible one off the front.
    """
    objectives = normalize_objectives(objectives)
    if not objectives:
        raise ValueError("front_rows needs at least one objective")
    directions = [d for _, d in objectives]
    pool = [r for r in rows if is_complete(r, objectives) and (not feasible_only or r.get("feasible", True) is not False)]
    if not pool:
        return []
    values = objective_matrix(pool, objectives)
    mask = pareto_mask(values, directions)
    vmin = to_minimization(values, directions)
    # A screened trial superseded by its full-budget retraining (search.fidelity) leaves the front, but it still
    # dominates: it was measured, and a trial it dominated must stay off (its model may be deleted already,
    # search.keep_models: front), even when the retrained copy's latency is measured a little slower.
    keep = [i for i in range(len(pool)) if mask[i] and not pool[i].get("superseded")]
    keep.sort(key=lambda i: (*vmin[i].tolist(), pool[i].get("number", 0)))
    return [dict(pool[i]) for i in keep]


def front_knee(front: Sequence[Mapping[str, Any]], objectives: Sequence[tuple[str, str]]) -> dict[str, Any] | None:
    """The knee trial of a front (as returned by ``front_rows``), or None for an empty front."""
    if not front:
        return None
    objectives = normalize_objectives(objectives)
    vmin = to_minimization(objective_matrix(front, objectives), [d for _, d in objectives])
    return dict(front[knee_index(vmin)])


def baseline_metrics(baseline: Mapping[str, Any] | None) -> dict[str, Any]:
    """Baseline metrics from either a flat metrics dict or a row-shaped ``{"metrics": {...}}`` dict."""
    if not baseline:
        return {}
    inner = baseline.get("metrics")
    flat = inner if isinstance(inner, Mapping) else baseline
    return {k: v for k, v in flat.items() if k != "device"}  # where it ran is context, not a metric


def latency_names(*metric_dicts: Mapping[str, Any]) -> list[str]:
    """``latency_bsN`` keys in first-seen order across the dicts (the spec's batch-size order)."""
    seen: dict[str, None] = {}
    for m in metric_dicts:
        for key in m or {}:
            if LATENCY_RE.match(str(key)):
                seen.setdefault(str(key), None)
    return list(seen)


def _ratio(base: Any, value: Any) -> float | None:
    if not (_finite(base) and _finite(value)) or float(value) <= 0:
        return None
    return float(base) / float(value)


def relative_to_baseline(metrics: Mapping[str, Any], baseline: Mapping[str, Any]) -> dict[str, float | None]:
    """Trial metrics relative to the baseline (None where either side is missing).

    * ``acc_delta`` / ``eval_acc_delta`` (and ``f1_delta``, ``eval_f1_delta``, ``mcc_delta``, ...
      when present): ``(value - baseline) * 100``, in points;
    * ``speedup_bsN``: baseline latency / latency (x, > 1 is faster) for every ``latency_bsN``;
    * ``size_reduction``, ``params_reduction``, ``flops_reduction``: baseline / value (x, > 1 is smaller).
    """
    base = baseline_metrics(baseline)
    metrics = metrics or {}
    out: dict[str, float | None] = {}
    for name in QUALITY_METRICS:
        for prefix in ("", "eval_"):
            key = prefix + name
            if key not in metrics and key not in base:
                continue
            v, b = metrics.get(key), base.get(key)
            out[f"{prefix}{_DELTA_NAMES[name]}_delta"] = (float(v) - float(b)) * 100 if _finite(v) and _finite(b) else None
    for lat in latency_names(base, metrics):
        out["speedup_" + lat.removeprefix("latency_")] = _ratio(base.get(lat), metrics.get(lat))
    for name, key in (("size_mb", "size_reduction"), ("params", "params_reduction"), ("flops", "flops_reduction")):
        if name in metrics or name in base:
            out[key] = _ratio(base.get(name), metrics.get(name))
    return out
