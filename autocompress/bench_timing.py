"""The bench's timings after the searches: the joint front exported to ONNX Runtime, then the *final timing*,
where every joint front point (PyTorch, and ONNX Runtime where it exports) and every peer is timed again,
interleaved, and the speed targets are read from it.

Why interleaved: on a shared 2-vCPU VM the machine has slow spells that last from seconds to a minute
(session 13: the same ONNX file timed 1.4-1.7 ms/example in most fresh sessions and 3.2-3.9 in others, every
model slowed at once, and graphs of many small ops slowed most). A model timed in one stretch takes whatever
spell it falls in, so the same command twice gave ratios 2x apart. Here each round times every model once,
in an order rotated each round, and a model's figure is the median of its rounds: a spell shifts one round,
not one model, and the ratios between models come from passes taken minutes apart from each other at most.
"""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

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
                        ) -> dict[str, dict[str, Any]]:
    """Time every model of ``models`` (``{name: model}``; a PyTorch module or an ONNX Runtime session behind
    the same call) on each latency set, one pass per model and batch size per round, in ``rounds`` rounds whose
    order is rotated; ``warmup`` untimed passes per model first. Returns :func:`summarise_passes` per model."""
    if rounds < 1:
        raise ValueError(f"rounds={rounds}: time at least one round")
    if timer is None:
        from .measure import latency_ms_per_example as timer
    kw = {"device": "cpu", "pad_token_id": pad_token_id}
    if warmup:
        for model in models.values():
            for bs, enc in latency_sets.items():
                timer(model, enc, batch_size=bs, warmup=0, repeats=warmup, **kw)
    passes: dict[str, dict[int, list[float]]] = {name: {bs: [] for bs in latency_sets} for name in models}
    for r in range(rounds):
        for name in rotation(list(models), r):
            for bs, enc in latency_sets.items():
                passes[name][bs].append(timer(models[name], enc, batch_size=bs, warmup=0, repeats=1, **kw)["median"])
    return {name: summarise_passes(p) for name, p in passes.items()}


# ----------------------------------------------------------------------------------------------------------
# The joint front in ONNX Runtime
# ----------------------------------------------------------------------------------------------------------


def time_front_in_onnxruntime(d: Path, points: list[dict[str, Any]], *, registry: "Registry", data: str | None,
                              log: Callable[[str], None]) -> None:
    """Export each front point of the study in ``d`` to ``d.parent/_front/trial<N>/`` (model and ONNX graph,
    parity-checked) and add its ONNX Runtime ms/example under ``point["onnxruntime"]``, or the reason it could
    not be exported. The exports stay for :func:`final_timing`."""
    from .errors import AutocompressError
    from .export import export_trial

    root = d.parent / FRONT_DIR
    shutil.rmtree(root, ignore_errors=True)  # ours: rebuilt from the study on every run
    root.mkdir(parents=True)
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


# ----------------------------------------------------------------------------------------------------------
# Final timing
# ----------------------------------------------------------------------------------------------------------


def final_timing(studies: Path, joint_study: str, points: list[dict[str, Any]], peers: dict[str, dict[str, Any]], *,
                 latency_sets: Mapping[int, "Encoded"], pad_token_id: int, rounds: int, registry: "Registry",
                 log: Callable[[str], None]) -> dict[str, Any]:
    """Time the joint front ``points`` and the ``peers`` again, interleaved (:func:`interleaved_latency`), and
    store the figures under ``point["final"]`` (``{"pytorch": ..., "onnxruntime": ...}``) and
    ``peer["final"]``. Each model is loaded from what the run saved: the study's trial models, the ONNX
    exports of :func:`time_front_in_onnxruntime`, the peers' files. Returns what was timed, for the summary."""
    import copy

    import torch
    from torch import nn

    from .modeling import load_compressed
    from .onnx_export import OrtClassifier, missing_dependencies
    from .results import load_results

    threads = torch.get_num_threads()
    ort_ok = not missing_dependencies()
    models: dict[str, Any] = {}
    peer_dir = studies / PEERS_DIR
    if (peer_dir / "baseline-fp32").is_dir() and "pytorch_fp32" in peers:
        base = load_compressed(peer_dir / "baseline-fp32", registry=registry).cpu().eval()
        models["peer pytorch_fp32"] = base
        if "pytorch_int8" in peers:
            models["peer pytorch_int8"] = torch.ao.quantization.quantize_dynamic(copy.deepcopy(base), {nn.Linear},
                                                                                 dtype=torch.qint8)
    for key, file in (("onnxruntime_fp32", "baseline-fp32.onnx"), ("onnxruntime_int8", "baseline-int8.onnx")):
        if ort_ok and key in peers and (peer_dir / file).is_file():
            models[f"peer {key}"] = OrtClassifier(peer_dir / file, threads=threads)
    d = studies / joint_study
    rows = {r["number"]: r for r in load_results(d).rows}
    for p in points:
        n = p["trial"]
        src = d / (rows.get(n, {}).get("model_dir") or f"trials/{n}")
        try:
            models[f"joint {n} pytorch"] = load_compressed(src, registry=registry).cpu().eval()
        except Exception as exc:  # noqa: BLE001 - a model that does not load keeps its search-time figures
            log(f"  final timing: joint #{n} not loaded ({type(exc).__name__}: {str(exc)[:200]})")
        onnx_file = studies / FRONT_DIR / f"trial{n}" / "model.onnx"
        if ort_ok and onnx_file.is_file():
            models[f"joint {n} onnxruntime"] = OrtClassifier(onnx_file, threads=threads)
    log(f"  {len(models)} models, {rounds} interleaved rounds, batch sizes {', '.join(map(str, latency_sets))}")
    timed = interleaved_latency(models, latency_sets, rounds=rounds, pad_token_id=pad_token_id)
    for name, figures in timed.items():
        kind, rest = name.split(" ", 1)
        if kind == "peer":
            peers[rest]["final"] = figures
        else:
            n, runtime = rest.split(" ")
            point = next(q for q in points if str(q["trial"]) == n)
            point.setdefault("final", {})[runtime] = figures
    for name, figures in timed.items():
        log(f"  {name}: " + ", ".join(f"bs{bs} {figures[f'latency_bs{bs}']:.3g} ms" for bs in latency_sets))
    return {"rounds": rounds, "models": list(timed), "threads": threads,
            "protocol": (f"{rounds} rounds; each round times every model once per batch size (one pass over the "
                         "latency sample), in an order rotated each round; figure = median of the rounds")}
