"""The Optuna multi-objective search: study storage, resume, trial loop, results folder.

Optuna's ask/tell interface drives the loop so the engine decides what a finished trial is: a trial that
raised is recorded FAIL with its reason and counts towards the total (it is not retried forever); a trial
cut off by Ctrl-C or a crash is recorded FAIL with ``interrupted`` and does not count, so re-running the
same command resumes to the requested total without redoing finished trials.
"""

from __future__ import annotations

import contextlib

import json
import math
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from .errors import AutocompressError, StudyError
from .registry import Registry
from .space import Suggester, enqueued_params, resolve_space, sample
from .spec import Spec, dump_spec

SPEC_FILE = "spec.resolved.yaml"
STATE_FILE = "study.json"
SEARCH_KEYS = ("model", "data", "baseline", "recovery", "measurement", "objectives", "techniques", "constraints", "seed")


def study_dir(results_dir: str | Path, study: str) -> Path:
    """The study's folder, refusing names that would escape the results directory."""
    root = Path(results_dir).resolve()
    d = (root / study).resolve()
    if d.parent != root:
        raise StudyError(f"study name {study!r} would write outside the results directory {str(root)!r}; use a plain name")
    return d


def _check_writable(d: Path) -> None:
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise StudyError(f"results folder {str(d)!r} is not writable ({exc.strerror}); pass --results-dir to a writable place") from None


def space_fingerprint(spec: Spec) -> str:
    import hashlib

    dumped = spec.model_dump(mode="json")
    blob = json.dumps({k: dumped[k] for k in SEARCH_KEYS}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def make_sampler(spec: Spec, n_objectives: int):
    import optuna

    # Constraints reach the samplers through Trial.set_constraint (Optuna 5), not constraints_func.
    s = spec.search
    if s.sampler == "nsga2":
        pop = s.population_size or max(2, min(20, s.trials))
        return optuna.samplers.NSGAIISampler(seed=s.seed, population_size=pop)
    if s.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=s.seed, multivariate=True)
    return optuna.samplers.RandomSampler(seed=s.seed)


def open_study(spec: Spec, d: Path, *, create: bool = True):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = spec.search.storage or f"sqlite:///{d / 'study.db'}"
    directions = [direction for _, direction in spec.objective_list()]
    try:
        storage: Any = url
        if url.startswith("sqlite:"):
            # Readers (`autocompress pareto`/`show`, optuna-dashboard) may hold the file briefly while a trial
            # is recorded; wait for them (sqlite's default is 5 s) rather than fail the write with "locked".
            storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
        if create:
            return optuna.create_study(study_name=spec.study, storage=storage, directions=directions,
                                       sampler=make_sampler(spec, len(directions)), load_if_exists=True)
        return optuna.load_study(study_name=spec.study, storage=storage, sampler=make_sampler(spec, len(directions)))
    except (KeyError, ValueError) as exc:
        raise StudyError(f"cannot open study {spec.study!r} in storage {url!r}: {exc}") from None


@contextlib.contextmanager
def _signals_deferred():
    """Hold SIGINT/SIGTERM while Optuna creates a trial: a signal inside ``study.ask()`` would leave a
    RUNNING trial that this process never learns about (resume would still mark it stale, but the results
    folder should be consistent the moment the process exits). Yields the list of signals received."""
    import signal
    import threading

    pending: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield pending
        return
    saved = {sig: signal.signal(sig, lambda signum, frame: pending.append(signum))
             for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield pending
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def constraint_values(metrics: dict[str, Any], baseline: dict[str, Any], spec: Spec) -> dict[str, float]:
    """Optuna's convention: each value <= 0 means satisfied."""
    c = spec.constraints
    out = {}
    if c.max_accuracy_drop is not None:
        out["max_accuracy_drop"] = (baseline["accuracy"] - metrics["accuracy"]) * 100.0 - c.max_accuracy_drop
    if c.max_latency_ms is not None:
        out["max_latency_ms"] = metrics[f"latency_bs{spec.measurement.batch_sizes[0]}"] - c.max_latency_ms
    if c.max_size_mb is not None:
        out["max_size_mb"] = metrics["size_mb"] - c.max_size_mb
    return out


def trial_row(t: Any) -> dict[str, Any]:
    a = t.user_attrs
    return {
        "number": t.number,
        "state": t.state.name,
        "fail_reason": a.get("fail_reason"),
        "interrupted": bool(a.get("interrupted")),
        "pipeline": a.get("pipeline", []),
        "params": a.get("params", {}),
        "metrics": a.get("metrics", {}),
        "feasible": all(v <= 0 for v in a.get("constraints", {}).values()),
        "duration_s": a.get("duration_s"),
        "device": a.get("device"),
        "model_dir": a.get("model_dir"),
    }


def finished_count(study: Any) -> int:
    from optuna.trial import TrialState

    return sum(
        1 for t in study.get_trials(deepcopy=False)
        if t.state == TrialState.COMPLETE or (t.state == TrialState.FAIL and not t.user_attrs.get("interrupted"))
    )


def mark_stale_running(study: Any) -> int:
    """A RUNNING trial found when a single-process study starts was cut off (Ctrl-C, kill, crash)."""
    from optuna.trial import TrialState

    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)
        study._storage.set_trial_user_attr(t._trial_id, "fail_reason", "interrupted: the process stopped mid-trial")
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        _requeue(study, t)
        n += 1
    return n


