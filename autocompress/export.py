"""Export one trial of a study as a self-contained model directory, and classify text with it.

The directory needs only autocompress (and the plugins of its techniques) to run, never the study:

* ``model.safetensors``, ``config.json``, ``recipe.json``, ``meta.json``: the trial's saved model, as
  :func:`autocompress.modeling.load_compressed` (``autocompress.load``) rebuilds it: no pickles;
* the tokenizer of the study's base model, so text goes in exactly as it did during the search;
* ``README.md``, a model card (metrics against the baseline, pipeline, protocol, commands), and
  ``export.json`` with the same figures for machines;
* with ``--onnx``, ``model.onnx`` (see :mod:`autocompress.onnx_export`).

Which trial: ``--trial N``, or ``--pick`` among the study's Pareto front (the one ``pareto.json`` lists),
optionally within constraints. The accuracy drop of a constraint is measured on the front's quality
objective, i.e. on the validation split the search selected on, never on the held-out split, which
stays an unbiased report. Before anything is written, the exported model is reloaded from the new
directory and evaluated on the held-out split: the recorded accuracy must come back.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from .errors import DataError, ModelError, StudyError, close_matches
from .pareto import LATENCY_RE, QUALITY_METRICS, _finite, baseline_metrics, objective_matrix, pick_index
from .report import _jsonable

if TYPE_CHECKING:
    from .data import Encoded
    from .registry import Registry
    from .spec import Spec

EXPORT_FILE = "export.json"
CARD_FILE = "README.md"
PICKS = ("knee", "best-accuracy", "fastest")
_SAME = 1e-9  # accuracies are ratios of integer counts: a reproduced one is equal, not merely close


# ------------------------------------------------------------------------------------------------ selection


@dataclass
class Selection:
    """The trial chosen for export and why (what the model card and export.json say about the choice)."""

    row: dict[str, Any]
    how: str  # "trial" (asked by number) or one of PICKS
    quality_metric: str  # the metric an accuracy drop is measured on
    latency_metric: str  # the metric "fastest" and --max-latency-ms use
    constraints: dict[str, float] = field(default_factory=dict)
    candidates: list[int] = field(default_factory=list)  # front trials meeting the constraints
    front: list[int] = field(default_factory=list)


def quality_metric(objectives: Sequence[tuple[str, str]]) -> str:
    """The front's quality objective (accuracy, f1 or mcc, the first one listed); ``accuracy`` if none."""
    return next((n for n, d in objectives if n in QUALITY_METRICS and d == "maximize"), "accuracy")


def latency_metric(objectives: Sequence[tuple[str, str]], batch_sizes: Sequence[int]) -> str:
    """The front's latency objective, else the first measured batch size (what search constraints use)."""
    return next((n for n, _ in objectives if LATENCY_RE.match(n)), f"latency_bs{batch_sizes[0]}")


def finished_trial(rows: Sequence[Mapping[str, Any]], number: int) -> dict[str, Any]:
    """The row of trial ``number``, or a StudyError saying why it cannot be exported."""
    row = next((r for r in rows if r.get("number") == number), None)
    done = sorted(int(r["number"]) for r in rows if r.get("state") == "COMPLETE")
    listed = f"finished trials: {', '.join(map(str, done)) or 'none'}"
    if row is None:
        raise StudyError(f"--trial {number}: the study has no trial {number} ({listed})")
    state = row.get("state")
    if state == "FAIL":
        raise StudyError(f"--trial {number}: trial {number} failed ({row.get('fail_reason') or 'no reason recorded'}), "
                         f"so there is no model to export; pick a finished one ({listed})")
    if state == "PRUNED":
        raise StudyError(f"--trial {number}: trial {number} was skipped (every technique off: it is the baseline "
                         f"itself); pick a finished trial ({listed})")
    if state != "COMPLETE":
        raise StudyError(f"--trial {number}: trial {number} is {state} (not finished; a search may still be running "
                         f"it), so it has no model yet; pick a finished trial ({listed})")
    return dict(row)


