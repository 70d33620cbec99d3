"""Movement pruning (Sanh, Wolf & Rush, NeurIPS 2020, "Movement Pruning: Adaptive Sparsity by
Fine-Tuning"), unstructured or on whole attention heads and FFN neurons (block movement pruning; Lagunas
et al., EMNLP 2021, "Block Pruning For Faster Transformers", found that the surviving blocks end up being
whole heads and FFN rows, so the structured granularities prune those units directly).

During recovery fine-tuning every prunable unit has a learned importance score ``S``. The forward pass
uses the masked model with the binary mask ``M = TopV(S)`` (the units with the highest scores at the
current sparsity); the backward pass is straight-through: ``M + S - S.detach()`` has the value of ``M`` and
the gradient of ``S``, so ``dL/dS = dL/dW' * W`` for a weight and ``dL/dS = dL/dy' * y`` for a gated head or
neuron output ``y`` (which equals the summed movement score of the output-projection columns that read
the head or neuron). Units whose weights move away from zero gain score; masked units still get gradient
and can come back. The sparsity follows the cubic schedule of Zhu & Gupta (2017) used by Sanh: 0 for the
first ``initial_warmup`` fraction of the steps, then ``target * (1 - (1 - p)^3)`` with ``p`` rising linearly
to 1, then ``target`` for the last ``final_warmup`` fraction (defaults 0 and 0.6, for the short recovery
budgets of a trial; Sanh's 10-epoch runs used about 0.1 and 0.3).

Granularity (``granularity``):

* ``unstructured`` — one score per weight of every exact ``nn.Linear`` inside the encoder layers (incl.
  low-rank factors), top-v *per matrix* as in Sanh's code, so no matrix is emptied. Finalize replaces each
  masked Linear by a :class:`SparseLinear` that stores only the kept values plus a packed bitmask (or
  int32 indices when sparser than 1/32). **Size only**: the forward rebuilds the dense weight once (a
  non-persistent cache) and runs the ordinary dense kernel, so FLOPs, latency and run-time memory do not
  fall; the saved file and the count of stored parameters do.
* ``neurons`` — one score per FFN intermediate neuron (a gate on ``intermediate``'s output);
* ``heads`` — one score per attention head (a gate on ``attention.self``'s context output, via a forward
  hook, so it works whatever module computes Q/K/V);
* ``hybrid`` — heads and neurons, each pool pruned to ``sparsity``.
  Structured top-v is *global* over all layers of a pool (layers differ in how much they can lose), with
  at least one head and one neuron kept per layer. Finalize removes the pruned heads and neurons
  physically (:func:`~autocompress.surgery.prune_heads`, :func:`~autocompress.surgery.prune_ffn_neurons`):
  params, FLOPs, latency and size all fall.

Scores and learning rate: the trainer has one learning rate for everything, far too small for scores
(Sanh used 1e-2 for scores, 3e-5 for weights). Adam's step is about ``lr`` whatever the gradient's scale,
so the scores are kept in units where that step is large: the optimised tensor is ``S / score_lr_scale``.
Ranking is unchanged by the factor, the gradient keeps its natural size (global gradient clipping is not
dominated by the scores), and ``S`` effectively moves ``score_lr_scale * lr`` per step. Score init
(``score_init``): Sanh used a constant; with the 100-300 recovery steps of a trial, ``magnitude`` starts
from magnitude pruning (``|W|`` normalised to mean 1 per matrix; per head ``||W_V,h|| * ||W_O,h||``, per
neuron ``||W_in,j|| * ||W_out,j||``, normalised to mean 1 over all layers) and lets movement re-rank the
units near the threshold. It also gives sensible masks when no recovery step runs (finalize then prunes
by the initial scores; with ``constant`` init that would keep the first units by index).

Scope and composition: scores exist once per distinct module object, so layers shared by weight sharing
keep the same heads/neurons at every position, and are pruned once (the sparsity counts each distinct
head/neuron/weight once). Head counts already reduced by head
pruning and low-rank factorised projections are handled (dense weights for the init are read through the
module's forward). Quantization afterwards converts exact ``nn.Linear`` only; ``SparseLinear`` stays fp32.
Sparsity 0 is an exact identity (no hooks, no change). Scores live on the technique between
``training_hooks`` and ``finalize`` (keyed by the model object), not in the model's state dict.
Heads and neurons are removed in ``finalize``; a FLOP count taken between training and finalize (the
engine's ``before_finalize``) still sees the masked, full-size model. ONNX export: structured pruning
exports as the smaller dense model; unstructured exports its rebuilt dense weights (``onnx_prepare``), so
the ``.onnx`` file has the dense size.
"""

