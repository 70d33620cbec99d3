"""Real measurements on the device the model runs on: accuracy, latency, size, parameters, FLOPs.

Latency protocol (recorded with the results): a fixed sample of evaluation sentences in a fixed order,
batched at each configured batch size with dynamic padding; ``warmup`` untimed passes, then ``repeats``
timed passes over the whole sample; the median pass time divided by the number of examples, in ms per
example. Fixed intra-op thread count; CUDA synchronised before reading the clock on GPU.
"""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from torch import nn

    from .data import Encoded


def predict(model: "nn.Module", enc: "Encoded", *, batch_size: int = 64, device: str = "cpu", pad_token_id: int = 0) -> np.ndarray:
    """Logits for every example, in order."""
    import torch

    from .data import batches

    # Shortest first, so each batch pads to a length close to its own (in dataset order a batch of 64 pads
    # to its longest). Logits come back in the original order and do not depend on the padding, up to
    # rounding (dynamic int8 scales activations per batch, so its logits depend a little on the batch anyway).
    order = np.argsort(enc.lengths(), kind="stable")
    out = []
    model.eval()
    with torch.inference_mode():
        for batch in batches(enc, batch_size=batch_size, device=device, pad_token_id=pad_token_id, indices=order):
            batch.pop("labels", None)
            out.append(model(**batch).logits.float().cpu().numpy())
    if not out:
        return np.zeros((0, 0))
    logits = np.empty_like(np.concatenate(out))
    logits[order] = np.concatenate(out)
    return logits


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy, F1 (positive class when binary, macro otherwise) and Matthews correlation."""
    pred = logits.argmax(-1)
    labels = np.asarray(labels)
    k = max(int(logits.shape[1]), int(labels.max()) + 1 if len(labels) else 1)
    cm = np.zeros((k, k), dtype=np.float64)
    np.add.at(cm, (labels, pred), 1)
    acc = float(np.trace(cm) / max(1, cm.sum()))
    tp = np.diag(cm)
    precision = np.divide(tp, cm.sum(0), out=np.zeros(k), where=cm.sum(0) > 0)
    recall = np.divide(tp, cm.sum(1), out=np.zeros(k), where=cm.sum(1) > 0)
    f1s = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k), where=(precision + recall) > 0)
    f1 = float(f1s[1]) if k == 2 else float(f1s.mean())
    # Multi-class MCC (Gorodkin 2004); equals the binary MCC for k == 2.
    t, p, n = cm.sum(1), cm.sum(0), cm.sum()
    c = np.trace(cm)
    denom = np.sqrt((n**2 - (p**2).sum()) * (n**2 - (t**2).sum()))
    mcc = float((c * n - (t * p).sum()) / denom) if denom > 0 else 0.0
    return {"accuracy": acc, "f1": f1, "mcc": mcc}


def evaluate(model: "nn.Module", enc: "Encoded", *, device: str = "cpu", batch_size: int = 64, pad_token_id: int = 0) -> dict[str, float]:
    logits = predict(model, enc, batch_size=batch_size, device=device, pad_token_id=pad_token_id)
    return classification_metrics(logits, enc.labels)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(torch.device(device))


def latency_ms_per_example(
    model: "nn.Module",
    enc: "Encoded",
    *,
    batch_size: int,
    device: str = "cpu",
    warmup: int = 1,
    repeats: int = 5,
    pad_token_id: int = 0,
) -> dict[str, float]:
    """Median (and spread) of timed passes over ``enc`` at ``batch_size``, in ms per example."""
    import torch

    from .data import batches

    prepared = [
        {k: v for k, v in b.items() if k != "labels"}
        for b in batches(enc, batch_size=batch_size, device=device, pad_token_id=pad_token_id)
    ]
    n = len(enc)
    model.eval()
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            _sync(device)
            t0 = time.perf_counter()
            for b in prepared:
                model(**b)
            _sync(device)
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1000.0 / n)
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def flops_per_example(model: "nn.Module", enc: "Encoded", *, device: str = "cpu", max_examples: int = 64, pad_token_id: int = 0) -> float:
    """Forward FLOPs per example counted by torch's FlopCounterMode over real evaluation batches (each at
    its own padded length). Quantised kernels are not counted by it, so the engine counts FLOPs before
    post-training transforms (quantisation changes the arithmetic type, not the work)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from .data import batches

    n = min(len(enc), max_examples)
    total, count = 0, 0
    model.eval()
    # FlopCounterMode does not count the CPU SDPA kernel, so count with eager attention (same maths).
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl is not None:
        config._attn_implementation = "eager"
    with torch.inference_mode():
        for b in batches(enc, batch_size=n, device=device, pad_token_id=pad_token_id, indices=range(n)):
            b.pop("labels", None)
            counter = FlopCounterMode(display=False)
            with counter:
                model(**b)
            total += counter.get_total_flops()
            count += b["input_ids"].shape[0]
            break
    if impl is not None:
        config._attn_implementation = impl
    return float(total) / max(1, count)


def protocol(measurement: Any, *, device_description: str, latency_examples: int) -> dict[str, Any]:
    return {
        "device": device_description,
        "batch_sizes": list(measurement.batch_sizes),
        "latency_examples": latency_examples,
        "warmup_passes": measurement.warmup,
        "timed_passes": measurement.repeats,
        "statistic": "median ms per example over timed passes",
        "padding": "dynamic (each batch padded to its longest sequence)",
        "size": "bytes of model.safetensors + config.json + recipe.json (tokenizer excluded)",
        "flops": "forward FLOPs per example (torch FlopCounterMode), counted before post-training transforms",
    }