def select_trial(
    rows: Sequence[Mapping[str, Any]],
    front: Sequence[Mapping[str, Any]],
    baseline: Mapping[str, Any],
    objectives: Sequence[tuple[str, str]],
    *,
    batch_sizes: Sequence[int],
    trial: int | None = None,
    pick: str | None = None,
    max_drop: float | None = None,
    max_size_mb: float | None = None,
    max_latency_ms: float | None = None,
) -> Selection:
    """Resolve ``--trial`` / ``--pick`` and the constraints to one trial row (pure: no files)."""
    quality, latency = quality_metric(objectives), latency_metric(objectives, batch_sizes)
    constraints = {k: float(v) for k, v in (("max_drop", max_drop), ("max_size_mb", max_size_mb),
                                            ("max_latency_ms", max_latency_ms)) if v is not None}
    numbers = [int(r["number"]) for r in front]
    if (trial is None) == (pick is None):
        raise StudyError(f"give exactly one of --trial N or --pick {{{','.join(PICKS)}}} (got "
                         f"{'both' if trial is not None else 'neither'}); front trials: {numbers or 'none'}")
    if trial is not None:
        if constraints:
            raise StudyError(f"{', '.join('--' + k.replace('_', '-') for k in constraints)} choose(s) among the front "
                             f"with --pick; --trial {trial} exports that trial as asked. Drop the constraint or use --pick")
        return Selection(finished_trial(rows, trial), "trial", quality, latency, {}, [], numbers)
    if pick not in PICKS:
        raise StudyError(f"--pick {pick!r} is not a pick; use one of {', '.join(PICKS)}.{close_matches(str(pick), PICKS)}")
    if not front:
        raise StudyError("the study has no Pareto front yet (no finished, feasible trial with every objective "
                         "measured); run more trials, or export a finished trial with --trial N")
    base = baseline_metrics(baseline)
    for name, value in constraints.items():
        if name != "max_drop" and not value > 0:  # a negative drop is meaningful: "beat the baseline by"
            raise StudyError(f"--{name.replace('_', '-')} {value:g}: must be > 0")
    metrics = [r.get("metrics") or {} for r in front]
    checks = {
        "max_drop": ([_drop(m, base, quality) for m in metrics], f"{quality} drop (points below the baseline's "
                                                                  f"{_pct(base.get(quality))}, validation split)"),
        "max_size_mb": ([m.get("size_mb") for m in metrics], "size (MB)"),
        "max_latency_ms": ([m.get(latency) for m in metrics], f"{latency} (ms/example)"),
    }
    allowed = np.ones(len(front), dtype=bool)
    for name, limit in constraints.items():
        values = checks[name][0]
        allowed &= np.array([_finite(v) and float(v) <= limit + _SAME for v in values])
    if not allowed.any():
        parts = []
        for name, limit in constraints.items():
            values, what = checks[name]
            finite = [(float(v), n) for v, n in zip(values, numbers) if _finite(v)]
            best = min(finite) if finite else None
            parts.append(f"--{name.replace('_', '-')} {limit:g} on {what}: the best on the front is "
                         + (f"{best[0]:.4g} (trial {best[1]})" if best else "not measured"))
        raise StudyError(f"no front point meets the constraints ({len(front)} front trials: {numbers}). "
                         + "; ".join(parts) + ". Loosen the constraint(s), or export a specific trial with --trial N")
    if pick == "knee":
        values = objective_matrix(front, objectives)
        index = pick_index(values, [d for _, d in objectives], "knee", allowed=allowed)
    else:
        first = (quality, "maximize") if pick == "best-accuracy" else (latency, "minimize")
        columns = [first] + [o for o in objectives if o[0] != first[0]]
        index = pick_index(objective_matrix(front, columns), [d for _, d in columns], "best", allowed=allowed)
    if index is None:  # every allowed row has a missing value: front rows are complete, so this is a bug
        raise StudyError(f"--pick {pick}: no front trial has every objective measured")
    candidates = [n for n, ok in zip(numbers, allowed) if ok]
    return Selection(dict(front[index]), pick, quality, latency, constraints, candidates, numbers)


def _drop(metrics: Mapping[str, Any], base: Mapping[str, Any], metric: str) -> float | None:
    v, b = metrics.get(metric), base.get(metric)
    return (float(b) - float(v)) * 100.0 if _finite(v) and _finite(b) else None


def _pct(v: Any) -> str:
    return f"{float(v) * 100:.2f}" if _finite(v) else "?"