from __future__ import annotations

import weakref
from typing import Any, Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from autocompress import hookimpl
from autocompress.surgery import (encoder_layers, ffn_sizes, head_counts, prune_ffn_neurons, prune_heads,
                                  set_module, unique_layers)
from autocompress.technique import (CategoricalParam, FloatParam, Stage, Technique, TechniqueContext,
                                    TrainingHooks)

# Schedule, top-v masks and sparse storage live in a sibling module of this plugin; re-exported for tests.
from plugins.sparse_ops import (SparseLinear, n_pruned, cubic_sparsity, global_masks, pack_bits,  # noqa: F401
                                top_mask, unpack_bits)

GRANULARITIES = ("hybrid", "heads", "neurons", "unstructured")
_POOLS = {"hybrid": ("heads", "neurons"), "heads": ("heads",), "neurons": ("neurons",),
          "unstructured": ("weights",)}


# ----------------------------------------------------------------------------------------------------------
# Scores, masks and the hooks that apply them
# ----------------------------------------------------------------------------------------------------------


def _dense_weight(module: nn.Module) -> torch.Tensor:
    """The ``out x in`` matrix of a linear map: ``weight`` for an ``nn.Linear``, else read through the
    module's forward (a low-rank factorised or otherwise wrapped Linear)."""
    if isinstance(module, nn.Linear):
        return module.weight.detach().float()
    p = next(module.parameters())
    with torch.no_grad():
        eye = torch.eye(module.in_features, device=p.device, dtype=p.dtype)
        return (module(eye) - module(torch.zeros_like(eye[:1]))).float().T


def _normalised(scores: list[torch.Tensor]) -> list[torch.Tensor]:
    mean = torch.cat([s.reshape(-1) for s in scores]).mean().clamp_min(1e-12)
    return [s / mean for s in scores]


