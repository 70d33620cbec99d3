"""One trial's objective, the same for every backend: evaluate a pipeline, then record the outcome in the study.

``evaluate`` runs where the trial runs (this process, a worker process, a Ray worker on another machine) and
returns a JSON-able outcome; ``record`` writes it into the Optuna study (user attributes that the results
folder reads, constraints, the objective values, the final state). A trial that raises, measures a
non-finite objective or runs out of memory is an outcome too: failed, with its reason, and the study goes on.
"""

from __future__ import annotations

import math
import shutil
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from .errors import AutocompressError
from .guards import OOM_FIX, is_out_of_memory, stop_if_fatal

if TYPE_CHECKING:
    from .engine import Prepared
    from .spec import Spec


def evaluate(prep: "Prepared", pipeline: Mapping[str, Mapping[str, Any]], trial_dir: Path, *,
             recovery_steps: int | None = None) -> dict[str, Any]:
    """Run ``pipeline`` on a copy of the baseline, save it to ``trial_dir`` and measure it on ``prep.device``;
    ``recovery_steps`` overrides ``recovery.steps`` (a screening trial of ``search.fidelity``).

    Returns ``{"metrics", "values"}`` or ``{"fail_reason", "traceback"}``, with ``duration_s``, ``device`` (the
    hardware the latency was measured on) and ``worker`` (host:pid). KeyboardInterrupt is not caught."""
    from .engine import run_trial
    from .modeling import describe_device
    from .parallel import free_device_memory, worker_label

    spec = prep.spec
    start = time.perf_counter()
    out: dict[str, Any] = {"worker": worker_label()}
    try:
        metrics = run_trial(prep, pipeline, save_dir=trial_dir, recovery_steps=recovery_steps)
        values = [float(metrics[name]) for name, _ in spec.objective_list()]
        bad = [n for (n, _), v in zip(spec.objective_list(), values) if not math.isfinite(v)]
        if bad:
            raise AutocompressError(f"objective(s) {', '.join(bad)} measured as non-finite")
        out.update(metrics=metrics, values=values)
    except Exception as exc:  # noqa: BLE001 - a failing trial is recorded and the study goes on
        stop_if_fatal(exc)  # a full or read-only disk stops the search instead (every later trial would fail)
        reason = str(exc) if isinstance(exc, AutocompressError) else f"{type(exc).__name__}: {exc}"
        if is_out_of_memory(exc):
            reason = f"out of memory on {prep.device}: {reason}. {OOM_FIX}"
        out.update(fail_reason=reason, traceback=traceback.format_exc(limit=8)[-4000:])
        shutil.rmtree(trial_dir, ignore_errors=True)
    if "fail_reason" in out:
        # Here, not in the except block: until it ends, the exception's frames keep the trial's model alive.
        free_device_memory(prep.device)
    out["duration_s"] = time.perf_counter() - start
    out["device"] = describe_device(prep.device)
    return out


def record(study: Any, trial: Any, outcome: Mapping[str, Any], *, baseline: Mapping[str, Any], spec: "Spec",
           d: Path) -> None:
    """Write ``outcome`` into ``trial`` (an ``optuna.Trial`` still RUNNING) and tell the study."""
    from optuna.trial import TrialState

    from .search import constraint_values

    for key in ("duration_s", "device", "worker"):
        if outcome.get(key) is not None:
            trial.set_user_attr(key, outcome[key])
    if "fail_reason" in outcome:
        trial.set_user_attr("fail_reason", outcome["fail_reason"])
        if outcome.get("traceback"):
            trial.set_user_attr("traceback", outcome["traceback"])
        study.tell(trial, state=TrialState.FAIL)
        return
    metrics = outcome["metrics"]
    trial.set_user_attr("metrics", metrics)
    constraints = constraint_values(metrics, baseline, spec)
    trial.set_user_attr("constraints", constraints)
    for key, value in constraints.items():
        trial.set_constraint(key, value)
    trial.set_user_attr("model_dir", str((d / "trials" / str(trial.number)).relative_to(d)))
    study.tell(trial, list(outcome["values"]))