def missing_model_hint(study_dir: Path, row: Mapping[str, Any], *, keep_models: str) -> str:
    """Why a trial's model is not on disk and the commands that give it back."""
    n, name = row["number"], study_dir.name
    enqueue = json.dumps([{t: dict(p or {}) for t, p in (row.get("params") or {}).items()}], separators=(", ", ": "))
    results = "" if study_dir.parent == Path("results").resolve() else f" --results-dir {study_dir.parent}"
    why = {"front": "search.keep_models: front keeps only the front's models", "none": "search.keep_models: none",
           "all": "search.keep_models was all, so it was deleted or moved since"}.get(keep_models, keep_models)
    return (f"trial {n}'s model folder {study_dir / 'trials' / str(n)} is not there ({why}). The study holds its settings, not its "
            f"weights, and re-training is not guaranteed to reproduce them bit for bit, so autocompress does not "
            f"rebuild it silently. Run the same pipeline again as a one-trial study that keeps its model (from the "
            f"folder the search ran in):\n  autocompress search {study_dir / 'spec.resolved.yaml'}{results} "
            f"--set study={name}-trial{n} --set search.keep_models=all --set search.trials=1 "
            f"--set 'search.enqueue={enqueue}'\nthen export it with: autocompress export {name}-trial{n}{results} "
            f"--trial 0 --out DIR. (Setting search.keep_models=all before a search keeps every trial's model.)")


# --------------------------------------------------------------------------------------------- evaluation data


@dataclass
class EvalData:
    split: str
    evaluation: "Encoded"
    latency_sets: dict[int, "Encoded"]
    pad_token_id: int


def load_eval_data(spec: "Spec", tokenizer: Any, *, data_path: str | None = None) -> EvalData:
    """The study's held-out split and latency samples, chosen exactly as :func:`autocompress.engine.prepare`
    chooses them (same seed, same subsets), so figures measured here compare with the study's."""
    from .data import cache_root, encode, load_task_data
    from .engine import encode_latency_sets

    data_spec = spec.data if data_path is None else spec.data.model_copy(update={"path": data_path, "hub_id": None})
    data = load_task_data(data_spec, seed=spec.seed)
    cache = cache_root() / "tokenized"
    kw = {"max_length": spec.model.max_length, "cache_dir": cache}
    sets = encode_latency_sets(spec, data.evaluation, tokenizer, cache_dir=cache)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return EvalData(spec.data.eval_split, encode(data.evaluation, tokenizer, **kw), sets, pad)


# ----------------------------------------------------------------------------------------------------- export


