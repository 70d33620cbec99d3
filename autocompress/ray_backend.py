"""``search.backend: ray``: the same search as Ray Tune trials, on this machine or a Ray cluster of GPU workers.

Ray Tune runs, restores and retries trials; ``OptunaSearch`` proposes them from the study itself (the same
Optuna storage, sampler and seeded pipelines as the optuna backend), so the results folder, ``autocompress
pareto``/``show`` and optuna-dashboard work unchanged, and a study can switch backends on resume.

- **The objective** is :func:`objective.evaluate`, run inside a Tune function trainable with the resources of
  ``search.ray`` (CPUs and GPUs per trial, fractions allowed). Latency is timed on the trial's device: CUDA
  when Ray gave the trial a GPU, and recorded with the trial.
- **The driver** (this process) records each outcome into the study (:class:`_Recorder`, a Tune callback),
  copies the trial's model from its Tune checkpoint into ``trials/<n>/`` and rewrites the results folder.
  Tune keeps its experiment in ``<study>/ray/tune-<trials>`` (``RunConfig.storage_path``).
- **Failures.** An exception, a non-finite objective or CUDA out-of-memory inside a trial is that trial's
  recorded failure (as in the optuna backend). A trial whose worker process or node died is retried by Tune
  up to ``search.max_failures`` times (``FailureConfig``), then recorded as failed with Ray's error.
- **Budget.** :class:`_StudySearch` suggests trials only while finished + running stay below
  ``search.trials`` (pipelines identical to the baseline are skipped and not counted, as in the optuna loop).
- **Interrupt and restore.** Ctrl-C/SIGTERM stops Tune, which saves the experiment; running trials are recorded
  as interrupted. The same command again calls ``Tuner.restore`` and finishes the total; a trial Tune resumes
  after its Optuna trial was closed is recorded as a new trial with the same parameters.

Multi-node clusters need the data (``data.path``), any ``--plugin`` file and the results folder (Tune's
storage path) at the same paths on every node, e.g. on NFS; the fine-tuned baseline is shipped to the workers.
"""

from __future__ import annotations

import json
import math
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from .errors import StudyError

try:
    import ray
    from ray import tune
    from ray.tune.search import Searcher
    from ray.tune.search.optuna import OptunaSearch
except ImportError as exc:  # pragma: no cover - exercised where Ray is not installed
    raise StudyError(f"search.backend 'ray' needs Ray Tune, which is not installed ({exc}); "
                     "pip install 'autocompress[ray]', or use --backend optuna --workers N") from None

EXPERIMENT = "tune-{trials}"  # one experiment per requested total: a larger --trials starts a new one
# The running driver's context: the searcher and callback are pickled into Tune's experiment state and
# restored from it, so what may change between runs (the total, the log) is looked up here, not pickled.
_CONTEXT: dict[str, Any] = {}


def trial_device(requested: str, gpu_ids: list[Any]) -> str:
    """A Ray trial's device: an explicit measurement.device, else CUDA exactly when Ray gave it a GPU (Ray
    sets CUDA_VISIBLE_DEVICES, so that GPU is cuda:0 inside the trial)."""
    if requested != "auto":
        return requested
    return "cuda" if gpu_ids else "cpu"


def _threads(spec: Any) -> int:
    return spec.measurement.threads or max(1, int(math.floor(spec.search.ray.cpus_per_trial)))


def _worker_spec(spec: Any) -> dict[str, Any]:
    """The spec as the workers see it: local paths made absolute (a Ray worker's working directory differs)."""
    data = spec.model_dump(mode="json")
    if spec.data.path and Path(spec.data.path).exists():
        data["data"]["path"] = str(Path(spec.data.path).resolve())
    if Path(spec.model.name).exists():
        data["model"]["name"] = str(Path(spec.model.name).resolve())
    return data


def _plugins(registry: Any) -> list[str]:
    out: dict[str, None] = {}
    for rt in registry.techniques.values():
        if rt.source == "--plugin":
            out[str(Path(rt.plugin).resolve()) if rt.plugin.endswith(".py") else rt.plugin] = None
    return list(out)


