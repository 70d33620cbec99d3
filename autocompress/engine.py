"""The trial machinery: data and baseline prepared once per study, then one function per trial.

A trial: sampled params -> pipeline of enabled techniques in stage order -> applied to a copy of the
fine-tuned baseline -> recovery fine-tuning with the techniques' training hooks -> post-training
transforms -> saved (safetensors + recipe) -> measured exactly like the baseline.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from .baseline import _hash, _step_reporter, baseline_location, get_baseline  # noqa: F401 - engine's API too
from .data import cache_root
from .registry import Registry
from .spec import Spec
from .technique import TechniqueContext

if TYPE_CHECKING:
    from torch import nn

    from .data import Encoded, TaskData

# ``ctx.fine_tune`` runs this long or longer report their progress (a trial's recovery is a few hundred steps).
LONG_FINE_TUNE_STEPS = 1000


def _subset_encoded(enc: "Encoded", index: Any) -> "Encoded":
    from .data import Encoded

    tt = None if enc.token_type_ids is None else [enc.token_type_ids[i] for i in index]
    return Encoded([enc.input_ids[i] for i in index], tt, enc.labels[index], 0)


@dataclass
class Prepared:
    """Everything a study computes once and every trial reuses."""

    spec: Spec
    registry: Registry
    device: str
    data: "TaskData"
    tokenizer: Any
    train: "Encoded"
    validation: "Encoded"
    evaluation: "Encoded"
    latency_sets: dict[int, "Encoded"]
    baseline: "nn.Module"
    baseline_dir: Path
    baseline_key: str
    pad_token_id: int
    notes: list[str] = field(default_factory=list)
    # Where a technique's one-time preparation reports (``ctx.log`` and the progress of ``ctx.fine_tune``): a
    # pre-distilled student takes tens of minutes, which a search must not spend in silence.
    log: Callable[[str], None] | None = None
    _teacher: Any = None
    _memo: dict[str, Any] = field(default_factory=dict)

    # -- technique context ------------------------------------------------------------------------------
    def technique_context(self, *, log: Callable[[str], None] | None = None) -> TechniqueContext:
        sink = log or self.log  # one sink for a technique's own lines and its long fine-tunes' progress
        return TechniqueContext(
            device=self.device,
            seed=self.spec.seed,
            train_batches=self._train_batches,
            teacher=self._get_teacher,
            cache=self._cached,
            teacher_logits=self._teacher_logits,
            log=sink,
            fine_tune=functools.partial(self._context_fine_tune, log=sink),
            training_key=json.dumps({k: v for k, v in self.spec.recovery.model_dump(mode="json").items()
                                     if k != "steps"} | {"seed": self.spec.seed}, sort_keys=True),
        )

    def recovery_fine_tune(self, model: "nn.Module", *, steps: int, hooks: list,
                           learning_rate: float | None = None,
                           on_step: Callable[[int, int, float], None] | None = None) -> dict[str, Any]:
        """The recovery trainer: a trial's recovery training, and ``TechniqueContext.fine_tune``."""
        from .train import fine_tune

        r = self.spec.recovery
        return fine_tune(model, self.train, steps=steps, batch_size=r.batch_size,
                         learning_rate=r.learning_rate if learning_rate is None else learning_rate,
                         warmup_ratio=r.warmup_ratio, seed=self.spec.seed, device=self.device, hooks=hooks,
                         pad_token_id=self.pad_token_id, group_by_length=r.group_by_length,
                         micro_batches=r.micro_batches, on_step=on_step)

    def _context_fine_tune(self, model: "nn.Module", *, steps: int, hooks: list, learning_rate: float | None = None,
                           log: Callable[[str], None] | None = None) -> dict[str, Any]:
        """``TechniqueContext.fine_tune``: the recovery trainer, with step progress in ``log`` for long runs (a
        technique's one-time preparation, such as a pre-distilled student; a trial's few hundred steps stay quiet)."""
        long_run = log is not None and steps >= LONG_FINE_TUNE_STEPS
        return self.recovery_fine_tune(model, steps=steps, hooks=hooks, learning_rate=learning_rate,
                                       on_step=_step_reporter(log, steps) if long_run else None)

    def _teacher_logits(self, batch: Mapping[str, Any]) -> Any:
        """Teacher logits per training example, computed once per baseline and kept on disk: each example
        is scored the first time any trial meets it, so distillation adds no teacher forward pass in later
        trials (recovery batches repeat across trials: same seed, same order)."""
        import torch
        from safetensors.torch import load_file

        index = batch.get("example_index")
        if index is None:
            teacher = self._get_teacher()
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
            with torch.no_grad():
                return teacher(**inputs).logits
        table = self._memo.get("teacher_logits")
        path = self.baseline_dir / "cache" / "teacher_logits.safetensors"
        if table is None:
            if path.is_file():
                table = load_file(str(path))
            else:
                n, k = len(self.train), len(self.data.label_names)
                table = {"logits": torch.zeros(n, k), "filled": torch.zeros(n, dtype=torch.bool)}
            self._memo["teacher_logits"] = table
        idx = index.detach().cpu().long()
        missing = idx[~table["filled"][idx]]
        if len(missing):
            from .measure import predict

            sub = _subset_encoded(self.train, missing.numpy())
            logits = predict(self._get_teacher(), sub, batch_size=64, device=self.device, pad_token_id=self.pad_token_id)
            table["logits"][missing] = torch.from_numpy(logits).float()
            table["filled"][missing] = True
            self._memo["teacher_logits_dirty"] = True
        return table["logits"][idx].to(self.device)

    def flush(self) -> None:
        """Persist caches filled during a trial (teacher logits)."""
        from safetensors.torch import save_file

        if self._memo.pop("teacher_logits_dirty", False):
            path = self.baseline_dir / "cache" / "teacher_logits.safetensors"
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            save_file(self._memo["teacher_logits"], str(tmp))
            os.replace(tmp, path)  # atomic: concurrent workers never read half a file

    def _train_batches(self, n: int):
        from .data import batches

        def gen():
            it = batches(self.train, batch_size=self.spec.recovery.batch_size, device=self.device, shuffle=True,
                         seed=self.spec.seed, pad_token_id=self.pad_token_id)
            for i, b in enumerate(it):
                if i >= n:
                    return
                yield b

        return gen()

    def _get_teacher(self) -> "nn.Module":
        if self._teacher is None:
            teacher = copy.deepcopy(self.baseline).eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
            self._teacher = teacher
        return self._teacher

    def _cached(self, key: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Tensors computed once per baseline and key, kept in memory and on disk (safetensors)."""
        from safetensors.torch import load_file, save_file

        if key in self._memo:
            return self._memo[key]
        path = self.baseline_dir / "cache" / f"{_hash(key)}.safetensors"
        if path.is_file():
            value = load_file(str(path), device=str(self.device))
        else:
            value = compute()
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            save_file({k: v.detach().contiguous().cpu() for k, v in value.items()}, str(tmp), metadata={"key": key})
            os.replace(tmp, path)  # atomic: a worker never reads another worker's half-written file
        self._memo[key] = value
        return value


# ----------------------------------------------------------------------------------------------------------
# Preparation: data, tokenisation, baseline
# ----------------------------------------------------------------------------------------------------------


def prepare(spec: Spec, registry: Registry, *, log: Callable[[str], None] = print, device: str | None = None,
            threads: int | None = None) -> Prepared:
    """Data, tokenisation and the fine-tuned baseline, once per process. ``device``/``threads`` override
    measurement.device/threads for one worker (``--workers``: one GPU each, a share of the CPU cores)."""
    import torch

    from .data import encode, load_task_data
    from .modeling import load_tokenizer, pick_device

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress lines say what is happening
    device = pick_device(device or spec.measurement.device)
    torch.set_num_threads(threads or spec.measurement.threads or os.cpu_count() or 1)
    data = load_task_data(spec.data, seed=spec.seed)
    tokenizer = load_tokenizer(spec.model)
    cache = cache_root() / "tokenized"
    kw = {"max_length": spec.model.max_length, "cache_dir": cache}
    train, validation, evaluation = (encode(s, tokenizer, **kw) for s in (data.train, data.validation, data.evaluation))
    notes = list(data.notes)
    for label, enc in (("train", train), ("validation", validation), ("evaluation", evaluation)):
        if enc.truncated:
            notes.append(f"{enc.truncated} of {len(enc)} {label} examples were truncated to model.max_length="
                         f"{spec.model.max_length} tokens (the rest of those texts is not seen); raise "
                         "model.max_length to keep more of long texts")
    latency_sets = encode_latency_sets(spec, data.evaluation, tokenizer, cache_dir=cache)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    baseline, bdir, key = get_baseline(spec, data, train, tokenizer=tokenizer, device=device, pad_token_id=pad, log=log,
                                       validation=validation)
    return Prepared(spec, registry, device, data, tokenizer, train, validation, evaluation, latency_sets,
                    baseline, bdir, key, pad, notes, log=log)


def encode_latency_sets(spec: Spec, evaluation: Any, tokenizer: Any, *, cache_dir: Path) -> dict[int, "Encoded"]:
    """The examples timed at each batch size: a fixed (seeded) sample of the held-out split. Export uses the
    same function, so figures it measures compare with the study's."""
    from .data import encode

    m = spec.measurement
    split = evaluation.subset(m.latency_examples, seed=spec.seed)
    return {bs: encode(split.subset(min(len(split), bs * m.max_batches), seed=spec.seed), tokenizer,
                       max_length=spec.model.max_length, cache_dir=cache_dir)
            for bs in m.batch_sizes}


# ----------------------------------------------------------------------------------------------------------
# Measurement shared by baseline and trials
# ----------------------------------------------------------------------------------------------------------


def measure(model: "nn.Module", prep: Prepared, *, save_dir: Path, base_config: Mapping[str, Any],
            recipe: list[dict[str, Any]], flops: float | None = None,
            latency_repeats: int | None = None) -> dict[str, Any]:
    from .measure import evaluate, flops_per_example
    from .modeling import param_count, save_compressed

    m = prep.spec.measurement
    model.eval()
    size = save_compressed(model, save_dir, base_config=base_config, recipe=recipe,
                           meta={"labels": prep.data.label_names, "max_length": prep.spec.model.max_length})
    metrics: dict[str, Any] = {}
    val = evaluate(model, prep.validation, device=prep.device, pad_token_id=prep.pad_token_id)
    ev = evaluate(model, prep.evaluation, device=prep.device, pad_token_id=prep.pad_token_id)
    metrics.update(val)
    metrics.update({f"eval_{k}": v for k, v in ev.items()})
    metrics.update(latency_metrics(model, prep, device=prep.device, repeats=latency_repeats))
    metrics["size_mb"] = size / 1e6
    metrics["size_bytes"] = size
    metrics["params"] = param_count(model)
    first = next(iter(prep.latency_sets.values()))
    metrics["flops"] = flops if flops is not None else flops_per_example(model, first, device=prep.device, pad_token_id=prep.pad_token_id)
    if m.runtime == "onnxruntime":
        measure_onnxruntime(save_dir, prep, metrics)
    return metrics


def latency_metrics(model: Any, prep: Prepared, *, device: str, repeats: int | None = None) -> dict[str, Any]:
    """``latency_bs{N}`` (median ms/example) and its spread for every configured batch size, with the study's
    protocol on its fixed latency sample: one definition for trials, the baseline, ONNX Runtime and peers.
    ``repeats`` overrides ``measurement.repeats`` (the baseline's timing takes more)."""
    from .measure import latency_ms_per_example

    m, out = prep.spec.measurement, {}
    for bs, enc in prep.latency_sets.items():
        lat = latency_ms_per_example(model, enc, batch_size=bs, device=device, warmup=m.warmup,
                                     repeats=m.repeats if repeats is None else repeats, pad_token_id=prep.pad_token_id)
        out[f"latency_bs{bs}"], out[f"latency_bs{bs}_spread"] = lat["median"], [lat["min"], lat["max"]]
    return out


def measure_onnxruntime(model_dir: Path, prep: Prepared, metrics: dict[str, Any]) -> None:
    """``measurement.runtime: onnxruntime``: export the saved model to ONNX (int8 with ONNX Runtime's own
    kernels) and measure accuracy and latency *in ONNX Runtime*; those become the trial's objectives, and the
    PyTorch figures stay under ``pytorch_*`` so the report can show both. A model that cannot be exported
    fails the trial with the technique's reason: its latency would be from another runtime."""
    import torch

    from .errors import SpecError
    from .measure import evaluate
    from .onnx_export import OrtClassifier, example_batch, export_graph, missing_dependencies
    from .timing import add_compute

    missing = missing_dependencies()
    if missing:
        raise SpecError(f"measurement.runtime 'onnxruntime' needs {', '.join(missing)}: pip install "
                        "'autocompress[onnx]', or set measurement.runtime: pytorch")
    for key in [k for k in metrics if k.startswith("latency_bs") or k in ("accuracy", "f1", "mcc")
                or k.startswith("eval_")]:
        metrics[f"pytorch_{key}"] = metrics[key]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        started = time.perf_counter()
        info = export_graph(model_dir, path, registry=prep.registry, int8_mode="ort", log=lambda s: None,
                            example=example_batch(prep.evaluation, pad_token_id=prep.pad_token_id))
        metrics["onnx_export_seconds"] = time.perf_counter() - started
        session = OrtClassifier(path, threads=torch.get_num_threads())
        started = time.perf_counter()  # ONNX Runtime's forward passes are compute too (no module hooks see them)
        metrics.update(evaluate(session, prep.validation, pad_token_id=prep.pad_token_id))
        metrics.update({f"eval_{k}": v for k, v in evaluate(session, prep.evaluation,
                                                             pad_token_id=prep.pad_token_id).items()})
        add_compute(time.perf_counter() - started)
        threads = session.threads
        del session  # timed in a fresh process: PyTorch's work in this one slows ONNX Runtime (bench_timing)
        from .bench_timing import time_onnx_alone

        m = prep.spec.measurement
        lat = time_onnx_alone(path, prep.latency_sets, warmup=m.warmup, repeats=m.repeats,
                              pad_token_id=prep.pad_token_id, threads=threads)
        metrics.update(lat)
        # The passes are compute; starting the timing process is not (the engine's overhead).
        add_compute(sum(lat[f"latency_bs{bs}"] * len(enc) * (m.warmup + m.repeats) / 1000.0
                        for bs, enc in prep.latency_sets.items()))
        metrics["onnx_size_mb"] = path.stat().st_size / 1e6
    metrics["runtime"] = f"onnxruntime ({(info.get('int8') or {}).get('kernels', 'fp32')})"


# The baseline is timed once and every latency ratio of the study (speed-ups, hypervolume, the joint seeds'
# gains) divides by it, so a burst of noise there moves them all: a 5-pass timing read 10.13 ms/ex where the same
# model took 8.60 two minutes later (session 18). More passes make its median harder to move, for ~1 min more.
BASELINE_REPEATS_FACTOR = 3


def measure_baseline(prep: Prepared) -> dict[str, Any]:
    """The baseline's metrics, with ``BASELINE_REPEATS_FACTOR`` times the study's timed passes."""
    from .modeling import config_snapshot

    with tempfile.TemporaryDirectory() as tmp:
        return measure(prep.baseline, prep, save_dir=Path(tmp), base_config=config_snapshot(prep.baseline), recipe=[],
                       latency_repeats=BASELINE_REPEATS_FACTOR * prep.spec.measurement.repeats)


# ----------------------------------------------------------------------------------------------------------
# One trial
# ----------------------------------------------------------------------------------------------------------


def run_trial(prep: Prepared, pipeline: Mapping[str, Mapping[str, Any]], *, save_dir: Path,
              log: Callable[[str], None] | None = None, recovery_steps: int | None = None) -> dict[str, Any]:
    """Run one pipeline (``{technique: params}`` in order) and return its metrics; ``recovery_steps``
    overrides ``recovery.steps`` (multi-fidelity screening)."""
    from .measure import flops_per_example
    from .modeling import config_snapshot
    from .pipeline import run_pipeline
    from .timing import compute_clock, excluded

    started = time.perf_counter()
    spec, registry = prep.spec, prep.registry
    model = copy.deepcopy(prep.baseline)
    base_config = config_snapshot(model)
    ctx = prep.technique_context(log=log)
    steps = [(registry.get(name), dict(params)) for name, params in pipeline.items()]
    first = next(iter(prep.latency_sets.values()))
    counted: dict[str, float] = {}

    def train(m: "nn.Module", hooks: list) -> dict[str, Any]:
        n = spec.recovery.steps if recovery_steps is None else recovery_steps
        if n <= 0:
            return {"steps": 0}
        return prep.recovery_fine_tune(m, steps=n, hooks=hooks)

    def count_flops(m: "nn.Module") -> None:
        with excluded():
            counted["flops"] = flops_per_example(m, first, device=prep.device, pad_token_id=prep.pad_token_id)

    # The clock splits the trial's wall time into model compute and the engine's overhead (issue: <= 10%).
    with compute_clock(model, prep.baseline) as clock:
        try:
            result = run_pipeline(model, steps, ctx=ctx, train=train, before_finalize=count_flops, device=prep.device)
        finally:
            prep.flush()
        metrics = measure(model, prep, save_dir=save_dir, base_config=base_config, recipe=result.recipe,
                          flops=counted["flops"])
    metrics["recovery_steps"] = result.train_stats["steps"]
    metrics["train_seconds"] = result.train_stats.get("seconds", 0.0)
    metrics["trial_seconds"] = time.perf_counter() - started
    metrics["compute_seconds"] = clock.seconds
    metrics["overhead_share"] = max(0.0, 1.0 - clock.seconds / metrics["trial_seconds"]) if metrics["trial_seconds"] else None
    return metrics
