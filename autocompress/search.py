"""The Optuna multi-objective search: study storage, resume, trial loop, results folder.

Optuna's ask/tell interface drives the loop so the engine decides what a finished trial is: a trial that
raised is recorded FAIL with its reason and counts towards the total (it is not retried forever); a trial
cut off by Ctrl-C or a crash is recorded FAIL with ``interrupted`` and does not count, so re-running the
same command resumes to the requested total without redoing finished trials.
"""

from __future__ import annotations

import contextlib

import json
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import AutocompressError, StudyError
from .guards import check_free_space, check_model, discard_if_unstarted, hold_study_lock, spec_changes
from .report import _write_text as write_atomic
from .registry import Registry
from .space import Suggester, enqueued_params, resolve_space, sample
from .spec import Spec, dump_spec, without_later_defaults

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
        # A unique probe: workers starting together on one study shared ".write-test", and one's unlink made
        # another's fail ("not writable (No such file or directory)").
        with tempfile.NamedTemporaryFile(dir=d, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise StudyError(f"results folder {str(d)!r} is not writable ({exc.strerror}); pass --results-dir to a writable place") from None


def space_fingerprint(spec: Spec) -> str:
    import hashlib

    dumped = spec.model_dump(mode="json")
    # Where trials run is not what they are: the device is recorded with every measurement instead, so a
    # study can be resumed, or shared by workers, on other hardware ("auto" keeps older fingerprints valid).
    dumped["measurement"]["device"] = "auto"
    without_later_defaults(dumped)
    blob = json.dumps({k: dumped[k] for k in SEARCH_KEYS}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _changed_keys(d: Path, spec: Spec) -> list[str]:
    """What changed since the study's last run (from its spec.resolved.yaml), for the refusal message."""
    import yaml

    try:
        old = yaml.safe_load((d / SPEC_FILE).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return []
    if not isinstance(old, dict):
        return []
    new = spec.model_dump(mode="json")
    for dumped in (old, new):  # the device is not part of the fingerprint (see space_fingerprint)
        if isinstance(dumped.get("measurement"), dict):
            dumped["measurement"]["device"] = "auto"
    return spec_changes(old, new, SEARCH_KEYS)


def make_sampler(spec: Spec, n_objectives: int, *, seed_offset: int = 0):
    import optuna

    # Constraints reach the samplers through Trial.set_constraint (Optuna 5), not constraints_func.
    # Workers sharing a study get different seeds, or they would all propose the same parameters.
    s = spec.search
    seed = s.seed + seed_offset
    if s.sampler == "nsga2":
        pop = s.population_size or max(2, min(20, s.trials))
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=pop)
    if s.sampler == "tpe":
        # constant_liar: other workers' running trials count as bad guesses, so parallel workers spread out
        # (one process never has another trial running while it samples: no change there).
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)
    return optuna.samplers.RandomSampler(seed=seed)


def open_study(spec: Spec, d: Path, *, create: bool = True, seed_offset: int = 0):
    import optuna

    from .parallel import make_storage, redact

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = spec.search.storage or f"sqlite:///{d / 'study.db'}"
    directions = [direction for _, direction in spec.objective_list()]
    storage = make_storage(url, spec, writer=create)
    sampler = make_sampler(spec, len(directions), seed_offset=seed_offset)
    try:
        if create:
            return optuna.create_study(study_name=spec.study, storage=storage, directions=directions,
                                       sampler=sampler, load_if_exists=True)
        return optuna.load_study(study_name=spec.study, storage=storage, sampler=sampler)
    except (KeyError, ValueError) as exc:
        raise StudyError(f"cannot open study {spec.study!r} in storage {redact(url)!r}: {exc}") from None


class _SignalGate:
    """Holds SIGINT/SIGTERM while this process talks to the study storage and lets them through only while a
    trial computes (:meth:`open`). A KeyboardInterrupt raised in the middle of an SQLAlchemy call can leave
    this process's SQLite connection mid-transaction; its lock then fails every later write here ("database is
    locked"), so the cut-off trial could not be recorded and stayed RUNNING (seen in CI after a Ctrl-C that
    landed while a trial's parameters were being sampled). A held signal is raised at the next
    :meth:`check`. Outside the main thread (signals cannot be handled there) it does nothing."""

    def __init__(self) -> None:
        self.pending: list[int] = []
        self.saved: dict[int, Any] = {}

    def _hold(self, signum: int, frame: object) -> None:
        self.pending.append(signum)

    def __enter__(self) -> "_SignalGate":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self.saved = {sig: signal.signal(sig, self._hold) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc: object) -> None:
        import signal

        for sig, handler in self.saved.items():
            signal.signal(sig, handler)

    def check(self) -> None:
        if self.pending:
            raise KeyboardInterrupt

    def sleep(self, seconds: float) -> None:
        with self.open():
            time.sleep(seconds)

    @contextlib.contextmanager
    def open(self) -> Iterator[None]:
        import signal

        self.check()
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)
        try:
            yield
        finally:
            for sig in self.saved:
                signal.signal(sig, self._hold)


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
        "fidelity": a.get("fidelity"),
        "promoted_from": a.get("promoted_from"),
    }