def _requeue(study: Any, trial: Any) -> None:
    """An enqueued pipeline that was cut off is queued again, so a resumed study still runs it."""
    if "enqueued" in trial.user_attrs:
        study.enqueue_trial(dict(trial.params), user_attrs={"enqueued": trial.user_attrs["enqueued"]})


class _Progress:
    """Trial n/N, elapsed, front size; a live bar on a terminal, one line per trial otherwise."""

    def __init__(self, total: int, done: int, *, log: Callable[[str], None]) -> None:
        self.log, self.total, self.start = log, total, time.perf_counter()
        self.bar = None
        if sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("[bold]trials"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                TextColumn("{task.fields[info]}"), transient=False)
            self.task = self.bar.add_task("search", total=total, completed=done, info="")
            self.bar.start()

    def update(self, done: int, line: str, front: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=done, info=f"front {front}")
            self.bar.console.print(line)
        else:
            self.log(f"[{done}/{self.total} {time.perf_counter() - self.start:.0f}s front={front}] {line}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def run_search(spec: Spec, *, registry: Registry, results_dir: str | Path, command: str,
               log: Callable[[str], None] = print) -> Path:
    """Run (or resume) the study to ``spec.search.trials`` finished trials; return the study folder."""
    from optuna.trial import TrialState

    from .engine import measure_baseline, prepare, run_trial
    from .results import write_results

    space = resolve_space(spec, registry)  # validate everything before any work
    d = study_dir(results_dir, spec.study)
    _check_writable(d)
    fp = space_fingerprint(spec)
    state_path = d / STATE_FILE
    if state_path.is_file():
        old = json.loads(state_path.read_text())
        if old.get("space_fingerprint") != fp:
            raise StudyError(
                f"study {spec.study!r} in {str(d)!r} was run with a different search spec (model, data, budgets, "
                "measurement, objectives, techniques or constraints changed; only search.* may change on resume). "
                "Give the changed spec a new study name (--set study=NEW), or delete the folder to start over."
            )
    study = open_study(spec, d)
    # Pipelines appended to search.enqueue since the last run are queued on resume (extend a grid).
    queued = int(study.user_attrs.get("enqueued", 0))
    # Validate every new pipeline before queueing any, so a bad entry never leaves half a grid queued.
    new = [(i, enqueued_params(space, p, where=f"search.enqueue[{i}]"))
           for i, p in enumerate(spec.search.enqueue[queued:], start=queued)]
    for i, params in new:
        study.enqueue_trial(params, user_attrs={"enqueued": i})
    if len(spec.search.enqueue) > queued:
        study.set_user_attr("enqueued", len(spec.search.enqueue))
    stale = mark_stale_running(study)
    if stale:
        log(f"Marked {stale} interrupted trial(s) as failed; they do not count towards the total")
    (d / SPEC_FILE).write_text(dump_spec(spec))
    state = {"study": spec.study, "space_fingerprint": fp, "command": command,
             "objectives": spec.objective_list(), "storage": spec.search.storage or "sqlite:///study.db"}
    state_path.write_text(json.dumps(state, indent=2))

    done = finished_count(study)
    if done >= spec.search.trials:
        log(f"Study {spec.study!r} already has {done} finished trials (requested {spec.search.trials}); nothing to run")
        write_results(d, study=study, spec=spec)
        return d

    prep = prepare(spec, registry, log=log)
    for name in [ts.technique.name for ts in space.active()]:
        reason = registry.get(name).supports(prep.baseline, device=prep.device)
        if reason:
            raise StudyError(f"technique {name!r} cannot run here: {reason}. Set techniques.{name}.enabled: false")
    device_desc = _device_desc(prep.device)
    baseline = study.user_attrs.get("baseline")
    if baseline is None:
        log("Measuring the baseline")
        baseline = measure_baseline(prep)
        baseline["device"] = device_desc
        study.set_user_attr("baseline", baseline)
        study.set_user_attr("notes", prep.notes)
    log(_baseline_line(baseline, spec))
    progress = _Progress(spec.search.trials, done, log=log)
    empty_in_a_row = 0
    current = None  # the asked, not yet told, trial
    try:
        while done < spec.search.trials:
            with _signals_deferred() as pending:
                trial = current = study.ask()
            if pending:
                raise KeyboardInterrupt
            pipeline = sample(space, Suggester(trial))
            trial.set_user_attr("pipeline", list(pipeline))
            trial.set_user_attr("params", pipeline)
            if not pipeline:
                # Every technique sampled off: that model is the baseline, already measured. Record it
                # as pruned (no cost) and do not count it, so the budget goes to real candidates.
                trial.set_user_attr("fail_reason", "skipped: no technique enabled (identical to the baseline)")
                study.tell(trial, state=TrialState.PRUNED)
                current = None
                empty_in_a_row += 1
                if empty_in_a_row >= 50:
                    raise StudyError("the sampler proposed 50 empty pipelines in a row; set at least one technique to enabled: true")
                continue
            empty_in_a_row = 0
            trial_dir = d / "trials" / str(trial.number)
            start = time.perf_counter()
            try:
                metrics = run_trial(prep, pipeline, save_dir=trial_dir)
                values = [metrics[name] for name, _ in spec.objective_list()]
                bad = [n for (n, _), v in zip(spec.objective_list(), values) if not math.isfinite(float(v))]
                if bad:
                    raise AutocompressError(f"objective(s) {', '.join(bad)} measured as non-finite")
            except Exception as exc:  # noqa: BLE001 - a failing trial is recorded and the study goes on
                reason = str(exc) if isinstance(exc, AutocompressError) else f"{type(exc).__name__}: {exc}"
                trial.set_user_attr("fail_reason", reason)
                trial.set_user_attr("traceback", traceback.format_exc(limit=8)[-4000:])
                trial.set_user_attr("duration_s", time.perf_counter() - start)
                study.tell(trial, state=TrialState.FAIL)
                current = None
                shutil.rmtree(trial_dir, ignore_errors=True)
                done += 1
                progress.update(done, f"trial {trial.number} FAILED: {reason}", _front_size(study, spec))
                write_results(d, study=study, spec=spec)
                continue
            trial.set_user_attr("metrics", metrics)
            constraints = constraint_values(metrics, baseline, spec)
            trial.set_user_attr("constraints", constraints)
            for key, value in constraints.items():
                trial.set_constraint(key, value)
            trial.set_user_attr("duration_s", time.perf_counter() - start)
            trial.set_user_attr("device", device_desc)
            trial.set_user_attr("model_dir", str(trial_dir.relative_to(d)))
            study.tell(trial, values)
            current = None
            done += 1
            front = write_results(d, study=study, spec=spec)
            progress.update(done, _trial_line(trial.number, pipeline, metrics, baseline, spec), len(front))
    except KeyboardInterrupt:
        if current is not None and study._storage.get_trial(current._trial_id).state == TrialState.RUNNING:
            # Whatever point of the trial the signal hit, it is recorded and does not count.
            current.set_user_attr("interrupted", True)
            current.set_user_attr("fail_reason", "interrupted (Ctrl-C or SIGTERM) mid-trial; it does not count towards the total")
            study.tell(current, state=TrialState.FAIL)
            _requeue(study, study._storage.get_trial(current._trial_id))
            shutil.rmtree(d / "trials" / str(current.number), ignore_errors=True)
        progress.close()
        write_results(d, study=study, spec=spec)
        raise StudyInterrupted(done, spec.search.trials, command) from None
    progress.close()
    return d


