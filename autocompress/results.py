"""The study's results folder: read trials back from Optuna storage and (re)write tables, plots, report."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import StudyError
from .spec import Spec, load_spec


@dataclass
class StudyResults:
    spec: Spec
    rows: list[dict[str, Any]]
    baseline: dict[str, Any]
    objectives: list[tuple[str, str]]
    front: list[dict[str, Any]]
    notes: list[str]
    command: str


def _open(d: Path) -> tuple[Spec, Any, dict[str, Any]]:
    from .search import SPEC_FILE, STATE_FILE, open_study

    state_file, spec_file = d / STATE_FILE, d / SPEC_FILE
    if not state_file.is_file() or not spec_file.is_file():
        raise StudyError(f"{str(d)!r} is not a study folder ({STATE_FILE} or {SPEC_FILE} missing); run 'autocompress search' first")
    state = json.loads(state_file.read_text())
    spec = load_spec(spec_file)
    if spec.search.storage is None:
        spec.search.storage = f"sqlite:///{d / 'study.db'}"  # the folder may have moved since
    return spec, open_study(spec, d, create=False), state


def _collect(d: Path, study: Any, spec: Spec, command: str) -> StudyResults:
    from .fidelity import mark_superseded
    from .pareto import front_rows
    from .search import trial_row

    rows = [trial_row(t) for t in study.get_trials(deepcopy=False)]
    mark_superseded(rows)
    baseline = study.user_attrs.get("baseline") or {}
    objectives = spec.objective_list()
    front = front_rows(rows, objectives) if baseline else []
    notes = list(study.user_attrs.get("notes", []))
    mixed = mixed_devices_note(rows, baseline)
    if mixed:
        notes.append(mixed)
    return StudyResults(spec, rows, baseline, objectives, front, notes, command)


def _hardware(device: str) -> str:
    # "cuda:1 (NVIDIA H100 ...)" and "cuda:0 (NVIDIA H100 ...)" are the same hardware: drop the index.
    return re.sub(r"^cuda:\d+", "cuda", device or "?")


def mixed_devices_note(rows: list[dict[str, Any]], baseline: dict[str, Any]) -> str | None:
    """A note naming every hardware the latencies were measured on, when it is more than one."""
    if not baseline:
        return None
    counts: dict[str, int] = {}
    for r in rows:
        if r["state"] == "COMPLETE":
            key = _hardware(r.get("device") or "?")
            counts[key] = counts.get(key, 0) + 1
    base = _hardware(baseline.get("device") or "?")
    if not counts or set(counts) == {base}:
        return None
    trials = "; ".join(f"{n} trial(s) on {dev}" for dev, n in counts.items())
    return (f"Latencies were measured on different hardware: the baseline on {base}; {trials}. The front and "
            "the speed-ups compare them as measured, so latency differences between these groups are partly "
            "the hardware's (each trial's device is in trials.csv)")


def load_results(d: str | Path) -> StudyResults:
    d = Path(d)
    spec, study, state = _open(d)
    return _collect(d, study, spec, state.get("command", ""))


def write_results(d: Path, *, study: Any, spec: Spec) -> list[dict[str, Any]]:
    """Rewrite every results file from storage and drop trial models that are no longer needed (one writer
    at a time: workers sharing the folder finish trials at the same moment)."""
    from .parallel import results_lock

    with results_lock(d):
        return _write_results(d, study=study, spec=spec)


def _write_results(d: Path, *, study: Any, spec: Spec) -> list[dict[str, Any]]:
    from .measure import protocol
    from .report import write_all

    state = json.loads((d / "study.json").read_text()) if (d / "study.json").is_file() else {}
    res = _collect(d, study, spec, state.get("command", ""))
    if not res.baseline:
        return []
    m = spec.measurement
    proto = protocol(m, device_description=res.baseline.get("device", "?"), latency_examples=m.latency_examples)
    proto["examples_timed_per_batch_size"] = {bs: min(m.latency_examples, bs * m.max_batches) for bs in m.batch_sizes}
    summary = {
        "study": spec.study,
        "model": spec.model.name,
        "data": spec.data.path or f"{spec.data.hub_id}:{spec.data.hub_config}",
        "selection split": f"validation carved from {spec.data.train_split} ({spec.data.validation_size:g})",
        "reported split": spec.data.eval_split,
        "sampler": f"{spec.search.sampler} (seed {spec.search.seed})",
        "trials requested": spec.search.trials,
        "recovery fine-tuning": f"{spec.recovery.steps} steps of batch {spec.recovery.batch_size}",
        "techniques": ", ".join(spec.techniques),
    }
    front = write_all(d, rows=res.rows, baseline=res.baseline, objectives=res.objectives, spec_summary=summary,
                      protocol=proto, commands=[res.command] if res.command else [], notes=res.notes)
    _prune_models(d, res.rows, front, spec.search.keep_models)
    return front


def _prune_models(d: Path, rows: list[dict[str, Any]], front: list[dict[str, Any]], keep: str) -> None:
    keep_numbers = {r["number"] for r in front} if keep == "front" else set()
    for r in rows:
        # A failed trial's folder is what a kill or crash left mid-save: never a model to keep.
        if r["state"] in ("FAIL", "PRUNED") or (keep != "all" and r["state"] == "COMPLETE"
                                                and r["number"] not in keep_numbers):
            shutil.rmtree(d / "trials" / str(r["number"]), ignore_errors=True)


def refresh(d: str | Path) -> list[dict[str, Any]]:
    d = Path(d)
    spec, study, _ = _open(d)
    return write_results(d, study=study, spec=spec)