# ----------------------------------------------------------------------------------------------------------
# Worker side
# ----------------------------------------------------------------------------------------------------------

_PREPARED: dict[tuple[str, str, int], Any] = {}


def _prepare_here(payload: dict[str, Any], *, log: Callable[[str], None] = print) -> Any:
    """Data and baseline in this Ray worker process (kept for later trials in the same process)."""
    from .engine import prepare
    from .registry import load_registry
    from .spec import load_spec

    spec = load_spec(data=payload["spec"])
    device = trial_device(spec.measurement.device, ray.get_gpu_ids())
    key = (json.dumps(payload["spec"], sort_keys=True), device, _threads(spec))
    if key not in _PREPARED:
        if payload.get("baseline_files"):
            _install_baseline(payload["baseline_key"], payload["baseline_files"])
        registry = load_registry(extra_plugins=payload["plugins"])
        _PREPARED.clear()
        _PREPARED[key] = prepare(spec, registry, log=log, device=device, threads=_threads(spec))
    return _PREPARED[key]


def _install_baseline(key: str, files: dict[str, bytes]) -> None:
    """Put the driver's fine-tuned baseline into this node's cache, so no node fine-tunes its own."""
    import shutil

    from .data import cache_root

    bdir = cache_root() / "baselines" / key
    if (bdir / "model" / "config.json").is_file():
        return
    tmp = bdir / f"model.partial.{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    for name, blob in files.items():
        (tmp / name).write_bytes(blob)
    try:
        tmp.rename(bdir / "model")
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another trial on this node installed it first


def _baseline_job(payload: dict[str, Any], measure: bool) -> dict[str, Any]:
    """Run once, with a trial's resources: fine-tune (or reuse) the baseline, measure it where trials run."""
    from .engine import measure_baseline
    from .modeling import describe_device

    prep = _prepare_here(payload)
    out: dict[str, Any] = {"key": prep.baseline_key,
                           "files": {p.name: p.read_bytes() for p in (prep.baseline_dir / "model").iterdir() if p.is_file()}}
    if measure:
        out["baseline"] = {**measure_baseline(prep), "device": describe_device(prep.device)}
        out["notes"] = prep.notes
    return out


def _trainable(config: dict[str, Any], payload: dict[str, Any] | None = None) -> None:
    """One Tune trial: evaluate the pipeline the searcher chose and report the outcome (and the model)."""
    from .objective import evaluate

    assert payload is not None
    names = [name for name, _ in payload["objectives"]]
    pipeline = json.loads(config["ac_pipeline"])
    nan = {name: float("nan") for name in names}
    if not pipeline:
        tune.report({**nan, "ac_outcome": json.dumps({"skipped": True})})
        return
    prep = _prepare_here(payload)
    with tempfile.TemporaryDirectory(prefix="autocompress-trial-") as tmp:
        model_dir = Path(tmp) / "model"
        outcome = evaluate(prep, pipeline, model_dir)
        values = outcome.get("values") or [float("nan")] * len(names)
        checkpoint = tune.Checkpoint.from_directory(str(model_dir)) if "metrics" in outcome else None
        tune.report({**dict(zip(names, values)), "ac_outcome": json.dumps(outcome, default=str)}, checkpoint=checkpoint)


# ----------------------------------------------------------------------------------------------------------
# Driver side
# ----------------------------------------------------------------------------------------------------------


