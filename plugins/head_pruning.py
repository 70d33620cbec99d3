"""Structured attention-head pruning with gradient-based head importance (Michel et al., 2019,
"Are Sixteen Heads Really Better than One?").

Head importance is the expected absolute gradient of the task loss with respect to a per-head gate
``xi_{l,h}`` that multiplies each head's context vector (the gate is 1, so the gradient is a first-order
estimate of the loss change when the head is removed). Scores are L2-normalised per layer, as in Michel's
code, then the globally least important heads are removed physically: the matching rows of the
query/key/value projections and the matching columns of the attention output projection are sliced out,
so the pruned model is genuinely smaller and faster (params, FLOPs, latency, size).

transformers v5 removed ``head_mask`` and ``PreTrainedModel.prune_heads``, so both the gate and the
slicing are implemented here: the gate with forward hooks on each ``BertSelfAttention`` module, the
slicing in :func:`prune_heads`. v5's ``BertSelfAttention.forward`` reshapes to ``(*shape, -1, head_size)``
and both eager and SDPA attention take the head count from the tensor shape, so a layer with fewer heads
just works, as long as it keeps at least one head (a 0-head layer would make the ``-1`` reshape ambiguous).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from autocompress import hookimpl
from autocompress.surgery import encoder_layers as _layers, head_counts, prune_heads
from autocompress.technique import FloatParam, IntParam, Requirement, Stage, Technique, TechniqueContext

# Keys of a training batch that BERT's forward accepts; anything else (ids, lengths) is dropped.
_MODEL_KEYS = ("input_ids", "attention_mask", "token_type_ids", "labels")


# ----------------------------------------------------------------------------------------------------------
# Model access
# ----------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------
# Importance
# ----------------------------------------------------------------------------------------------------------


def _gate_hook(gate: torch.Tensor, layer: int, num_heads: int, head_size: int):
    """A forward hook that multiplies each head's context vector by its gate value."""

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        context = output[0]  # [B, T, H*d]
        shape = context.shape
        # Index the gate here, under enable_grad: a view taken earlier under no_grad would not be tracked.
        row = gate[layer, :num_heads].to(context.dtype)
        gated = context.reshape(*shape[:-1], num_heads, head_size) * row[:, None]
        return (gated.reshape(shape),) + tuple(output[1:])

    return hook


def head_importance(model: nn.Module, batches: Iterable[Mapping[str, Any]]) -> torch.Tensor:
    """Michel et al.'s head importance: sum over batches of |d loss / d gate|, L2-normalised per layer.

    Returns a float32 CPU tensor ``[layers, max_heads]``; entries past a layer's head count are 0 and
    meaningless (layers may have different head counts after an earlier pruning). The model is scored in
    eval mode (no dropout noise in the scores); its train/eval flags and ``requires_grad`` flags are
    restored afterwards and no parameter ``.grad`` is created or changed.
    """
    layers = _layers(model)
    counts = head_counts(model)
    device = next(model.parameters()).device
    # One gate row per layer, padded to the widest layer; only the first ``counts[i]`` entries are used.
    gate = torch.ones(len(layers), max(counts), device=device, requires_grad=True)
    importance = torch.zeros(len(layers), max(counts), device=device)

    training = {m: m.training for m in model.modules()}
    # Gradients w.r.t. the gate only: freezing parameters avoids computing (and storing) weight grads.
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    handles = []
    try:
        model.eval()
        for p, _ in grad_flags:
            p.requires_grad_(False)
        for i, layer in enumerate(layers):
            attn = layer.attention.self
            handles.append(attn.register_forward_hook(_gate_hook(gate, i, counts[i], attn.attention_head_size)))
        n_batches = 0
        with torch.enable_grad():
            for batch in batches:
                inputs = {k: batch[k] for k in _MODEL_KEYS if k in batch and batch[k] is not None}
                if "labels" not in inputs:
                    raise ValueError("head importance needs labelled batches (a 'labels' entry)")
                loss = model(**inputs).loss
                # autograd.grad leaves every .grad untouched (Michel's code accumulated into head_mask.grad).
                (grad,) = torch.autograd.grad(loss, gate)
                importance += grad.abs().detach()
                n_batches += 1
        if n_batches == 0:
            raise ValueError("head importance got no batches")
    finally:
        for h in handles:
            h.remove()
        for p, flag in grad_flags:
            p.requires_grad_(flag)
        for m, flag in training.items():
            m.training = flag

    # Per-layer L2 normalisation (Michel's code, exponent 2): makes scores comparable across layers, which
    # matters because pruning picks the least important heads globally.
    norm = importance.pow(2).sum(-1, keepdim=True).sqrt()
    return (importance / (norm + 1e-20)).float().cpu()


