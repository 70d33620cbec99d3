"""Where a BERT-like classifier spends its parameters, bytes, FLOPs and time, component by component.

Components (``COMPONENTS``): ``embeddings`` (lookup tables, plus a factorised embedding's projection),
``qkv`` (query/key/value projections), ``attention_core`` (QK^T, softmax, attention x V: everything the
self-attention module does besides its Q/K/V projections), ``attention_output`` (the output projection
with its dropout and residual add), ``ffn`` (intermediate dense + activation and output dense + residual),
``layer_norm`` (every LayerNorm), ``classifier`` (pooler + classification layer) and ``other`` (whatever
matches none of them; for time, work outside every timed module: masks, the encoder loop, token selection).

Classification is by module path and structure only (``...encoder.layer.N.attention.self.query...``,
LayerNorm types), never by plugin class, so factorised Linears (two child Linears), int8 modules (int8
buffers), sparse Linears and shared layers are profiled without importing any plugin.

What is counted, and how:

* **parameters**: unique parameters plus int8/uint8 weight buffers, exactly as
  :func:`autocompress.modeling.param_count` (the study's ``params``) counts them;
* **bytes**: every tensor of the state dict that ``safetensors`` saves, once per storage (shared layers
  once), at its stored dtype (int8 weights 1 byte per element, plus their float scales). They sum to the
  tensor bytes of ``model.safetensors``; the file adds an 8-byte length and a JSON header;
* **FLOPs**: 2 x in x out per token for every leaf module with ``in_features``/``out_features`` (so both
  factors of a low-rank Linear, an int8 Linear as its dense equivalent, a sparse Linear as the dense kernel
  it runs), and 4 x T x d per query token for the attention core (T keys, d = heads x head size kept).
  Counted from the shapes each module really sees in one forward pass at ``seq_len`` tokens, so pruned heads
  and FFN rows, factorised layers, eliminated tokens per layer and shared layers (counted at every use) are
  all reflected. Like ``torch.utils.flop_counter`` (the study's ``flops``), only matrix products count:
  LayerNorm, softmax, GELU and adds are 0;
* **time**: forward pre/post hooks on the few modules that bound components (CUDA events on GPU, resolved
  after a synchronise), as ms per example at each batch size, median pass. Each timed module's exclusive
  time (its own time minus that of timed modules inside it) goes to its component, so the rows sum to the
  hooked forward time. The whole-model latency is measured independently, without hooks, by
  :func:`autocompress.measure.latency_ms_per_example`, on each batch right before its hooked run (so a
  slow spell on a shared machine hits both), and the ratio (hook overhead + noise) is reported.

Inputs are synthetic: token ids of exactly ``seq_len`` tokens, no padding, fixed seed.
"""

from __future__ import annotations

import math
import re
import statistics
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:
    from torch import nn

    from .data import Encoded

COMPONENTS = ("embeddings", "qkv", "attention_core", "attention_output", "ffn", "layer_norm", "classifier", "other")
LABELS = {"embeddings": "embeddings", "qkv": "Q/K/V projections", "attention_core": "attention core",
          "attention_output": "attention output", "ffn": "FFN", "layer_norm": "layer norms",
          "classifier": "classifier (pooler + head)", "other": "other / unattributed"}
METRICS = ("params", "bytes", "flops_per_token")  # plus time_ms per batch size
_LAYER_RE = re.compile(r"(?:^|\.)encoder\.layer\.(\d+)(?:\.|$)")
_QKV = ("attention.self.query", "attention.self.key", "attention.self.value")


# ------------------------------------------------------------------------------------------ classification


def locate(path: str) -> tuple[int | None, str]:
    """``(layer position, path inside the layer)`` for a path under ``encoder.layer.N``, else ``(None, path)``."""
    m = _LAYER_RE.search(path)
    return (int(m.group(1)), path[m.end():]) if m else (None, path)


def is_norm(module: Any) -> bool:
    name = type(module).__name__
    return name.endswith(("LayerNorm", "RMSNorm")) or name == "GroupNorm"