class _State:
    """Scores (leaf tensors the optimiser updates), current binary masks and hooks for one model."""

    def __init__(self, model: nn.Module, params: Mapping[str, Any]) -> None:
        self.granularity = str(params["granularity"])
        self.scale = float(params["score_lr_scale"])
        constant = params["score_init"] == "constant"
        self.layers = [layer for _, layer in unique_layers(model)]
        self.names: list[str] = []  # weights pool: module names, parallel to self.owners["weights"]
        self.owners: dict[str, list[nn.Module]] = {}
        init: dict[str, list[torch.Tensor]] = {}
        kinds = _POOLS[self.granularity]
        if "heads" in kinds:
            self.owners["heads"] = [layer.attention.self for layer in self.layers]
            init["heads"] = [self._head_init(layer) for layer in self.layers]
        if "neurons" in kinds:
            self.owners["neurons"] = [layer.intermediate for layer in self.layers]
            init["neurons"] = [_dense_weight(layer.intermediate.dense).norm(dim=1)
                               * _dense_weight(layer.output.dense).norm(dim=0) for layer in self.layers]
        if "weights" in kinds:
            inside = {id(m) for layer in self.layers for m in layer.modules()}
            # named_modules() lists each object once, under its first name: shared layers masked once.
            found = [(n, m) for n, m in model.named_modules() if id(m) in inside and type(m) is nn.Linear]
            self.names = [n for n, _ in found]
            self.owners["weights"] = [m for _, m in found]
            init["weights"] = [_normalised([m.weight.detach().float().abs()])[0] for _, m in found]
        self.scores: dict[str, list[torch.Tensor]] = {}
        for kind, values in init.items():
            if kind != "weights":
                values = _normalised(values)
            self.scores[kind] = [((torch.ones_like(v) if constant else v) / self.scale).requires_grad_(True)
                                 for v in values]
        self.masks = {k: [torch.ones_like(s, dtype=torch.bool) for s in v] for k, v in self.scores.items()}
        self.sparsity = 0.0
        self.handles: list[Any] = []

    @staticmethod
    def _head_init(layer: nn.Module) -> torch.Tensor:
        attn = layer.attention.self
        n, d = int(attn.num_attention_heads), int(attn.attention_head_size)
        v = _dense_weight(attn.value).reshape(n, d, -1).norm(dim=(1, 2))
        o = _dense_weight(layer.attention.output.dense).reshape(-1, n, d).norm(dim=(0, 2))
        return v * o

    def parameters(self) -> list[torch.Tensor]:
        return [s for scores in self.scores.values() for s in scores]

    def update(self, sparsity: float) -> None:
        """Recompute every binary mask for ``sparsity`` from the current scores."""
        self.sparsity = float(sparsity)
        with torch.no_grad():
            for kind, scores in self.scores.items():
                if kind == "weights":  # per matrix (Sanh), never emptying one
                    self.masks[kind] = [top_mask(s.reshape(-1), max(1, s.numel() - n_pruned(sparsity, s.numel())))
                                        .view_as(s) for s in scores]
                else:
                    self.masks[kind] = global_masks(scores, sparsity)

    def gate(self, kind: str, i: int, like: torch.Tensor) -> torch.Tensor:
        """Straight-through mask: the value of the binary mask, the gradient of the score."""
        s = self.scores[kind][i].to(like.device)
        return (self.masks[kind][i].to(like.device, like.dtype) + (s - s.detach()).to(like.dtype))

    def install(self) -> None:
        for i, attn in enumerate(self.owners.get("heads", [])):
            self.handles.append(attn.register_forward_hook(_head_hook(self, i)))
        for i, inter in enumerate(self.owners.get("neurons", [])):
            self.handles.append(inter.register_forward_hook(
                lambda m, a, out, i=i: out * self.gate("neurons", i, out)))
        for i, linear in enumerate(self.owners.get("weights", [])):
            parametrize.register_parametrization(linear, "weight", _MaskedWeight(self, i))

    def uninstall(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for linear in self.owners.get("weights", []):
            if parametrize.is_parametrized(linear, "weight"):
                parametrize.remove_parametrizations(linear, "weight", leave_parametrized=False)


def _head_hook(state: _State, i: int):
    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        context = output[0] if isinstance(output, tuple) else output  # [B, T, H*d]
        n, d = int(module.num_attention_heads), int(module.attention_head_size)
        gate = state.gate("heads", i, context)
        gated = (context.reshape(*context.shape[:-1], n, d) * gate[:, None]).reshape(context.shape)
        return (gated,) + tuple(output[1:]) if isinstance(output, tuple) else gated

    return hook


class _MaskedWeight(nn.Module):
    """Parametrisation ``W -> W * (M + S - S.detach())``: masked forward, ``dL/dS = dL/dW' * W``, and the
    weight's own gradient masked too (Sanh's straight-through estimator)."""

    def __init__(self, state: _State, i: int) -> None:
        super().__init__()
        self._state, self._i = state, i  # plain attributes: the scores are not model parameters

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self._state.gate("weights", self._i, weight)


# ----------------------------------------------------------------------------------------------------------
# Record helpers
# ----------------------------------------------------------------------------------------------------------


def _to_hex(mask: list[bool]) -> str:
    """A keep-mask as a hex string, first unit = most significant bit (compact in recipe.json)."""
    return format(int("".join("1" if b else "0" for b in mask) or "0", 2), f"0{(len(mask) + 3) // 4}x")


def _from_hex(text: str, n: int) -> list[int]:
    bits = bin(int(text, 16))[2:].zfill(n)[-n:] if n else ""
    return [i for i, b in enumerate(bits) if b == "1"]


# ----------------------------------------------------------------------------------------------------------
# The technique
# ----------------------------------------------------------------------------------------------------------


class MovementPruning(Technique):
    name = "movement_pruning"
    description = ("Movement pruning (Sanh et al. 2020): scores learned during recovery fine-tuning, cubic "
                   "sparsity schedule. heads/neurons/hybrid remove whole heads and FFN neurons (smaller and "
                   "faster); unstructured stores sparse weights (smaller on disk only, not faster).")
    stage = Stage.TRAINING
    order = 0
    params = (
        CategoricalParam("granularity", GRANULARITIES, "hybrid",
                         help="what is pruned: heads+FFN neurons (hybrid), heads, neurons, or single weights "
                              "(unstructured: saves size only)"),
        FloatParam("sparsity", 0.0, 0.9, 0.0,
                   help="fraction pruned: of all heads and of all FFN neurons (global), or of each encoder "
                        "Linear's weights (unstructured); 0 = off"),
        # Defaults for short recovery budgets (100-300 steps) with magnitude-initialised scores: pruning
        # from step 0 and reaching the target at 40% of the steps leaves 60% to recover. Sanh's 0.1 / 0.3
        # (for 10 epochs) lose more accuracy at the same sparsity with 150 steps: hybrid 0.4 in
        # results/techniques.md has both schedules.
        FloatParam("initial_warmup", 0.0, 0.5, 0.0, searched=False,
                   help="fraction of recovery steps before pruning starts"),
        FloatParam("final_warmup", 0.0, 0.9, 0.6, searched=False,
                   help="fraction of recovery steps at the end held at the target sparsity"),
        FloatParam("score_lr_scale", 1.0, 1e4, 300.0, log=True, searched=False,
                   help="scores move this many times faster than the recovery learning rate"),
        CategoricalParam("score_init", ("magnitude", "constant"), "magnitude", searched=False,
                         help="initial scores: weight magnitudes, or a constant (Sanh)"),
    )
    # For the structured granularities (the default); unstructured reduces size (and stored params) only.
    reduces = frozenset({"params", "flops", "latency", "size"})

    def __init__(self) -> None:
        self._states: "weakref.WeakKeyDictionary[nn.Module, _State]" = weakref.WeakKeyDictionary()

    def identity_params(self) -> dict[str, Any]:
        return {"sparsity": 0.0}

    def example_params(self) -> dict[str, Any]:
        return {"granularity": "hybrid", "sparsity": 0.5}

    def validate(self, params: Mapping[str, Any]) -> None:
        super().validate(params)
        p = {**self.defaults(), **params}
        if p["initial_warmup"] + p["final_warmup"] >= 1.0:
            raise ValueError(f"movement_pruning: initial_warmup + final_warmup must be < 1 to leave steps for the "
                             f"sparsity ramp (got {p['initial_warmup']} + {p['final_warmup']})")

    def supports(self, model: nn.Module, *, device: str = "cpu") -> str | None:
        try:
            layers = encoder_layers(model)
            if len(layers) == 0 or not all(hasattr(layer.attention.self, "num_attention_heads")
                                           and hasattr(layer.intermediate, "dense") for layer in layers):
                raise ValueError
        except (AttributeError, ValueError):
            return (f"movement pruning needs a BERT-like model (.bert.encoder.layer[i].attention.self and "
                    f".intermediate.dense); got {type(model).__name__}")
        return None

    # -- training -------------------------------------------------------------------------------------
    def _state(self, model: nn.Module, params: Mapping[str, Any]) -> _State:
        state = self._states.get(model)
        if state is None:
            state = self._states[model] = _State(model, {**self.defaults(), **params})
        return state

    def training_hooks(self, model: nn.Module, *, params: Mapping[str, Any],
                       ctx: TechniqueContext) -> TrainingHooks | None:
        p = {**self.defaults(), **params}
        target = float(p["sparsity"])
        if target == 0.0:
            return None  # exact identity: no scores, no hooks
        old = self._states.pop(model, None)
        if old is not None:
            old.uninstall()
        state = self._state(model, p)
        state.install()
        iw, fw = float(p["initial_warmup"]), float(p["final_warmup"])
        ctx.log(f"movement_pruning: {p['granularity']} to sparsity {target} "
                f"({sum(s.numel() for s in state.parameters())} scores)")

        def before_step(step: int, total: int) -> None:
            state.update(cubic_sparsity(step, total, target, iw, fw))

        def after_step(step: int, total: int) -> None:
            if step + 1 >= total:  # leave the trained model masked at its final sparsity
                state.update(cubic_sparsity(total, total, target, iw, fw))

        return TrainingHooks(before_step=before_step, after_step=after_step, parameters=state.parameters())

    def current(self, model: nn.Module) -> dict[str, Any] | None:
        """The live sparsity and binary masks (per distinct module) of ``model`` during recovery, or None."""
        state = self._states.get(model)
        if state is None:
            return None
        return {"sparsity": state.sparsity, "masks": {k: [m.clone() for m in v] for k, v in state.masks.items()},
                "names": list(state.names)}

    # -- finalize -------------------------------------------------------------------------------------
    def finalize(self, model: nn.Module, *, params: Mapping[str, Any], ctx: TechniqueContext) -> dict[str, Any] | None:
        p = {**self.defaults(), **params}
        target = float(p["sparsity"])
        if target == 0.0:
            return None
        state = self._states.pop(model, None) or _State(model, p)  # no training hooks: initial scores
        state.update(target)
        state.uninstall()
        record: dict[str, Any] = {"granularity": state.granularity, "sparsity": target}
        layers = encoder_layers(model)
        index = {id(layer): k for k, layer in enumerate(state.layers)}
        if "heads" in state.masks:
            before = head_counts(model)
            keep = [state.masks["heads"][index[id(layer)]].nonzero().reshape(-1).tolist() for layer in layers]
            prune_heads(model, keep)
            record["heads"] = {"before": before, "kept": keep}
        if "neurons" in state.masks:
            before = ffn_sizes(model)
            masks = [state.masks["neurons"][index[id(layer)]].tolist() for layer in layers]
            prune_ffn_neurons(model, [[j for j, b in enumerate(m) if b] for m in masks])
            record["neurons"] = {"before": before, "kept_hex": [_to_hex(m) for m in masks],
                                 "widths": [sum(m) for m in masks]}
        if "weights" in state.masks:
            entries = []
            for name, linear, mask in zip(state.names, state.owners["weights"], state.masks["weights"]):
                sparse = SparseLinear.from_linear(linear, mask)
                set_module(model, name, sparse)
                entries.append({"name": name, "in_features": sparse.in_features, "out_features": sparse.out_features,
                                "nnz": sparse.values.numel(), "bias": sparse.bias is not None,
                                "format": sparse.index_format})
            record["sparse"] = entries
        ctx.log(f"movement_pruning: finalized {state.granularity} at sparsity {target}")
        return record

    def restore(self, model: nn.Module, *, phase: str, params: Mapping[str, Any],
                record: Mapping[str, Any] | None) -> None:
        if phase != "finalize" or not record:
            return
        if "heads" in record:
            if list(record["heads"]["before"]) != head_counts(model):
                raise ValueError(f"movement_pruning record was made on a model with heads {record['heads']['before']}, "
                                 f"this model has {head_counts(model)}")
            prune_heads(model, [list(k) for k in record["heads"]["kept"]])
        if "neurons" in record:
            before = list(record["neurons"]["before"])
            if before != ffn_sizes(model):
                raise ValueError(f"movement_pruning record was made on a model with FFN widths {before}, "
                                 f"this model has {ffn_sizes(model)}")
            prune_ffn_neurons(model, [_from_hex(h, n) for h, n in zip(record["neurons"]["kept_hex"], before)])
        for e in record.get("sparse", []):
            linear = model.get_submodule(e["name"])
            if (linear.in_features, linear.out_features) != (e["in_features"], e["out_features"]):
                raise ValueError(f"movement_pruning record: {e['name']} is {linear.out_features}x{linear.in_features}, "
                                 f"expected {e['out_features']}x{e['in_features']}")
            w = linear.weight
            set_module(model, e["name"], SparseLinear(e["in_features"], e["out_features"], e["nnz"], e["bias"],
                                                      index_format=e["format"], device=w.device, dtype=w.dtype))

    def onnx_prepare(self, model: nn.Module, *, params: Mapping[str, Any],
                     record: Mapping[str, Any] | None) -> None:
        # SparseLinear decodes its bitmask with shifts (aten.__rshift__) that the ONNX exporter cannot
        # translate; the dense weight it rebuilds is what it multiplies by anyway. So the ONNX graph holds
        # it as a plain Linear: same outputs, but the .onnx file is dense-sized (no sparse storage there).
        for e in (record or {}).get("sparse", []):
            sparse = model.get_submodule(e["name"])
            if not isinstance(sparse, SparseLinear):
                continue
            dense = nn.Linear(sparse.in_features, sparse.out_features, bias=sparse.bias is not None,
                              device=sparse.values.device, dtype=sparse.values.dtype)  # e.g. after an fp16 cast
            with torch.no_grad():
                dense.weight.copy_(sparse.weight)
                if sparse.bias is not None:
                    dense.bias.copy_(sparse.bias)
            set_module(model, e["name"], dense)
        return None


@hookimpl
def register_techniques(register) -> None:
    register(MovementPruning())