class _DefineByRun:
    """OptunaSearch's define-by-run space: the study's own sampler draws the pipeline (Suggester), and the
    trial's id and pipeline go to the trainable as constants. Picklable: the space is rebuilt on use."""

    def __init__(self, spec_data: dict[str, Any], plugins: list[str]) -> None:
        self.spec_data, self.plugins = spec_data, plugins
        self._space: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"spec_data": self.spec_data, "plugins": self.plugins, "_space": None}

    def __call__(self, trial: Any) -> dict[str, Any]:
        from .parallel import worker_label
        from .registry import load_registry
        from .space import Suggester, resolve_space, sample
        from .spec import load_spec

        if self._space is None:
            self._space = resolve_space(load_spec(data=self.spec_data), load_registry(extra_plugins=self.plugins))
        pipeline = sample(self._space, Suggester(trial))
        real = trial.ot_trial
        real.set_user_attr("pipeline", list(pipeline))
        real.set_user_attr("params", pipeline)
        real.set_user_attr("worker", f"ray (driver {worker_label()})")
        return {"ac_trial_id": real._trial_id, "ac_number": real.number, "ac_pipeline": json.dumps(pipeline)}


class _StudySearch(OptunaSearch):
    """OptunaSearch on the study's storage that stops at the requested total and leaves recording to
    :class:`_Recorder` (which knows a failure's reason and whether a trial was skipped)."""

    def __init__(self, *args: Any, total: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._total = total
        self._live: set[str] = set()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._total = _CONTEXT.get("total", self._total)  # a resumed command may ask for more trials

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        self._total = _CONTEXT.get("total", self._total)

    def _finished(self) -> int:
        from .search import finished_count

        return finished_count(self._ot_study)

    def suggest(self, trial_id: str) -> dict | None:
        done = self._finished()
        if done >= self._total:
            return Searcher.FINISHED
        if done + len(self._live) >= self._total:
            return None  # ask again when a running trial is done
        config = super().suggest(trial_id)
        if config is not None:
            self._live.add(trial_id)
        return config

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        from optuna.trial import TrialState

        self._live.discard(trial_id)
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None and self._ot_study._storage.get_trial(ot_trial._trial_id).state == TrialState.RUNNING:
            if not error:  # recorded by _Recorder.on_trial_error otherwise
                super().on_trial_complete(trial_id, result, error)
        self._completed_trials.add(trial_id)


class _Recorder(tune.Callback):
    """Writes each Tune trial's outcome into the study and its model into the results folder."""

    def __init__(self, d: str) -> None:
        self.d = d
        self.recorded: dict[str, int] = {}  # Tune trial id -> the Optuna trial number its outcome went to

    def _ctx(self) -> dict[str, Any]:
        if "study" not in _CONTEXT:
            raise StudyError("the Ray driver's study context is missing; run the search through autocompress")
        return _CONTEXT

    def _open_trial(self, trial: Any) -> Any:
        """The Optuna trial to record into: the one asked for this Tune trial while it is still RUNNING, else
        (Tune resumed a trial recorded as interrupted) a new trial with the same parameters."""
        import optuna
        from optuna.trial import TrialState, create_trial

        study = self._ctx()["study"]
        old = study._storage.get_trial(trial.config["ac_trial_id"])
        if old.state == TrialState.RUNNING:
            return optuna.Trial(study, old._trial_id)
        attrs = {k: v for k, v in old.user_attrs.items() if k in ("pipeline", "params", "enqueued", "worker")}
        template = create_trial(state=TrialState.RUNNING, params=old.params, distributions=old.distributions,
                                user_attrs=attrs, system_attrs={"failed_trial": old.number})
        return optuna.Trial(study, study._storage.create_new_trial(study._study_id, template_trial=template))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        from optuna.trial import TrialState

        from .objective import record

        ctx = self._ctx()
        outcome = json.loads(result.get("ac_outcome") or "{}")
        if not outcome:
            return  # not one of the trainable's reports
        ot = self._open_trial(trial)
        if outcome.get("skipped"):
            ot.set_user_attr("fail_reason", "skipped: no technique enabled (identical to the baseline)")
            ctx["study"].tell(ot, state=TrialState.PRUNED)
            return
        if trial.num_failures:
            ot.set_user_attr("ray_failures", trial.num_failures)
        record(ctx["study"], ot, outcome, baseline=ctx["baseline"], spec=ctx["spec"], d=Path(self.d))
        self.recorded[trial.trial_id] = ot.number

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ctx()["log"](f"trial {trial.config.get('ac_number')} (Ray {trial.trial_id}): its worker failed "
                           f"({trial.num_failures}x); Tune runs it again (search.max_failures)")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        from .objective import record

        ctx = self._ctx()
        try:
            error = trial.get_error()
            text = str(error).strip().splitlines()[-1] if error is not None else "no error recorded"
        except Exception:  # noqa: BLE001 - the reason is a courtesy; the failure itself is recorded
            text = f"see {trial.error_file}"
        outcome = {"fail_reason": f"the Ray trial failed {trial.num_failures} time(s), more than "
                                  f"search.max_failures={ctx['spec'].search.max_failures}: {text}"}
        record(ctx["study"], self._open_trial(trial), outcome, baseline=ctx["baseline"], spec=ctx["spec"],
               d=Path(self.d))
        self._written(f"trial {trial.config.get('ac_number')} FAILED: {outcome['fail_reason']}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        number = self.recorded.pop(trial.trial_id, None)
        if number is None:
            return
        checkpoint = trial.checkpoint
        if checkpoint is not None:
            target = Path(self.d) / "trials" / str(number)
            checkpoint.to_directory(str(target))
            _drop_local(checkpoint)
        outcome = json.loads((trial.last_result or {}).get("ac_outcome") or "{}")
        if "fail_reason" in outcome:
            self._written(f"trial {number} FAILED: {outcome['fail_reason']}")
        else:
            from .search import _trial_line

            ctx = self._ctx()
            self._written(_trial_line(number, json.loads(trial.config["ac_pipeline"]), outcome["metrics"],
                                      ctx["baseline"], ctx["spec"]) + f"  [{outcome.get('device')}]")

    def _written(self, line: str) -> None:
        from .results import write_results
        from .search import finished_count

        ctx = self._ctx()
        write_results(Path(self.d), study=ctx["study"], spec=ctx["spec"])
        ctx["log"](f"[{finished_count(ctx['study'])}/{ctx['total']} {time.perf_counter() - ctx['start']:.0f}s] {line}")


def _trial_name(trial: Any) -> str:
    return f"trial_{trial.config.get('ac_number')}_{trial.trial_id}"  # the study's trial number first


def _drop_local(checkpoint: Any) -> None:
    """The model now lives in trials/<n>/; drop Tune's copy when it is a local folder (no duplicate)."""
    import shutil

    fs = getattr(checkpoint, "filesystem", None)
    if fs is not None and getattr(fs, "type_name", "") == "local" and Path(checkpoint.path).is_dir():
        shutil.rmtree(checkpoint.path, ignore_errors=True)


def run_ray(spec: Any, *, registry: Any, d: Path, study: Any, command: str, log: Callable[[str], None]) -> Path:
    """Run (or restore) the study as a Ray Tune experiment to ``spec.search.trials`` finished trials."""
    from .results import write_results
    from .search import StudyInterrupted, finished_count, make_sampler, mark_stale_running

    r = spec.search
    if spec.measurement.device.startswith("cuda") and r.ray.gpus_per_trial == 0:
        raise StudyError(f"measurement.device is {spec.measurement.device!r} but search.ray.gpus_per_trial is 0: Ray "
                         "gives a trial no GPU then. Pass --gpus-per-trial 1 (or 0.5), or --device auto")
    if r.workers > 1:
        log(f"search.workers={r.workers} is for the optuna backend; under Ray, --max-concurrent and the resources "
            "per trial decide how many trials run at once")
    name = EXPERIMENT.format(trials=r.trials)
    path = d / "ray" / name
    restoring = tune.Tuner.can_restore(str(path))
    if not restoring and spec.search.storage is None:
        stale = mark_stale_running(study, max_failures=r.max_failures)
        if stale:
            log(f"Marked {stale} trial(s) cut off by a crash or kill as failed; they are run again")
    env = {k: os.environ[k] for k in ("AUTOCOMPRESS_CACHE", "AUTOCOMPRESS_PLUGINS", "HF_HUB_OFFLINE") if k in os.environ}
    ray.init(address=r.ray.address, runtime_env={"env_vars": env} if env else None, log_to_driver=True,
             ignore_reinit_error=True, **({} if r.ray.address else {"include_dashboard": False}))
    resources = {"cpu": r.ray.cpus_per_trial, "gpu": r.ray.gpus_per_trial}
    have = ray.cluster_resources()
    for kind, key in (("cpu", "CPU"), ("gpu", "GPU")):
        if resources[kind] > have.get(key, 0):
            raise StudyError(f"each trial asks for {resources[kind]:g} {key}(s) (search.ray.{kind}s_per_trial) but "
                             f"the Ray cluster {r.ray.address or '(local)'} has {have.get(key, 0):g}; lower it or add nodes")
    payload: dict[str, Any] = {"spec": _worker_spec(spec), "plugins": _plugins(registry),
                               "objectives": spec.objective_list()}
    log(f"Ray cluster: {ray.cluster_resources()}; each trial gets {resources}")
    job = ray.remote(_baseline_job).options(num_cpus=resources["cpu"], num_gpus=resources["gpu"])
    baseline = study.user_attrs.get("baseline")
    got = ray.get(job.remote(payload, baseline is None))
    if baseline is None:
        baseline = got["baseline"]
        study.set_user_attr("baseline", baseline)
        study.set_user_attr("notes", got["notes"])
    payload.update(baseline_key=got["key"], baseline_files=got["files"])
    from .search import _baseline_line

    log(_baseline_line(baseline, spec) + f" [{baseline.get('device')}]")
    _CONTEXT.update(study=study, spec=spec, baseline=baseline, total=r.trials, log=log, start=time.perf_counter())
    trainable = tune.with_resources(tune.with_parameters(_trainable, payload=payload), resources)
    previous_term = signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))  # as Ctrl-C
    try:
        if restoring:
            log(f"Restoring the Ray Tune experiment {path}")
            tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True)
        else:
            names = [n for n, _ in spec.objective_list()]
            modes = ["max" if direction == "maximize" else "min" for _, direction in spec.objective_list()]
            searcher = _StudySearch(_DefineByRun(payload["spec"], payload["plugins"]), metric=names, mode=modes,
                                    # seeded past the trials already in the study (or it repeats them)
                                    sampler=make_sampler(spec, len(names), seed_offset=len(study.get_trials(deepcopy=False))),
                                    study_name=spec.study,
                                    storage=study._storage, total=r.trials)
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(search_alg=searcher, num_samples=-1, max_concurrent_trials=r.ray.max_concurrent,
                                            trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
                run_config=tune.RunConfig(name=name, storage_path=str(d / "ray"), verbose=0,
                                          failure_config=tune.FailureConfig(max_failures=r.max_failures),
                                          callbacks=[_Recorder(str(d))]))
        tuner.fit()
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        _close_running(study, spec, log)
        write_results(d, study=study, spec=spec)
        _CONTEXT.clear()
        ray.shutdown()
    done = finished_count(study)
    if done < r.trials:
        raise StudyInterrupted(done, r.trials, command)
    return d


def _close_running(study: Any, spec: Any, log: Callable[[str], None]) -> None:
    """Trials Tune stopped mid-run (Ctrl-C) are recorded as interrupted; restore runs them again."""
    from optuna.trial import TrialState

    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if spec.search.storage is not None and not str(t.user_attrs.get("worker", "")).startswith("ray"):
            continue  # another machine's trial on a shared storage
        study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)
        study._storage.set_trial_user_attr(t._trial_id, "fail_reason", "interrupted (Ctrl-C or SIGTERM) mid-trial; "
                                           "the same command restores the Ray experiment and runs it again")
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        n += 1
    if n:
        log(f"{n} running trial(s) recorded as interrupted")