def classify(path: str, *, norm: bool = False) -> str:
    """The component of the module (or tensor owner) at dotted ``path``; ``norm``: it is a normalisation."""
    position, rel = locate(path)
    if position is not None:
        if norm:
            return "layer_norm"
        if rel.startswith(_QKV):
            return "qkv"
        if rel == "attention.self" or rel.startswith("attention.self."):
            return "attention_core"
        if rel == "attention.output" or rel.startswith("attention.output."):
            return "attention_output"
        if rel.split(".")[0] in ("intermediate", "output"):
            return "ffn"
        return "other"
    parts = path.split(".")
    if "embeddings" in parts:
        return "layer_norm" if norm else "embeddings"
    if "pooler" in parts or "classifier" in parts:
        return "classifier"
    return "other"


def outer_scope(path: str) -> str:
    """The scope of a module outside the encoder layers: ``embeddings``, ``head`` (pooler, classifier) or
    ``model`` (anything else, including the root)."""
    parts = path.split(".")
    return "embeddings" if "embeddings" in parts else "head" if ("pooler" in parts or "classifier" in parts) else "model"


def scope_of(path: str, position: int | None = None) -> str:
    """``layer N`` (``position`` when given: where a shared layer object is running now) or the outer scope."""
    inside, _ = locate(path)
    if inside is None:
        return outer_scope(path)
    return f"layer {inside if position is None else position}"


def scope_order(scope: str) -> tuple[int, int]:
    if scope.startswith("layer "):
        return (1, int(scope.split()[1]))
    return ({"embeddings": 0, "head": 2}.get(scope, 3), 0)


def _unique_modules(model: "nn.Module") -> list[tuple[str, "nn.Module"]]:
    return [(n, m) for n, m in model.named_modules() if n]  # named_modules visits a shared module once


def _linear_like(module: Any) -> bool:
    """A leaf that computes a dense linear map (nn.Linear, int8 or sparse Linears); containers such as a
    factorised Linear are counted through their child Linears."""
    return (isinstance(getattr(module, "in_features", None), int)
            and isinstance(getattr(module, "out_features", None), int) and not any(True for _ in module.children()))


def _layer_objects(model: "nn.Module") -> list["nn.Module"]:
    from .surgery import encoder_layers

    try:
        return list(encoder_layers(model))
    except ValueError:
        return []


class _Positions:
    """Which encoder position is running: a pre-hook on each layer object counts calls within a forward
    (a shared layer object runs at several positions; path names only know its first one)."""

    def __init__(self, model: "nn.Module") -> None:
        self.current = -1
        self.handles = [model.register_forward_pre_hook(self._reset)]
        for layer in {id(m): m for m in _layer_objects(model)}.values():
            self.handles.append(layer.register_forward_pre_hook(self._next))

    def _reset(self, *_: Any) -> None:
        self.current = -1

    def _next(self, *_: Any) -> None:
        self.current += 1

    def scope(self, path: str) -> str:
        return scope_of(path, self.current)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


# --------------------------------------------------------------------------------- parameters and bytes


def storage_accounting(model: "nn.Module") -> dict[tuple[str, str], dict[str, int]]:
    """``{(scope, component): {"params": n, "bytes": b}}`` over the tensors safetensors stores (the
    state dict, one entry per storage: a shared layer is counted at its first position)."""
    import torch

    param_ptrs = {p.data_ptr() for p in model.parameters()}
    owners = dict(model.named_modules())
    seen: set[tuple[int, int, Any]] = set()
    out: dict[tuple[str, str], dict[str, int]] = {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.numel(), t.dtype)
        if t.numel() and key in seen:
            continue
        seen.add(key)
        owner = name.rpartition(".")[0]
        component = classify(owner, norm=is_norm(owners.get(owner)))
        cell = out.setdefault((scope_of(owner), component), {"params": 0, "bytes": 0})
        cell["bytes"] += t.numel() * t.element_size()
        if t.data_ptr() in param_ptrs or t.dtype in (torch.int8, torch.uint8):  # as modeling.param_count
            cell["params"] += t.numel()
    return out


def safetensors_tensor_bytes(path: str) -> int:
    """Bytes of tensor data in a ``.safetensors`` file: its size minus the 8-byte length and the header."""
    import os
    import struct

    with open(path, "rb") as f:
        (header,) = struct.unpack("<Q", f.read(8))
    return os.path.getsize(path) - 8 - header