class StudyInterrupted(AutocompressError):
    exit_code = 130

    def __init__(self, done: int, total: int, command: str) -> None:
        super().__init__(
            f"Interrupted: {done}/{total} trials finished and saved. Resume with the same command:\n  {command}"
        )


def _front_size(study: Any, spec: Spec) -> int:
    from .pareto import front_rows

    return len(front_rows([trial_row(t) for t in study.get_trials(deepcopy=False)], spec.objective_list()))


def _device_desc(device: str) -> str:
    from .modeling import describe_device

    return describe_device(device)


def _baseline_line(b: dict[str, Any], spec: Spec) -> str:
    lat = " ".join(f"bs{bs} {b[f'latency_bs{bs}']:.2f} ms/ex" for bs in spec.measurement.batch_sizes)
    return (f"Baseline: val acc {b['accuracy'] * 100:.2f}, eval acc {b['eval_accuracy'] * 100:.2f}, {lat}, "
            f"{b['size_mb']:.1f} MB, {b['params'] / 1e6:.2f}M params")


def _trial_line(n: int, pipeline: dict[str, Any], m: dict[str, Any], b: dict[str, Any], spec: Spec) -> str:
    bs = spec.measurement.batch_sizes[0]
    pipe = " + ".join(f"{k}({', '.join(f'{p}={_fmt(v)}' for p, v in params.items())})" for k, params in pipeline.items()) or "(no technique)"
    return (f"trial {n}: val acc {m['accuracy'] * 100:.2f} ({(m['accuracy'] - b['accuracy']) * 100:+.2f}), "
            f"bs{bs} {m[f'latency_bs{bs}']:.2f} ms/ex ({b[f'latency_bs{bs}'] / m[f'latency_bs{bs}']:.2f}x), "
            f"{m['size_mb']:.1f} MB ({b['size_mb'] / m['size_mb']:.2f}x)  {pipe}")


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