def export_trial(
    study_dir: str | Path,
    out: str | Path,
    *,
    trial: int | None = None,
    pick: str | None = None,
    max_drop: float | None = None,
    max_size_mb: float | None = None,
    max_latency_ms: float | None = None,
    onnx: bool = False,
    data: str | None = None,
    verify: bool = True,
    force: bool = False,
    command: str = "",
    registry: "Registry | None" = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Write the export directory ``out`` for one trial of the study in ``study_dir``; return export.json.

    Everything is built in ``out.partial`` and renamed at the end, so an interrupted or failed export
    never leaves a half-written directory (nor replaces a previous one)."""
    from .model_card import model_card
    from .modeling import META_FILE, RECIPE_FILE, SIZE_FILES, load_tokenizer
    from .registry import load_registry
    from .results import load_results

    d = Path(study_dir)
    res = load_results(d)
    sel = select_trial(res.rows, res.front, res.baseline, res.objectives, batch_sizes=res.spec.measurement.batch_sizes,
                       trial=trial, pick=pick, max_drop=max_drop, max_size_mb=max_size_mb, max_latency_ms=max_latency_ms)
    row, n = sel.row, sel.row["number"]
    src = d / (row.get("model_dir") or f"trials/{n}")
    if not all((src / f).is_file() for f in SIZE_FILES):
        raise StudyError(missing_model_hint(d.resolve(), row, keep_models=res.spec.search.keep_models))
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise StudyError(f"--out {str(out)!r} exists and is not empty; choose a new folder, or pass --force to "
                             f"replace a previous export")
        if not (out / EXPORT_FILE).is_file():  # --force must never wipe a folder that is not ours
            raise StudyError(f"--out {str(out)!r} is not a previous export (no {EXPORT_FILE}), so --force will not "
                             f"replace it; choose a new folder")
    registry = registry or load_registry()
    if onnx:  # refuse an impossible ONNX export before spending time on the rest
        from .onnx_export import preflight

        preflight(json.loads((src / RECIPE_FILE).read_text()), registry)
    log(f"Exporting trial {n} ({' + '.join(row.get('pipeline') or []) or 'no technique'}), "
        f"chosen by {'--trial' if sel.how == 'trial' else '--pick ' + sel.how}")
    tmp = out.resolve().parent / (out.resolve().name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for f in (*SIZE_FILES, META_FILE):
            if (src / f).is_file():
                shutil.copy2(src / f, tmp / f)
        load_tokenizer(res.spec.model).save_pretrained(str(tmp))
        info = _build(d, tmp, res, sel, onnx=onnx, data=data, verify=verify, registry=registry, log=log)
        info["commands"] = {"search": res.command, "export": command}
        info["directory"] = str(out)
        _write(tmp / EXPORT_FILE, json.dumps(_jsonable(info), indent=2, allow_nan=False) + "\n")
        _write(tmp / CARD_FILE, model_card(info))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"Wrote {out}/ (README.md, export.json{', model.onnx' if info.get('onnx') else ''})")
    return info


def _build(d: Path, tmp: Path, res: Any, sel: Selection, *, onnx: bool, data: str | None, verify: bool,
           registry: "Registry", log: Callable[[str], None]) -> dict[str, Any]:
    """Reload from ``tmp``, verify, optionally export ONNX; return the export.json content."""
    from . import __version__
    from .measure import classification_metrics, predict, protocol
    from .modeling import load_compressed, param_count, resolve_model_path, saved_size_bytes
    from .pareto import relative_to_baseline

    row, spec = sel.row, res.spec
    model = load_compressed(tmp, registry=registry)  # the exported directory on its own rebuilds the model
    tokenizer = load_tokenizer_dir(tmp)
    base = baseline_metrics(res.baseline)
    metrics = dict(row.get("metrics") or {})
    info: dict[str, Any] = {
        "format": 1, "autocompress": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "study": spec.study, "study_dir": str(d.resolve()), "trial": row["number"],
        "selection": {"how": sel.how, "constraints": sel.constraints, "quality_metric": sel.quality_metric,
                      "latency_metric": sel.latency_metric, "candidates": sel.candidates, "front": sel.front,
                      "on_front": row["number"] in sel.front},
        "base_model": {"name": spec.model.name, "path": resolve_model_path(spec.model.name),
                       "max_length": spec.model.max_length},
        "labels": [model.config.id2label[i] for i in range(model.config.num_labels)],
        "data": {"source": spec.data.path or f"{spec.data.hub_id}:{spec.data.hub_config}",
                 "selection_split": f"validation carved from {spec.data.train_split}",
                 "reported_split": spec.data.eval_split},
        "pipeline": list(row.get("pipeline") or []), "params": row.get("params") or {},
        "metrics": metrics, "baseline": base, "relative": relative_to_baseline(metrics, base),
        "reloaded": {"params": param_count(model), "size_bytes": saved_size_bytes(tmp)},
        "device": row.get("device") or res.baseline.get("device"),
        "protocol": protocol(spec.measurement, device_description=str(res.baseline.get("device", "?")),
                             latency_examples=spec.measurement.latency_examples),
        "verification": None, "onnx": None,
    }
    if not (verify or onnx):
        info["verification"] = {"skipped": "--no-verify"}
        return info
    try:
        ev = load_eval_data(spec, tokenizer, data_path=data)
    except DataError as exc:
        if onnx:
            raise DataError(f"--onnx checks the ONNX model on the study's {spec.data.eval_split} split, which could not "
                            f"be loaded: {exc}. Pass --data PATH to point at the task data") from None
        log(f"warning: not verified: the study's data could not be loaded ({exc}); pass --data PATH to verify")
        info["verification"] = {"skipped": f"data not found: {exc}"}
        return info
    logits = predict(model, ev.evaluation, batch_size=64, pad_token_id=ev.pad_token_id)
    got = classification_metrics(logits, ev.evaluation.labels)["accuracy"]
    # A study measured in ONNX Runtime recorded ORT's accuracy as eval_accuracy; the reload is PyTorch's.
    recorded = metrics.get("pytorch_eval_accuracy", metrics.get("eval_accuracy"))
    diff = (got - float(recorded)) * 100 if _finite(recorded) else None
    info["verification"] = {"split": ev.split, "examples": len(ev.evaluation), "eval_accuracy": got,
                            "recorded_eval_accuracy": recorded, "reproduced": diff is not None and abs(diff) < _SAME}
    if diff is not None and abs(diff) >= _SAME:
        where = str(row.get("device") or "")
        message = (f"the exported model scores {got * 100:.2f} on {ev.split} ({len(ev.evaluation)} examples) but trial "
                   f"{row['number']} recorded {float(recorded) * 100:.2f}")
        if abs(diff) > 0.5 and where.startswith("cpu"):
            raise ModelError(message + "; the model does not reload as it was measured, or the data changed since the "
                                       "search (check data.path, or --data). Pass --no-verify to export anyway")
        log(f"warning: {message} ({diff:+.2f} points: small enough to come from other kernels or another CPU than "
            f"the search's {where or 'device'}; see export.json 'verification')")
    else:
        log(f"Verified: the exported model reproduces the recorded {ev.split} accuracy {got * 100:.2f}")
    if onnx:
        info["onnx"] = _onnx(tmp, model, ev, logits, spec, registry, log)
    return info


def _onnx(tmp: Path, model: Any, ev: EvalData, logits: np.ndarray, spec: "Spec", registry: "Registry",
          log: Callable[[str], None]) -> dict[str, Any]:
    import torch

    from .onnx_export import ONNX_FILE, check_and_time, example_batch, export_graph

    torch.set_num_threads(spec.measurement.threads or os.cpu_count() or 1)  # the study's timing protocol
    example = example_batch(ev.evaluation, pad_token_id=ev.pad_token_id)
    info = export_graph(tmp, tmp / ONNX_FILE, registry=registry, example=example, log=log)
    m = spec.measurement
    info.update(check_and_time(tmp / ONNX_FILE, torch_model=model, evaluation=ev.evaluation, reference_logits=logits,
                               latency_sets=ev.latency_sets, warmup=m.warmup, repeats=m.repeats,
                               pad_token_id=ev.pad_token_id, split=ev.split, dynamic_int8=bool(info.get("int8")),
                               log=log))
    return info


def _write(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------------------------------- predict


def load_tokenizer_dir(path: str | Path) -> Any:
    """The tokenizer saved in an export directory, or a ModelError that says how to get one."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # noqa: BLE001 - no tokenizer files, or broken ones
        raise ModelError(f"{str(path)!r} has no usable tokenizer ({type(exc).__name__}: {str(exc)[:200]}); export the "
                         f"model with 'autocompress export', which saves the study's tokenizer next to it") from None


class Predictor:
    """A compressed classifier with its tokenizer: texts (or ``(text, text)`` pairs) in, labels out.

    Tokenised and batched exactly as during the search (same truncation length, dynamic padding)."""

    def __init__(self, model: Any, tokenizer: Any, *, max_length: int, device: str = "cpu") -> None:
        self.model, self.tokenizer, self.max_length, self.device = model, tokenizer, int(max_length), device
        config = model.config
        self.labels = [str(config.id2label[i]) for i in range(config.num_labels)]

    @classmethod
    def load(cls, path: str | Path, *, device: str = "cpu", registry: "Registry | None" = None) -> "Predictor":
        from .modeling import META_FILE, load_compressed

        d = Path(path)
        model = load_compressed(d, device=device, registry=registry)
        tokenizer = load_tokenizer_dir(d)
        meta = json.loads((d / META_FILE).read_text()) if (d / META_FILE).is_file() else {}
        max_length = meta.get("max_length") or getattr(tokenizer, "model_max_length", 512)
        return cls(model, tokenizer, max_length=min(int(max_length), 100_000), device=device)

    def logits(self, texts: Sequence[str | tuple[str, str]], *, batch_size: int = 32) -> np.ndarray:
        from .data import Split, encode
        from .measure import predict

        rows = [(t,) if isinstance(t, str) else tuple(t) for t in texts]
        if len({len(r) for r in rows}) > 1:
            raise ValueError("give all single texts or all (text, text) pairs, not a mix")
        enc = encode(Split(rows, [0] * len(rows)), self.tokenizer, max_length=self.max_length, cache_dir=None)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        return predict(self.model, enc, batch_size=batch_size, device=self.device, pad_token_id=pad)

    def __call__(self, texts: Sequence[str | tuple[str, str]], *, batch_size: int = 32) -> list[tuple[str, float]]:
        """``(label, probability)`` per text, the label with the highest probability."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            return []
        z = self.logits(texts, batch_size=batch_size).astype(np.float64)
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        return [(self.labels[int(i)], float(row[int(i)])) for row, i in zip(p, p.argmax(axis=1))]
