"""The bench's timings after the searches: the joint front exported to ONNX Runtime, then the *final timing*,
where every joint front point (PyTorch, and ONNX Runtime where it exports) and every peer is timed again and
the speed targets are read from it.

Two things made the bench's ONNX Runtime figures move up to 2x between runs of the same command (session 12),
and the final timing answers each:
- **One process, two runtimes.** The export timed ONNX Runtime and PyTorch back to back in the process that had
  run the searches. Timed again in session 13, the session-12 int8 front points took 7-8.5 ms/example at batch
  32 in ONNX Runtime when PyTorch models were timed in the same process, 3.0-4.0 in a process that ran only ONNX
  Runtime (three such processes agreed within ~10%). So each runtime is timed in its own fresh process.
- **Slow spells.** On a shared 2-vCPU VM the machine slows for seconds to a minute at a time (the same ONNX
  file: 1.4-1.7 ms/example in most fresh sessions, 3.2-3.9 in a few consecutive ones, with every model slowed
  at once). A model timed in one stretch takes whatever spell it falls in. So each round times every model
  once, in an order rotated each round, and a model's figure is the median of its rounds: a spell shifts one
  round of every model rather than all rounds of one.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:
    from .data import Encoded
    from .registry import Registry

FRONT_DIR = "_front"  # under the bench's studies/: the joint front's exports (ONNX and PyTorch), rebuilt each run
PEERS_DIR = "_peers"


def rotation(names: Sequence[str], round_: int) -> list[str]:
    """``names`` rotated left by ``round_``, so each model takes every position of a round in turn."""
    names = list(names)
    if not names:
        return []
    k = round_ % len(names)
    return names[k:] + names[:k]


def summarise_passes(passes: Mapping[int, Sequence[float]]) -> dict[str, Any]:
    """``latency_bs{N}`` (median ms/example of the rounds), its ``_spread`` [min, max] and the ``_passes``."""
    out: dict[str, Any] = {}
    for bs, values in passes.items():
        v = [float(x) for x in values]
        out[f"latency_bs{bs}"] = statistics.median(v)
        out[f"latency_bs{bs}_spread"] = [min(v), max(v)]
        out[f"latency_bs{bs}_passes"] = v
    return out


def interleaved_latency(models: Mapping[str, Any], latency_sets: Mapping[int, "Encoded"], *, rounds: int,
                        pad_token_id: int, warmup: int = 1, timer: Callable[..., Mapping[str, float]] | None = None,
                        fresh: bool = False) -> dict[str, dict[str, Any]]:
    """Time every model of ``models`` (``{name: model}``; a PyTorch module or an ONNX Runtime session behind
    the same call) on each latency set, one pass per model and batch size per round, in ``rounds`` rounds whose
    order is rotated; ``warmup`` untimed passes per model first. Returns :func:`summarise_passes` per model.

    ``fresh``: the values are zero-argument factories, called for every round's pass (with its own warm-up) and
    dropped after it, so only one model exists at a time. ONNX Runtime needs this: each session owns a thread
    pool, and with a dozen sessions alive the same graph timed 3.2 or 6.6 ms/example round by round (session 13)."""
    if rounds < 1:
        raise ValueError(f"rounds={rounds}: time at least one round")
    if timer is None:
        from .measure import latency_ms_per_example as timer
    kw = {"device": "cpu", "pad_token_id": pad_token_id}

    def warm(model: Any) -> None:
        for bs, enc in latency_sets.items():
            timer(model, enc, batch_size=bs, warmup=0, repeats=warmup, **kw)

    if warmup and not fresh:
        for model in models.values():
            warm(model)
    passes: dict[str, dict[int, list[float]]] = {name: {bs: [] for bs in latency_sets} for name in models}
    for r in range(rounds):
        for name in rotation(list(models), r):
            model = models[name]() if fresh else models[name]
            if warmup and fresh:
                warm(model)
            for bs, enc in latency_sets.items():
                passes[name][bs].append(timer(model, enc, batch_size=bs, warmup=0, repeats=1, **kw)["median"])
            del model
    return {name: summarise_passes(p) for name, p in passes.items()}


# ----------------------------------------------------------------------------------------------------------
# The joint front in ONNX Runtime
# ----------------------------------------------------------------------------------------------------------


FUSED_FILE = "model-ort-int8.onnx"  # beside model.onnx: the same model with ONNX Runtime's own int8 kernels


def time_front_in_onnxruntime(d: Path, points: list[dict[str, Any]], *, registry: "Registry", data: str | None,
                              log: Callable[[str], None]) -> None:
    """Export each front point of the study in ``d`` to ``d.parent/_front/trial<N>/`` (model and ONNX graph,
    parity-checked) and add its ONNX Runtime ms/example under ``point["onnxruntime"]``, or the reason it could
    not be exported. The exports stay for :func:`final_timing`.

    A point with int8 Linears is also exported with ONNX Runtime's own int8 kernels (``DynamicQuantizeLinear``
    + ``MatMulInteger``, fused by its optimiser, as in the ONNX Runtime int8 peer) to ``model-ort-int8.onnx``:
    what a user deploying to ONNX Runtime would run. It quantises activations to 8 bits where fbgemm uses 7,
    so it is a slightly different model: its held-out accuracy is measured in ONNX Runtime and goes under
    ``point["onnxruntime_fused"]``."""
    from .errors import AutocompressError
    from .export import export_trial, load_eval_data
    from .measure import evaluate
    from .modeling import load_tokenizer
    from .onnx_export import OrtClassifier, example_batch, export_graph
    from .results import load_results

    root = d.parent / FRONT_DIR
    shutil.rmtree(root, ignore_errors=True)  # ours: rebuilt from the study on every run
    root.mkdir(parents=True)
    ev = None
    for p in points:
        target = root / f"trial{p['trial']}"
        try:
            export_trial(d, target, trial=p["trial"], onnx=True, data=data, log=lambda s: None, registry=registry)
            info = json.loads((target / "export.json").read_text())["onnx"]
            p["onnxruntime"] = {**info["latency_ms_per_example"]["onnxruntime"],
                                "agreement": info["parity"]["agreement"]}
            p["pytorch_at_export"] = info["latency_ms_per_example"]["pytorch"]
        except AutocompressError as exc:
            p["onnxruntime"] = {"not_exported": str(exc)[:300]}
            log(f"  ONNX Runtime, {p['label']}: {p['onnxruntime']}")
            continue
        if info.get("int8"):
            if ev is None:
                spec = load_results(d).spec
                ev = load_eval_data(spec, load_tokenizer(spec.model), data_path=data)
            fused = target / FUSED_FILE
            try:
                export_graph(target, fused, registry=registry, int8_mode="ort", log=lambda s: None,
                             example=example_batch(ev.evaluation, pad_token_id=ev.pad_token_id))
                acc = evaluate(OrtClassifier(fused, threads=os.cpu_count() or 1), ev.evaluation, pad_token_id=ev.pad_token_id)
                p["onnxruntime_fused"] = {"eval_accuracy": acc["accuracy"], "size_mb": fused.stat().st_size / 1e6}
            except AutocompressError as exc:
                p["onnxruntime_fused"] = {"not_exported": str(exc)[:300]}
        log(f"  ONNX Runtime, {p['label']}: {p['onnxruntime']}"
            + (f"; with ONNX Runtime's int8 kernels: {p['onnxruntime_fused']}" if "onnxruntime_fused" in p else ""))


# ----------------------------------------------------------------------------------------------------------
# Final timing
# ----------------------------------------------------------------------------------------------------------


def timing_plan(studies: Path, joint_study: str, points: Sequence[Mapping[str, Any]], peers: Mapping[str, Any], *,
                onnx: bool = True) -> dict[str, list[tuple[str, str, str]]]:
    """What the final timing loads, per runtime: ``{runtime: [(name, kind, path)]}`` from the files the run saved
    (the peers' folder, the joint study's trial models, the front's ONNX exports). Pure apart from ``is_file``."""
    peer_dir, d = studies / PEERS_DIR, studies / joint_study
    torch_block: list[tuple[str, str, str]] = []
    ort_block: list[tuple[str, str, str]] = []
    if "pytorch_fp32" in peers and (peer_dir / "baseline-fp32").is_dir():
        torch_block.append(("peer pytorch_fp32", "saved", str(peer_dir / "baseline-fp32")))
        if "pytorch_int8" in peers:
            torch_block.append(("peer pytorch_int8", "saved+torch_int8", str(peer_dir / "baseline-fp32")))
    for key, file in (("onnxruntime_fp32", "baseline-fp32.onnx"), ("onnxruntime_int8", "baseline-int8.onnx")):
        if onnx and key in peers and (peer_dir / file).is_file():
            ort_block.append((f"peer {key}", "onnx", str(peer_dir / file)))
    for p in points:
        n = p["trial"]
        torch_block.append((f"joint {n} pytorch", "saved", str(d / (p.get("model_dir") or f"trials/{n}"))))
        for runtime, file in (("onnxruntime", "model.onnx"), ("onnxruntime_fused", FUSED_FILE)):
            onnx_file = studies / FRONT_DIR / f"trial{n}" / file
            if onnx and onnx_file.is_file():
                ort_block.append((f"joint {n} {runtime}", "onnx", str(onnx_file)))
    return {k: v for k, v in (("pytorch", torch_block), ("onnxruntime", ort_block)) if v}


def worker_affinities(cpus: Sequence[int], threads: int) -> str | None:
    """ONNX Runtime's ``session.intra_op_thread_affinities`` for a pool of ``threads`` whose calling thread runs on
    ``cpus[0]``: worker k on ``cpus[k]`` (ONNX Runtime numbers processors from 1). None when there are too few."""
    cpus = sorted(cpus)
    if threads < 2 or len(cpus) < threads:
        return None
    return ";".join(str(c + 1) for c in cpus[1:threads])


def pin_onnxruntime_threads(threads: int) -> str | None:
    """Pin this (timing) process's calling thread to its first allowed CPU and return the affinities that put each
    ONNX Runtime worker on a CPU of its own. Unpinned, a fresh session ran fast or ~1.5x slower for its whole
    life, by where the OS placed its worker. ONNX Runtime int8 of the baseline, batches of 32 x 24 tokens, 16
    sessions each (session 14, 2-core EPYC): unpinned 1.13-1.74 ms/example, 5 of 16 sessions in the slow mode;
    pinned 1.14-1.27, none; 4.0 with the worker left on the calling thread's CPU. Through this module (8 timing
    processes of 3 sessions each, the peer's 256 sentences) the medians were alike pinned or not (2.0-2.3 ms/ex
    at bs32), with one pinned process at 2.8: pinning removes one cause of spread, not all."""
    if not hasattr(os, "sched_setaffinity"):
        return None  # macOS, Windows: no pinning, as before
    allowed = sorted(os.sched_getaffinity(0))
    spec = worker_affinities(allowed, threads)
    if spec is not None:
        os.sched_setaffinity(0, {allowed[0]})  # this thread only; the workers get theirs from ONNX Runtime
    return spec


def _load(kind: str, path: str, *, threads: int, registry: "Registry", affinities: str | None = None) -> Any:
    if kind == "onnx":
        from .onnx_export import OrtClassifier

        return OrtClassifier(path, threads=threads, thread_affinities=affinities)
    from .modeling import load_compressed

    model = load_compressed(path, registry=registry).cpu().eval()
    if kind == "saved+torch_int8":  # the PyTorch int8 peer: torch's own recipe on the fp32 baseline
        import torch
        from torch import nn

        model = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    return model


def time_block(task: Mapping[str, Any]) -> dict[str, Any]:
    """One runtime's block of the final timing, run in a fresh process: load the models of ``task["models"]``
    and time them with :func:`interleaved_latency`. Returns ``{"figures": {name: ...}, "skipped": {name: why}}``."""
    import torch

    from .registry import load_registry

    registry = load_registry(extra_plugins=task.get("plugins") or ())
    models, skipped = {}, {}
    # ONNX Runtime sessions are created afresh for every pass (one alive at a time: see interleaved_latency);
    # PyTorch models share one thread pool, so they are loaded once.
    fresh = bool(task["models"]) and all(kind == "onnx" for _, kind, _ in task["models"])
    # In an ONNX Runtime block torch only moves batches: one thread, so no idle torch pool competes for the cores.
    torch.set_num_threads(1 if fresh else int(task["threads"]))
    affinities = pin_onnxruntime_threads(int(task["threads"])) if fresh else None
    # Every model is loaded once up front, so one that does not load is reported and left out rather than failing
    # the block mid-round; in an ONNX Runtime block that costs one extra session build per model, dropped at once.
    for name, kind, path in task["models"]:
        try:
            model = _load(kind, path, threads=int(task["threads"]), registry=registry,  # loads: or say why not
                          affinities=affinities)
            models[name] = (lambda kind=kind, path=path: _load(kind, path, threads=int(task["threads"]),
                                                              registry=registry, affinities=affinities)) if fresh else model
            del model
        except Exception as exc:  # noqa: BLE001 - a model that does not load keeps its search-time figures
            skipped[name] = f"{type(exc).__name__}: {str(exc)[:200]}"
    figures = interleaved_latency(models, task["latency_sets"], rounds=int(task["rounds"]),
                                  pad_token_id=int(task["pad_token_id"]), warmup=int(task.get("warmup", 1)),
                                  fresh=fresh)
    return {"figures": figures, "skipped": skipped}


def save_latency_sets(path: Path, sets: Mapping[int, "Encoded"]) -> None:
    """The latency samples as plain arrays in one ``.npz`` (ragged rows concatenated, with their lengths): no
    pickles cross to the timing process."""
    arrays: dict[str, np.ndarray] = {}
    for bs, enc in sets.items():
        arrays[f"{bs}_lengths"] = np.asarray([len(x) for x in enc.input_ids], dtype=np.int64)
        arrays[f"{bs}_ids"] = np.concatenate(enc.input_ids) if len(enc) else np.zeros(0, np.int32)
        if enc.token_type_ids is not None:
            arrays[f"{bs}_types"] = np.concatenate(enc.token_type_ids) if len(enc) else np.zeros(0, np.int32)
        arrays[f"{bs}_labels"] = np.asarray(enc.labels)
    np.savez(path, **arrays)


def load_latency_sets(path: Path) -> dict[int, "Encoded"]:
    from .data import Encoded

    with np.load(path, allow_pickle=False) as z:
        keys = set(z.files)
        out: dict[int, Encoded] = {}
        for bs in sorted({int(k.split("_")[0]) for k in keys}, reverse=True):
            cuts = np.cumsum(z[f"{bs}_lengths"])[:-1]
            ids = np.split(z[f"{bs}_ids"], cuts)
            types = np.split(z[f"{bs}_types"], cuts) if f"{bs}_types" in keys else None
            out[bs] = Encoded(input_ids=ids, token_type_ids=types, labels=z[f"{bs}_labels"], truncated=0)
    return out


def _in_fresh_process(task: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`time_block` in ``python -m autocompress.bench_timing`` (not multiprocessing, whose spawn re-runs the
    caller's main module: a script without a ``__main__`` guard would start the bench again). The task goes as
    JSON plus an ``.npz`` of the latency samples, the result comes back as JSON."""
    import subprocess
    import sys
    import tempfile

    from .errors import AutocompressError

    with tempfile.TemporaryDirectory(prefix="autocompress-timing-") as tmp:
        task_file, sets_file, result_file = Path(tmp) / "task.json", Path(tmp) / "sets.npz", Path(tmp) / "result.json"
        save_latency_sets(sets_file, task["latency_sets"])
        order = [int(bs) for bs in task["latency_sets"]]
        task_file.write_text(json.dumps({**{k: v for k, v in task.items() if k != "latency_sets"}, "order": order}))
        proc = subprocess.run([sys.executable, "-m", "autocompress.bench_timing", str(task_file), str(sets_file),
                               str(result_file)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0 or not result_file.is_file():
            raise AutocompressError(f"the final timing's process failed (exit {proc.returncode}): "
                                    f"{proc.stdout[-1500:].strip()}")
        return json.loads(result_file.read_text())


def _main(argv: Sequence[str]) -> None:
    """The fresh process of :func:`_in_fresh_process`: task JSON and latency samples in, result JSON out."""
    task = json.loads(Path(argv[0]).read_text())
    sets = load_latency_sets(Path(argv[1]))
    task["latency_sets"] = {bs: sets[bs] for bs in task.pop("order")}  # the caller's batch-size order
    Path(argv[2]).write_text(json.dumps(time_block(task)))


def time_onnx_alone(path: str | Path, latency_sets: Mapping[int, "Encoded"], *, warmup: int, repeats: int,
                    pad_token_id: int, threads: int) -> dict[str, Any]:
    """ms/example of one ONNX graph in ONNX Runtime, timed in a fresh process (as :func:`final_timing` does): a
    process that has run PyTorch is no place to time ONNX Runtime. ``latency_bs{N}`` and its ``_spread``."""
    task = {"models": [("model", "onnx", str(path))], "latency_sets": dict(latency_sets), "pad_token_id": pad_token_id,
            "rounds": max(1, int(repeats)), "warmup": int(warmup), "threads": int(threads)}
    result = _in_fresh_process(task)
    if result["skipped"]:
        from .errors import ModelError

        raise ModelError(f"ONNX Runtime could not load {str(path)!r} to time it: {result['skipped']['model']}")
    return {k: v for k, v in result["figures"]["model"].items() if not k.endswith("_passes")}


def final_timing(studies: Path, joint_study: str, points: list[dict[str, Any]], peers: dict[str, dict[str, Any]], *,
                 latency_sets: Mapping[int, "Encoded"], pad_token_id: int, rounds: int, registry: "Registry",
                 log: Callable[[str], None], runtimes: Sequence[str] = ("pytorch", "onnxruntime")) -> dict[str, Any]:
    """Time the joint front ``points`` and the ``peers`` again (:func:`interleaved_latency`), each runtime in its
    own fresh process, and store the figures under ``point["final"]`` (``{"pytorch": ..., "onnxruntime": ...}``)
    and ``peer["final"]``. Returns what was timed, for the summary.

    One process per runtime because a process that has run PyTorch slows ONNX Runtime in it, and the other way
    round (session 13, the session-12 joint front: our int8 graphs timed 7-8.5 ms/example at batch 32 in ONNX
    Runtime when PyTorch models were timed in the same process, 3.0-4.0 in a process that timed only ONNX
    Runtime; PyTorch fp32 at batch 1: 15.7 against 13.3). A deployment runs one runtime, so each is timed alone.
    """
    import torch

    from .onnx_export import missing_dependencies
    from .workers import _plugins

    threads = torch.get_num_threads()
    plan = timing_plan(studies, joint_study, points, peers, onnx=not missing_dependencies())
    plan = {k: v for k, v in plan.items() if k in runtimes}
    timed: dict[str, dict[str, Any]] = {}
    for runtime, models in plan.items():
        log(f"  {runtime}: {len(models)} models, {rounds} rounds, batch sizes {', '.join(map(str, latency_sets))}, "
            "in a fresh process")
        task = {"models": models, "latency_sets": dict(latency_sets), "pad_token_id": pad_token_id, "rounds": rounds,
                "threads": threads, "plugins": _plugins(registry)}
        result = _in_fresh_process(task)
        for name, why in result["skipped"].items():
            log(f"  final timing: {name} not loaded ({why})")
        timed.update(result["figures"])
    for name, figures in timed.items():
        kind, rest = name.split(" ", 1)
        if kind == "peer":
            peers[rest]["final"] = figures
        else:
            n, runtime = rest.split(" ")
            point = next(q for q in points if str(q["trial"]) == n)
            point.setdefault("final", {})[runtime] = figures
        log(f"  {name}: " + ", ".join(f"bs{bs} {figures[f'latency_bs{bs}']:.3g} ms" for bs in latency_sets))
    return {"rounds": rounds, "models": list(timed), "threads": threads,
            "protocol": (f"each runtime in its own fresh process; {rounds} rounds, each timing every model once per "
                         "batch size (one pass over the latency sample) in an order rotated each round; ONNX Runtime "
                         "sessions built afresh for every pass (one alive at a time, torch at one thread in that "
                         "process, each of its threads pinned to a CPU of its own); figure = median of the rounds")}


if __name__ == "__main__":  # the fresh process of _in_fresh_process
    import sys

    _main(sys.argv[1:])