# ----------------------------------------------------------------------------------------------- FLOPs


def count_flops(model: "nn.Module", batch: Mapping[str, Any]) -> tuple[dict[tuple[str, str], float],
                                                                         dict[int, dict[str, int]]]:
    """Forward FLOPs per example by ``(scope, component)`` and tokens seen per layer position
    (``{"attention": T, "ffn": T'}``), from the output shapes of one forward pass over ``batch``."""
    import torch

    flops: dict[tuple[str, str], float] = {}
    tokens: dict[int, dict[str, int]] = {}
    batch_size = int(batch["input_ids"].shape[0])
    positions = _Positions(model)
    handles = []

    def add(key: tuple[str, str], value: float) -> None:
        flops[key] = flops.get(key, 0.0) + value / batch_size

    def linear_hook(path: str, component: str) -> Callable[..., None]:
        def hook(module: Any, args: Any, output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else output
            n_tokens = out.numel() // max(1, int(module.out_features))
            add((positions.scope(path), component), 2.0 * module.in_features * module.out_features * n_tokens)
            if component == "ffn" and locate(path)[1].startswith("intermediate"):
                tokens.setdefault(positions.current, {})["ffn"] = n_tokens // batch_size
        return hook

    def core_hook(path: str) -> Callable[..., None]:
        def hook(module: Any, args: Any, output: Any) -> None:
            context = output[0] if isinstance(output, tuple) else output  # [B, T, heads x head size]
            b, t, d = context.shape
            add((positions.scope(path), "attention_core"), 4.0 * b * t * t * d)  # QK^T and attention x V
            tokens.setdefault(positions.current, {})["attention"] = int(t)
        return hook

    for path, module in _unique_modules(model):
        if _linear_like(module):
            handles.append(module.register_forward_hook(linear_hook(path, classify(path))))
        elif locate(path)[1] == "attention.self":
            handles.append(module.register_forward_hook(core_hook(path)))
    try:
        with torch.inference_mode():
            model(**batch)
    finally:
        for h in handles:
            h.remove()
        positions.remove()
    return flops, tokens


# ------------------------------------------------------------------------------------------------ inputs


def synthetic_inputs(vocab_size: int, seq_len: int, n: int, *, seed: int = 0) -> "Encoded":
    """``n`` examples of exactly ``seq_len`` token ids ([CLS]-like first id, random word ids, [SEP]-like last)."""
    from .data import Encoded

    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (a [CLS] and a [SEP] token), got {seq_len}")
    rng = np.random.default_rng(seed)
    big = vocab_size > 2000  # a real WordPiece vocabulary: [CLS]=101, [SEP]=102, words from 1000 up
    cls, sep, low = (101, 102, 1000) if big else (min(2, vocab_size - 1), min(3, vocab_size - 1), min(5, vocab_size - 1))
    ids = []
    for _ in range(n):
        row = rng.integers(low, vocab_size, size=seq_len).astype(np.int32)
        row[0], row[-1] = cls, sep
        ids.append(row)
    return Encoded(ids, None, np.zeros(n, dtype=np.int64), 0)


# ----------------------------------------------------------------------------------------------- profile


def layer_structure(model: "nn.Module", tokens: Mapping[int, Mapping[str, int]]) -> list[dict[str, Any]]:
    """Per encoder position: heads, head size, FFN width, tokens seen, sharing and module kinds."""
    import torch

    out = []
    first: dict[int, int] = {}
    for i, layer in enumerate(_layer_objects(model)):
        attn = getattr(getattr(layer, "attention", None), "self", None)
        ffn = getattr(getattr(layer, "intermediate", None), "dense", None)
        kinds: dict[str, int] = {}
        for m in layer.modules():
            if any(b.dtype == torch.int8 for b in m.buffers(recurse=False)):
                kinds["int8"] = kinds.get("int8", 0) + 1
            elif hasattr(m, "first") and hasattr(m, "second") and isinstance(getattr(m, "in_features", None), int):
                kinds["low-rank"] = kinds.get("low-rank", 0) + 1
            elif _linear_like(m) and hasattr(m, "values") and not isinstance(m, torch.nn.Linear):
                kinds["sparse"] = kinds.get("sparse", 0) + 1
        out.append({
            "layer": i,
            "heads": int(getattr(attn, "num_attention_heads", 0) or 0),
            "head_size": int(getattr(attn, "attention_head_size", 0) or 0),
            "ffn_width": int(getattr(ffn, "out_features", 0) or 0),
            "tokens_attention": tokens.get(i, {}).get("attention"),
            "tokens_ffn": tokens.get(i, {}).get("ffn"),
            "shared_with": None if first.setdefault(id(layer), i) == i else first[id(layer)],
            "modules": kinds,
        })
    return out


def profile_model(model: "nn.Module", *, seq_len: int = 64, batch_sizes: Sequence[int] = (1, 32),
                  device: str = "cpu", examples: int = 64, warmup: int = 1, repeats: int = 5, timing: bool = True,
                  label: str = "model", seed: int = 0, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The profile of ``model`` (moved to ``device``) as plain JSON-able data (see the module docstring)."""
    from .data import batches
    from .errors import ModelError
    from .modeling import describe_device, param_count
    from .profile_timing import time_components

    if repeats < 1 or examples < 1 or warmup < 0:
        raise ModelError(f"profile needs repeats >= 1, examples >= 1 and warmup >= 0 (got repeats={repeats}, "
                         f"examples={examples}, warmup={warmup})")
    model = model.to(device).eval()
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)
    if vocab < 4:
        raise ModelError(f"profile needs a BERT-like classifier whose config has vocab_size; got a "
                         f"{type(model).__name__} without one")
    storage = storage_accounting(model)
    one = synthetic_inputs(vocab, seq_len, 1, seed=seed)
    flops, tokens = count_flops(model, {k: v for k, v in next(batches(one, batch_size=1, device=device)).items()
                                        if k != "labels"})
    cells: dict[tuple[str, str], dict[str, Any]] = {}
    for key in set(storage) | set(flops):
        s = storage.get(key, {})
        cells[key] = {"params": s.get("params", 0), "bytes": s.get("bytes", 0),
                      "flops_per_example": flops.get(key, 0.0), "time_ms": {}}
    latency: dict[str, Any] = {}
    if timing:
        for bs in batch_sizes:
            n = int(math.ceil(max(1, examples) / bs)) * int(bs)  # whole batches only
            enc = synthetic_inputs(vocab, seq_len, n, seed=seed + 1)
            if log:
                log(f"  {label}: timing batch {bs} ({n} examples x {repeats} passes, with and without hooks)")
            timed = time_components(model, enc, batch_size=bs, device=device, warmup=warmup, repeats=repeats)
            for key, ms in timed["parts"].items():
                cells.setdefault(key, {"params": 0, "bytes": 0, "flops_per_example": 0.0, "time_ms": {}})
                cells[key]["time_ms"][str(bs)] = ms
            total = sum(timed["parts"].values())
            whole = statistics.median(timed["whole_model"])
            latency[str(bs)] = {
                "examples": n, "passes": repeats, "whole_model_ms": whole,
                "whole_model_spread": [min(timed["whole_model"]), max(timed["whole_model"])],
                "components_total_ms": total, "hooked_pass_totals_ms": timed["hooked_totals"],
                "whole_model_pass_ms": timed["whole_model"],
                "unattributed_ms": sum(v for (_, c), v in timed["parts"].items() if c == "other"),
                "ratio_to_whole_model": total / whole if whole > 0 else None,
                # Each pass timed every batch with and without hooks back to back: the median of the per-pass
                # ratios is the hook overhead with contention on a shared machine largely cancelled out.
                "paired_ratio": statistics.median(h / w for h, w in zip(timed["hooked_totals"], timed["whole_model"])
                                                  if w > 0) if any(w > 0 for w in timed["whole_model"]) else None}
    rows = []
    order = {c: i for i, c in enumerate(COMPONENTS)}
    for (scope, component), cell in sorted(cells.items(), key=lambda kv: (scope_order(kv[0][0]), order[kv[0][1]])):
        layer = int(scope.split()[1]) if scope.startswith("layer ") else None
        rows.append({"scope": scope, "layer": layer, "component": component,
                     "params": cell["params"], "bytes": cell["bytes"], "flops_per_example": cell["flops_per_example"],
                     "flops_per_token": cell["flops_per_example"] / seq_len,
                     "time_ms": {str(bs): cell["time_ms"].get(str(bs), 0.0) for bs in batch_sizes} if timing else {}})
    profile = {
        "format": 1, "label": label, "seq_len": seq_len, "batch_sizes": [int(b) for b in batch_sizes] if timing else [],
        "device": describe_device(device), "inputs": f"synthetic token ids, {seq_len} tokens per example, no padding",
        "rows": rows, "layers": layer_structure(model, tokens), "latency": latency,
        "param_count": param_count(model),
    }
    profile["totals"] = totals(profile)
    return profile


# ----------------------------------------------------------------------------------------- summaries


def totals(profile: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per component over all scopes, plus ``"total"``; each with shares of the total."""
    bss = [str(b) for b in profile.get("batch_sizes") or []]
    out: dict[str, dict[str, Any]] = {}
    for comp in (*COMPONENTS, "total"):
        rows = [r for r in profile["rows"] if comp == "total" or r["component"] == comp]
        out[comp] = {"params": sum(r["params"] for r in rows), "bytes": sum(r["bytes"] for r in rows),
                     "flops_per_token": sum(r["flops_per_token"] for r in rows),
                     "flops_per_example": sum(r["flops_per_example"] for r in rows),
                     "time_ms": {bs: sum(r["time_ms"].get(bs, 0.0) for r in rows) for bs in bss}}
    whole = out["total"]
    for comp, cell in out.items():
        cell["share"] = {m: _ratio(cell[m], whole[m]) for m in METRICS}
        cell["share"]["time_ms"] = {bs: _ratio(cell["time_ms"][bs], whole["time_ms"][bs]) for bs in bss}
    return out


def by_layer(profile: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per scope (embeddings, layer 0.., head, model) with its metrics summed over components."""
    bss = [str(b) for b in profile.get("batch_sizes") or []]
    scopes: dict[str, dict[str, Any]] = {}
    for r in profile["rows"]:
        s = scopes.setdefault(r["scope"], {"scope": r["scope"], "layer": r["layer"], "params": 0, "bytes": 0,
                                           "flops_per_token": 0.0, "time_ms": {bs: 0.0 for bs in bss}})
        s["params"] += r["params"]
        s["bytes"] += r["bytes"]
        s["flops_per_token"] += r["flops_per_token"]
        for bs in bss:
            s["time_ms"][bs] += r["time_ms"].get(bs, 0.0)
    return list(scopes.values())


def compare(profile: Mapping[str, Any], reference: Mapping[str, Any]) -> dict[str, Any]:
    """Ratios ``profile / reference`` per component (and total) for every metric, plus layer structure."""
    a, b = profile["totals"], reference["totals"]
    timed = {str(x) for x in reference.get("batch_sizes") or []}
    bss = [bs for bs in (str(x) for x in profile.get("batch_sizes") or []) if bs in timed]
    ratios = {}
    for comp in (*COMPONENTS, "total"):
        ratios[comp] = {m: _ratio(a[comp][m], b[comp][m]) for m in (*METRICS, "flops_per_example")}
        ratios[comp]["time_ms"] = {bs: _ratio(a[comp]["time_ms"][bs], b[comp]["time_ms"][bs]) for bs in bss}
    return {"model": profile["label"], "reference": reference["label"], "ratios": ratios, "batch_sizes": bss,
            "seq_len": [profile["seq_len"], reference["seq_len"]],
            "layers": {"model": profile["layers"], "reference": reference["layers"]}}


def _ratio(x: float, y: float) -> float | None:
    return float(x) / float(y) if y else None


def agreement(profile: Mapping[str, Any]) -> dict[str, float | None]:
    """Per batch size: the table's time total divided by the independently measured whole-model latency."""
    return {bs: v.get("ratio_to_whole_model") for bs, v in (profile.get("latency") or {}).items()}