def finished_count(study: Any) -> int:
    from .parallel import is_finished

    return sum(1 for t in study.get_trials(deepcopy=False) if is_finished(t))


def mark_stale_running(study: Any, *, max_failures: int = 2) -> int:
    """A RUNNING trial found when a single-process study starts was cut off (kill, crash): it is run again
    with the same parameters, up to ``max_failures`` times (see :func:`parallel.record_stale`)."""
    from optuna.trial import TrialState

    from .parallel import record_stale

    n = 0
    for t in study.get_trials(deepcopy=True, states=(TrialState.RUNNING,)):
        n += record_stale(study, t, why="the process stopped mid-trial (killed or crashed)", max_failures=max_failures)
    return n


def _requeue(study: Any, trial: Any) -> None:
    """An enqueued pipeline (seeded, or promoted to full fidelity) that was cut off is queued again, so a
    resumed study still runs it."""
    keep = {k: trial.user_attrs[k] for k in ("enqueued", "fidelity", "promoted_from", "promoted_enqueued")
            if k in trial.user_attrs}
    if "enqueued" in keep or "promoted_from" in keep:
        study.enqueue_trial(dict(trial.params), user_attrs=keep, skip_if_exists=False)


class _Progress:
    """Trial n/N, elapsed, front size; a live bar on a terminal, one line per trial otherwise."""

    def __init__(self, total: int, done: int, *, log: Callable[[str], None], bar: bool = True) -> None:
        self.log, self.total, self.start = log, total, time.perf_counter()
        self.bar = None
        if bar and sys.stderr.isatty():
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
               log: Callable[[str], None] = print, worker: Any = None,
               measured_baseline: dict[str, Any] | None = None) -> Path:
    """Run (or resume) the study to ``spec.search.total_trials`` finished trials (``search.trials``, plus the
    promoted retrainings of ``search.fidelity``); return the study folder.

    ``worker`` (a :class:`workers.WorkerRole`) marks a process started by ``--workers N``: the command's own
    process has set the study up and measured the baseline, so the worker only runs trials. Every process
    shares the loop below: it starts a trial only while finished + running trials stay below the total, keeps
    the running trial's heartbeat, and fails (then retries) trials whose worker died (:mod:`parallel`).

    ``measured_baseline``: the baseline's metrics measured by the caller with this spec's protocol (the bench
    measures it once for all of its studies); a study that has none stores it instead of measuring again."""
    from optuna.trial import TrialState

    from .engine import measure_baseline, prepare
    from .fidelity import SCREEN, promote, recovery_steps
    from .objective import evaluate, record
    from .parallel import MAX_REPEATS_IN_A_ROW, Heartbeat, next_turn, redact, repeat_of, skip_reason, worker_label
    from .results import write_results

    space = resolve_space(spec, registry)  # validate everything before any work
    d = study_dir(results_dir, spec.study)
    if (d / "summary.json").is_file() and (d / "studies").is_dir():
        raise StudyError(f"{str(d)!r} holds an 'autocompress bench' run (summary.json, studies/), not a study; "
                         f"give this search another name (--set study=NEW) or another --results-dir")
    _check_writable(d)
    # One command per study folder (its workers excepted); released when this function returns or raises.
    lock = hold_study_lock(d, spec) if worker is None else None  # noqa: F841
    check_free_space(d, spec)
    fp = space_fingerprint(spec)
    state_path = d / STATE_FILE
    if state_path.is_file():
        try:
            old = json.loads(state_path.read_text())
        except ValueError:
            raise StudyError(f"{str(state_path)!r} is not valid JSON (edited by hand?); delete that file and run the "
                             "same command again: it is rewritten from the spec, and the trials in study.db are kept") from None
        if old.get("space_fingerprint") != fp and discard_if_unstarted(spec, d):
            log(f"The spec changed since the last run of study {spec.study!r}, which stopped before any trial; "
                "starting it afresh")
        elif old.get("space_fingerprint") != fp:
            changed = _changed_keys(d, spec)
            raise StudyError(
                f"study {spec.study!r} in {str(d)!r} was run with a different search spec (model, data, budgets, "
                "measurement, objectives, techniques or constraints changed; only search.* may change on resume)"
                + (f"; changed: {', '.join(changed)}" if changed else "") + ". "
                "Give the changed spec a new study name (--set study=NEW), or delete the folder to start over."
            )
    # Processes sharing a study sample with different seeds, or they would all propose the same parameters:
    # a --workers child on the study folder's storage by its index; any process on an explicit (possibly
    # shared by several machines) storage by its host:pid.
    if spec.search.storage is not None:
        seed_offset, stride = zlib.crc32(worker_label().encode()) % 100_000, 1
    else:
        seed_offset, stride = (worker.index, worker.count) if worker is not None else (0, 1)
    study = open_study(spec, d, seed_offset=seed_offset)
    resumed_at = len(study.get_trials(deepcopy=False))
    if resumed_at:  # a sampler seeded as on the first run would propose the finished trials' parameters again
        # (index + resumed_at * workers: two workers that saw different trial counts still get different seeds)
        study.sampler = make_sampler(spec, len(spec.objective_list()), seed_offset=seed_offset + resumed_at * stride)
    if worker is None:
        # Pipelines appended to search.enqueue since the last run are queued on resume (extend a grid).
        queued = int(study.user_attrs.get("enqueued", 0))
        # Validate every new pipeline before queueing any, so a bad entry never leaves half a grid queued.
        new = [(i, enqueued_params(space, p, where=f"search.enqueue[{i}]"))
               for i, p in enumerate(spec.search.enqueue[queued:], start=queued)]
        for i, params in new:
            study.enqueue_trial(params, user_attrs={"enqueued": i})
        if len(spec.search.enqueue) > queued:
            study.set_user_attr("enqueued", len(spec.search.enqueue))
        if spec.search.storage is None:
            # The study folder's own SQLite file: one command at a time, so a RUNNING trial is a dead one.
            # On an explicit storage other machines may be running trials: heartbeats tell (parallel.py).
            stale = mark_stale_running(study, max_failures=spec.search.max_failures)
            if stale:
                log(f"Marked {stale} trial(s) cut off by a crash or kill as failed; they are run again "
                    "and do not count towards the total")
        write_atomic(d / SPEC_FILE, dump_spec(spec))  # a kill mid-write never leaves half a file
        state = {"study": spec.study, "space_fingerprint": fp, "command": command,
                 "objectives": spec.objective_list(),
                 "storage": redact(spec.search.storage) if spec.search.storage else "sqlite:///study.db"}
        write_atomic(state_path, json.dumps(state, indent=2))

    total = spec.search.total_trials
    if worker is None:
        promote(study, spec, log=log)  # a resumed study whose screening had finished
    done = finished_count(study)
    if done >= total:
        log(f"Study {spec.study!r} already has {done} finished trials (requested {total}); nothing to run")
        write_results(d, study=study, spec=spec)
        return d
    if worker is None:
        check_model(spec, registry, space)  # before data and fine-tuning: trust_remote_code, architecture
    if worker is None and spec.search.backend == "ray":
        from .ray_backend import run_ray

        return run_ray(spec, registry=registry, d=d, study=study, command=command, log=log)

    role = worker
    if worker is None and spec.search.workers > 1:
        from .workers import plan_workers

        roles = plan_workers(spec, log=log)
        role = roles[0]  # the baseline is measured where (and with the threads) the first worker measures
    prep = prepare(spec, registry, log=log, device=getattr(role, "device", None), threads=getattr(role, "threads", None))
    for note in prep.notes if worker is None else ():
        log(f"Note: {note}")  # truncated texts, carved splits, label mapping: also in report.md
    for name in [ts.technique.name for ts in space.active()]:
        reason = registry.get(name).supports(prep.baseline, device=prep.device)
        if reason:
            raise StudyError(f"technique {name!r} cannot run here: {reason}. Set techniques.{name}.enabled: false")
    baseline = study.user_attrs.get("baseline")
    if baseline is None and measured_baseline is not None:
        baseline = dict(measured_baseline)
        study.set_user_attr("baseline", baseline)
        study.set_user_attr("notes", prep.notes)
    if baseline is None:
        log("Measuring the baseline")
        baseline = measure_baseline(prep)
        baseline["device"] = _device_desc(prep.device)
        study.set_user_attr("baseline", baseline)
        study.set_user_attr("notes", prep.notes)
    log(_baseline_line(baseline, spec))
    if worker is None and spec.search.workers > 1:
        from .workers import run_workers

        del prep  # the workers load their own copy
        return run_workers(spec, roles, registry=registry, d=d, study=study, results_dir=results_dir,
                           command=command, log=log)
    progress = _Progress(total, done, log=log, bar=worker is None)
    beat = Heartbeat(study)  # other workers, and a resumed run, tell a live trial from a dead one by it
    empty_in_a_row = repeats_in_a_row = 0
    current = None  # the asked, not yet told, trial
    # Signals are held through the storage bookkeeping below, so Ctrl-C always finds it consistent
    with _SignalGate() as gate:
        try:
            while worker is None or worker.parent_alive():
                gate.check()
                if spec.search.fidelity is not None:
                    promote(study, spec, log=log)  # enqueues the promising screened trials once all are screened
                done = next_turn(study, spec, log=log, sleep=gate.sleep)
                if done is None:
                    break
                trial = current = study.ask()
                beat.follow(trial)
                trial.set_user_attr("worker", worker_label())
                gate.check()
                skip = skip_reason(study, trial, total)
                if skip:
                    trial.set_user_attr("skipped", skip)
                    trial.set_user_attr("fail_reason", f"skipped: {skip}")
                    study.tell(trial, state=TrialState.PRUNED)
                    if skip.startswith("surplus"):
                        _requeue(study, study._storage.get_trial(trial._trial_id))
                    current = None
                    continue
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
                steps = recovery_steps(trial, spec)
                if steps is not None and "fidelity" not in trial.user_attrs:
                    trial.set_user_attr("fidelity", SCREEN)
                same = repeat_of(study, trial, pipeline)
                if same is not None and repeats_in_a_row < MAX_REPEATS_IN_A_ROW:
                    trial.set_user_attr("repeat_of", same)
                    trial.set_user_attr("fail_reason", f"skipped: the sampler proposed trial {same}'s pipeline again")
                    study.tell(trial, state=TrialState.PRUNED)
                    current = None
                    repeats_in_a_row += 1
                    continue
                if same is not None:
                    log(f"The sampler proposed {repeats_in_a_row} tried pipelines in a row (is the space exhausted?); "
                        f"running trial {trial.number}, a repeat of trial {same}")
                repeats_in_a_row = 0
                with gate.open():  # the trial's own work touches no storage: a signal may stop it anywhere
                    outcome = evaluate(prep, pipeline, d / "trials" / str(trial.number), recovery_steps=steps)
                record(study, trial, outcome, baseline=baseline, spec=spec, d=d)
                current = None
                done += 1
                front = write_results(d, study=study, spec=spec)
                if "fail_reason" in outcome:
                    line = f"trial {trial.number} FAILED: {outcome['fail_reason']}"
                else:
                    line = _trial_line(trial.number, pipeline, outcome["metrics"], baseline, spec)
                if steps is not None:
                    line += f"  [{trial.user_attrs.get('fidelity')}: {outcome.get('metrics', {}).get('recovery_steps', '-')} steps]"
                progress.update(done, line, len(front))
        except KeyboardInterrupt:
            from optuna.exceptions import StorageInternalError

            progress.close()
            try:
                if current is not None and study._storage.get_trial(current._trial_id).state == TrialState.RUNNING:
                    # Whatever point of the trial the signal hit, it is recorded and does not count.
                    current.set_user_attr("interrupted", True)
                    current.set_user_attr("fail_reason", "interrupted (Ctrl-C or SIGTERM) mid-trial; it does not count towards the total")
                    study.tell(current, state=TrialState.FAIL)
                    _requeue(study, study._storage.get_trial(current._trial_id))
                    shutil.rmtree(d / "trials" / str(current.number), ignore_errors=True)
                write_results(d, study=study, spec=spec)
                done = finished_count(study)
            except StorageInternalError:
                # The storage failed (a network database gone, a disk full). Nothing finished is lost: the
                # cut-off trial stays RUNNING, and the next run of the same command marks it stale and runs it
                # again (mark_stale_running).
                done = None
            raise StudyInterrupted(done, total, command) from None
        finally:
            beat.stop()
    progress.close()
    return d


class StudyInterrupted(AutocompressError):
    exit_code = 130

    def __init__(self, done: int | None, total: int, command: str) -> None:
        so_far = f"{done}/{total} trials finished and saved" if done is not None else "every finished trial is saved"
        super().__init__(f"Interrupted: {so_far}. Resume with the same command:\n  {command}")


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
