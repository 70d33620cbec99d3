"""Multi-fidelity search: screen every candidate cheaply, then retrain the promising ones at full budget.

Recovery fine-tuning is most of a trial's cost (about 80% on a 2-core CPU), and Optuna offers no pruning for
multi-objective studies. With ``search.fidelity`` the engine runs ``search.trials`` *screening* trials, each
with ``fidelity.screen_steps`` recovery steps, then enqueues ``fidelity.promote`` of them again with the full
``recovery.steps``. Latency and size do not depend on how long a model was fine-tuned, so the screen already
measures two of the three objectives exactly; accuracy after a short recovery is a pessimistic but ranked
estimate. Candidates are promoted greedily by hypervolume contribution, against a reference point at the
baseline (its latency and size; its accuracy less 10 points, as a screen's accuracy is pessimistic): each pick
adds the most volume to the picks before it. That favours compressed models whose screened accuracy is
promising, spread along the front; a model no faster and no smaller than the baseline adds no volume, so it is
not retrained first (crowding distance alone would pick it, as the front's most accurate end). Candidates that
add no volume follow in NSGA-II's survivor order: lowest non-domination rank, then largest crowding distance.

A promoted trial is an ordinary trial with ``fidelity: full`` and ``promoted_from: N``; its screened original
is marked superseded and leaves the front. Promotion is idempotent (resume re-enqueues nothing twice). A
screened pipeline that trained nothing (post-training techniques only) is already final and is not promoted.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .pareto import hypervolume, to_minimization

#: How far below the baseline a screened accuracy (or any maximised objective, relative) may be and still count.
SCREEN_MARGIN = 0.10

SCREEN, FULL = "screen", "full"


def nondominated_ranks(values_min: np.ndarray) -> np.ndarray:
    """Rank 0 for the non-dominated rows of ``values_min`` (n, k; smaller is better), 1 for those non-dominated
    once rank 0 is removed, and so on (NSGA-II's fast non-dominated sort, quadratic: studies are small)."""
    v = np.asarray(values_min, dtype=float)
    n = v.shape[0]
    ranks = np.full(n, -1, dtype=int)
    if n == 0:
        return ranks
    le = np.all(v[:, None, :] <= v[None, :, :], axis=2)
    lt = np.any(v[:, None, :] < v[None, :, :], axis=2)
    dom = le & lt  # dom[j, i]: j dominates i
    left = np.ones(n, dtype=bool)
    rank = 0
    while left.any():
        current = left & ~np.any(dom[left], axis=0)  # not dominated by any row still left
        ranks[current] = rank
        left &= ~current
        rank += 1
    return ranks


def crowding_distance(values_min: np.ndarray) -> np.ndarray:
    """NSGA-II crowding distance of each row within one front: boundary points are infinite."""
    v = np.asarray(values_min, dtype=float)
    n, k = v.shape
    out = np.zeros(n)
    if n <= 2:
        return np.full(n, np.inf)
    for j in range(k):
        order = np.argsort(v[:, j], kind="stable")
        span = v[order[-1], j] - v[order[0], j]
        out[order[0]] = out[order[-1]] = np.inf
        if span <= 0:
            continue
        out[order[1:-1]] += (v[order[2:], j] - v[order[:-2], j]) / span
    return out


def select_promising(values: np.ndarray, directions: Sequence[str], k: int,
                     reference: Sequence[float] | None = None) -> list[int]:
    """Indices of the ``k`` rows to promote. With ``reference`` (raw directions), greedily the row adding the most
    hypervolume to those already picked; then (and without it) NSGA-II's survivor order: by non-domination rank,
    ties by crowding distance (larger first), then by row order. Rows with a non-finite value come last."""
    values = np.asarray(values, dtype=float)
    order = _survivor_order(values, directions)
    if reference is None:
        return order[:k]
    vmin = to_minimization(values, directions)
    ref = to_minimization(np.asarray(reference, dtype=float).reshape(1, -1), directions)[0]
    picked: list[int] = []
    volume = 0.0
    while len(picked) < k:
        best, gain = None, 0.0
        for i in order:  # survivor order breaks ties
            if i in picked or not np.all(np.isfinite(vmin[i])):
                continue
            g = hypervolume(vmin[picked + [i]], ref) - volume
            if g > gain * (1 + 1e-12) and g > 0:
                best, gain = i, g
        if best is None:
            break
        picked.append(best)
        volume += gain
    return (picked + [i for i in order if i not in picked])[:k]


def screening_reference(baseline: Mapping[str, Any], objectives: Sequence[tuple[str, str]]) -> list[float] | None:
    """The baseline's value of each objective, maximised ones less :data:`SCREEN_MARGIN` (points for accuracy,
    F1 and MCC, which are fractions; relative otherwise); None when the baseline lacks one."""
    ref = []
    for name, direction in objectives:
        b = baseline.get(name)
        if not isinstance(b, (int, float)) or not np.isfinite(b):
            return None
        if direction == "maximize":
            b = b - (SCREEN_MARGIN if abs(b) <= 1 else SCREEN_MARGIN * abs(b))
        ref.append(float(b))
    return ref


def _survivor_order(values: np.ndarray, directions: Sequence[str]) -> list[int]:
    n = values.shape[0]
    if n == 0:
        return []
    finite = np.all(np.isfinite(values), axis=1)
    idx = np.flatnonzero(finite)
    chosen: list[int] = []
    if idx.size:
        vmin = to_minimization(values[idx], directions)
        ranks = nondominated_ranks(vmin)
        for r in range(int(ranks.max()) + 1):
            members = np.flatnonzero(ranks == r)
            crowd = crowding_distance(vmin[members])
            order = sorted(range(members.size), key=lambda m: (-crowd[m], int(idx[members[m]])))
            chosen.extend(int(idx[members[m]]) for m in order)
    chosen.extend(int(i) for i in np.flatnonzero(~finite))
    return chosen


def fidelity_of(trial: Any) -> str:
    return trial.user_attrs.get("fidelity", SCREEN)


def promote(study: Any, spec: Any, *, log: Callable[[str], None]) -> int:
    """Once ``search.trials`` screening trials have finished, enqueue the ``fidelity.promote`` most promising
    (COMPLETE) ones at full budget, unless already enqueued. Returns how many were enqueued now."""
    from optuna.trial import TrialState

    from .parallel import is_finished

    f = spec.search.fidelity
    if f is None:
        return 0
    trials = study.get_trials(deepcopy=False)
    screened = [t for t in trials if fidelity_of(t) == SCREEN and is_finished(t)]
    if len(screened) < spec.search.trials:
        return 0
    # Every full-fidelity trial counts, interrupted or not: _requeue puts an interrupted one back in the queue.
    already = {t.user_attrs.get("promoted_from") for t in trials if fidelity_of(t) == FULL}
    if len(already) >= f.promote:
        return 0
    # Constraints do not veto promotion: a screened accuracy is pessimistic, so an accuracy-drop violation may
    # vanish at full budget (latency and size are measured exactly, and are objectives anyway).
    pool = [t for t in screened if t.state == TrialState.COMPLETE and t.number not in already and not trained_nothing(t)]
    values = np.array([t.values for t in pool], dtype=float).reshape(len(pool), len(spec.objective_list()))
    directions = [d for _, d in spec.objective_list()]
    reference = screening_reference(study.user_attrs.get("baseline") or {}, spec.objective_list())
    picks = [pool[i] for i in select_promising(values, directions, f.promote - len(already), reference=reference)]
    for t in picks:
        attrs = {"fidelity": FULL, "promoted_from": t.number}
        if "enqueued" in t.user_attrs:
            attrs["promoted_enqueued"] = t.user_attrs["enqueued"]
        study.enqueue_trial(dict(t.params), user_attrs=attrs, skip_if_exists=False)
    if picks:
        log(f"Screening done ({len(screened)} trials at {f.screen_steps} recovery steps); retraining "
            f"{', '.join(f'trial {t.number}' for t in picks)} at {spec.recovery.steps} steps")
    return len(picks)


def trained_nothing(trial: Any) -> bool:
    """A screened pipeline that ran no recovery step (e.g. post-training int8 alone) is already at full
    fidelity: retraining it would reproduce the same model, so it is never promoted."""
    return (trial.user_attrs.get("metrics") or {}).get("recovery_steps") == 0


def recovery_steps(trial: Any, spec: Any) -> int | None:
    """The recovery budget of ``trial``: the screening budget unless it was promoted; None without fidelity."""
    f = spec.search.fidelity
    if f is None:
        return None
    return spec.recovery.steps if fidelity_of(trial) == FULL else f.screen_steps


def mark_superseded(rows: list[dict[str, Any]]) -> None:
    """Flag each screened row whose promoted retraining completed: the retrained model replaces it on the front."""
    done = {r.get("promoted_from") for r in rows if r.get("fidelity") == FULL and r.get("state") == "COMPLETE"}
    for r in rows:
        if r.get("fidelity") != FULL and r.get("number") in done:
            r["superseded"] = True