# ----------------------------------------------------------------------------------------------------------
# Physical pruning
# ----------------------------------------------------------------------------------------------------------


def choose_heads(importance: torch.Tensor, counts: list[int], n_prune: int, min_heads: int) -> list[list[int]]:
    """The heads to keep after removing the ``n_prune`` globally least important ones, never taking a
    layer below ``min_heads`` heads (nor below 1). Ties break by (layer, head) so choices are
    deterministic. May prune fewer than ``n_prune`` when the per-layer floor binds."""
    floor = max(1, min_heads)
    candidates = sorted(
        ((float(importance[i, h]), i, h) for i, n in enumerate(counts) for h in range(n)),
    )
    remaining = list(counts)
    pruned: set[tuple[int, int]] = set()
    for _, i, h in candidates:
        if len(pruned) >= n_prune:
            break
        if remaining[i] > floor:
            pruned.add((i, h))
            remaining[i] -= 1
    return [[h for h in range(n) if (i, h) not in pruned] for i, n in enumerate(counts)]


# ----------------------------------------------------------------------------------------------------------
# The technique
# ----------------------------------------------------------------------------------------------------------


class HeadPruning(Technique):
    name = "head_pruning"
    description = ("Remove the globally least important attention heads (Michel et al. 2019 gradient "
                   "importance), slicing Q/K/V and output projections so the model gets smaller and faster.")
    stage = Stage.STRUCTURE
    order = 10  # after depth reduction (distillation), before low-rank factorisation
    params = (
        FloatParam("fraction", 0.0, 0.9, 0.0,
                   help="global fraction of all attention heads removed (0 = no pruning)"),
        IntParam("min_heads_per_layer", 1, 64, 1, searched=False,
                 help="never leave a layer with fewer heads than this"),
        IntParam("importance_batches", 1, 256, 32, searched=False,
                 help="labelled training batches used to score head importance"),
    )
    requires = frozenset({Requirement.IMPORTANCE_DATA})
    reduces = frozenset({"params", "flops", "latency", "size"})

    def identity_params(self) -> dict[str, Any]:
        return {"fraction": 0.0}

    def example_params(self) -> dict[str, Any]:
        return {"fraction": 0.5, "importance_batches": 2}

    def supports(self, model: nn.Module, *, device: str = "cpu") -> str | None:
        try:
            layers = _layers(model)
            if len(layers) == 0 or not all(hasattr(layer.attention.self, "query") for layer in layers):
                raise ValueError
        except (AttributeError, ValueError):
            return (f"head pruning needs a BERT-like model (.bert.encoder.layer[i].attention.self.query); "
                    f"got {type(model).__name__}")
        return None

    def importance(self, model: nn.Module, n_batches: int, ctx: TechniqueContext) -> torch.Tensor:
        """Head importance of ``model``, cached per baseline, batch count and head layout."""
        counts = head_counts(model)
        key = f"head_pruning/importance/v1/batches={n_batches}/heads={'-'.join(map(str, counts))}"

        def compute() -> dict[str, torch.Tensor]:
            ctx.log(f"head_pruning: scoring {sum(counts)} heads on {n_batches} batches")
            return {"importance": head_importance(model, ctx.train_batches(n_batches))}

        return ctx.cached(key, compute)["importance"]

    def apply(self, model: nn.Module, *, params: Mapping[str, Any], ctx: TechniqueContext) -> dict[str, Any]:
        counts = head_counts(model)
        total = sum(counts)
        # Round half up (Python's round() is banker's rounding, which surprises at x.5).
        n_prune = int(math.floor(float(params["fraction"]) * total + 0.5))
        if n_prune == 0:
            # Skip scoring entirely: fraction 0 must be a free, exact identity.
            keep = [list(range(n)) for n in counts]
        else:
            scores = self.importance(model, int(params["importance_batches"]), ctx)
            keep = choose_heads(scores, counts, n_prune, int(params["min_heads_per_layer"]))
            prune_heads(model, keep)
        pruned = total - sum(len(k) for k in keep)
        if pruned < n_prune:
            ctx.log(f"head_pruning: pruned {pruned} of the {n_prune} heads asked for "
                    f"(min_heads_per_layer={params['min_heads_per_layer']} binds)")
        return {"kept_heads": keep, "heads_before": counts}

    def restore(self, model: nn.Module, *, phase: str, params: Mapping[str, Any],
                record: Mapping[str, Any] | None) -> None:
        if phase != "apply" or not record:
            return
        counts = head_counts(model)
        if list(record["heads_before"]) != counts:
            raise ValueError(f"head_pruning record was made on a model with heads {record['heads_before']}, "
                             f"this model has {counts}")
        prune_heads(model, [list(k) for k in record["kept_heads"]])


@hookimpl
def register_techniques(register) -> None:
    register(HeadPruning())
