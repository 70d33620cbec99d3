"""Cross-layer weight sharing: several encoder positions run the very same ``BertLayer`` object.

Patterns (``mode``):

* ``all`` — every layer shares one set of weights (ALBERT; Lan et al., 2020);
* ``groups`` — consecutive groups of ``group_size`` layers share (the last group may be shorter);
* ``sandwich`` — the first and last layers keep their own weights and all middle layers share one
  (Subformer's sandwich-style sharing; Reid et al., 2021). Needs at least 4 layers to share anything.

Sharing is physical: ``model.bert.encoder.layer[i]`` *is* the group's representative layer for every
member, so the parameters exist once in memory, the optimiser updates them once (gradients from every
position add up), and ``safetensors.torch.save_model`` stores them once. Reloading replays the sharing on a
fresh model (:meth:`WeightSharing.restore`) before the weights load, so the reloaded model shares too.

What it does *not* do: every position still runs, so FLOPs and latency are unchanged (at most a small
cache effect from reusing the same weights); ``reduces`` claims size and params only.

Initialisation of a group's shared weights (``init``): ``average`` — the element-wise mean of the members'
parameters (only when all members have identical structure made of plain Linear/LayerNorm modules; after
head pruning or low-rank factorisation the layers differ, or hold SVD factors whose average is not the
factorisation of anything, so it falls back to ``middle``, logged and recorded); ``first`` — the first
member's weights; ``middle`` — the member at index ``len(group) // 2``.

transformers 5.x: ``BertEncoder.forward`` simply iterates its ``ModuleList``, so a repeated object runs
once per position. Each attention module's ``layer_idx`` is used only by decoder KV caches, so encoders
(``config.is_decoder`` false) are supported and decoders are refused. The output-capturing hooks
(``output_hidden_states`` / ``output_attentions``) fire on every call of the shared module, so a shared
model still returns one hidden state per position.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from autocompress import hookimpl
from autocompress.surgery import encoder_layers
from autocompress.technique import CategoricalParam, IntParam, Stage, Technique, TechniqueContext

# Leaf module types whose parameters can be averaged across layers meaningfully (plain matrices and norms).
_AVERAGEABLE = (nn.Linear, nn.LayerNorm)
# Packages whose container modules (BertLayer, BertAttention, Dropout, activations...) hold no hidden state.
_KNOWN_MODULES = ("torch.nn.", "transformers.")


def sharing_groups(num_layers: int, mode: str, group_size: int = 2) -> list[list[int]]:
    """Groups of positions that share one layer object (groups of one layer are left out)."""
    if mode == "none":
        groups: list[list[int]] = []
    elif mode == "all":
        groups = [list(range(num_layers))]
    elif mode == "groups":
        if group_size < 2:
            raise ValueError(f"group_size must be >= 2, got {group_size}")
        groups = [list(range(s, min(s + group_size, num_layers))) for s in range(0, num_layers, group_size)]
    elif mode == "sandwich":
        groups = [list(range(1, num_layers - 1))]
    else:
        raise ValueError(f"unknown sharing mode {mode!r}; use none, all, groups or sandwich")
    return [g for g in groups if len(g) > 1]


def _structure(layer: nn.Module) -> list[tuple[Any, ...]]:
    """What must match for layers to be averaged: module types, parameter shapes/dtypes, head counts."""
    out: list[tuple[Any, ...]] = [("module", n, type(m)) for n, m in layer.named_modules()]
    out += [("param", n, tuple(p.shape), p.dtype) for n, p in layer.named_parameters()]
    out += [("buffer", n, tuple(b.shape), b.dtype) for n, b in layer.named_buffers()]
    out += [("heads", n, getattr(m, "num_attention_heads")) for n, m in layer.named_modules()
            if hasattr(m, "num_attention_heads")]
    return out


def why_not_averageable(layers: list[nn.Module]) -> str | None:
    """``None`` if the layers' parameters can be averaged element-wise, else the reason they cannot."""
    first = _structure(layers[0])
    if any(_structure(layer) != first for layer in layers[1:]):
        return "the layers differ in structure or shapes (e.g. after head pruning or low-rank factorisation)"
    for name, module in layers[0].named_modules():
        kind = type(module)
        # A module from elsewhere (another technique's factorised or masked Linear) may hold weights whose
        # element-wise mean means nothing: the mean of SVD factors is not the factorisation of the mean.
        foreign = not kind.__module__.startswith(_KNOWN_MODULES)
        if foreign or (any(True for _ in module.parameters(recurse=False)) and kind not in _AVERAGEABLE):
            return (f"{name or 'the layer'} is a {kind.__name__}; only plain Linear/LayerNorm weights average "
                    f"meaningfully")
    return None


def share_layers(model: nn.Module, groups: list[list[int]], representatives: list[int]) -> None:
    """Make every position of each group run its representative's layer object."""
    layers = encoder_layers(model)
    for group, rep in zip(groups, representatives):
        if rep not in group:
            raise ValueError(f"representative {rep} is not in group {group}")
        if max(group) >= len(layers) or min(group) < 0:
            raise ValueError(f"group {group} is out of range for a model with {len(layers)} layers")
        shared = layers[rep]
        for i in group:
            layers[i] = shared


class WeightSharing(Technique):
    name = "weight_sharing"
    description = ("Cross-layer weight sharing (ALBERT all-shared, consecutive groups, Subformer sandwich): "
                   "shared layers are stored once. Smaller on disk and in memory; not faster.")
    stage = Stage.STRUCTURE
    order = 90  # last structural step: it makes layer objects shared, everything after visits them once
    params = (
        CategoricalParam("mode", ("none", "all", "groups", "sandwich"), "none",
                         help="which layers share weights (none = off)"),
        IntParam("group_size", 2, 4, 2, help="layers per group (mode=groups)"),
        CategoricalParam("init", ("average", "first", "middle"), "average",
                         help="shared weights start as the group's mean, its first or its middle layer"),
    )
    reduces = frozenset({"size", "params"})

    def identity_params(self) -> dict[str, Any]:
        return {"mode": "none"}

    def example_params(self) -> dict[str, Any]:
        return {"mode": "all", "init": "average"}

    def supports(self, model: nn.Module, *, device: str = "cpu") -> str | None:
        try:
            encoder_layers(model)
        except (AttributeError, ValueError):
            return f"weight sharing needs a BERT-like model (.bert.encoder.layer); got {type(model).__name__}"
        config = getattr(model, "config", None)
        if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
            return ("weight sharing supports encoders only: a decoder's KV cache is indexed by each layer's "
                    "layer_idx, which shared layers would have in common")
        return None

    def apply(self, model: nn.Module, *, params: Mapping[str, Any], ctx: TechniqueContext) -> dict[str, Any] | None:
        p = {**self.defaults(), **params}
        self.validate(p)
        layers = encoder_layers(model)
        groups = sharing_groups(len(layers), str(p["mode"]), int(p["group_size"]))
        if not groups:
            if p["mode"] != "none":
                ctx.log(f"weight_sharing: mode {p['mode']} shares nothing in a {len(layers)}-layer model")
            return None  # nothing changed: no recipe step
        requested = str(p["init"])
        inits, reps, fallbacks = [], [], []
        for group in groups:
            init, reason = requested, None
            members = list({id(layers[i]): layers[i] for i in group}.values())  # distinct objects, in order
            if init == "average" and len(members) > 1:
                reason = why_not_averageable(members)
                if reason:
                    init = "middle"
                    ctx.log(f"weight_sharing: layers {group} cannot be averaged ({reason}); using the middle one")
            rep = group[0] if init in ("first", "average") else group[len(group) // 2]
            if init == "average" and len(members) > 1:
                self._average_into(layers[rep], members)
            inits.append(init)
            reps.append(rep)
            fallbacks.append(reason)
        share_layers(model, groups, reps)
        ctx.log(f"weight_sharing: {p['mode']} -> groups {groups} (init {', '.join(sorted(set(inits)))})")
        return {"num_layers": len(layers), "groups": groups, "representatives": reps, "init": inits,
                "requested_init": requested, "fallback": fallbacks}

    @staticmethod
    def _average_into(target: nn.Module, members: list[nn.Module]) -> None:
        """Overwrite ``target``'s parameters (in place, so hooks and identities survive) with the mean over
        ``members`` (which includes ``target``); computed in float32 at least."""
        named = [dict(m.named_parameters()) for m in members]
        with torch.no_grad():
            for name, param in target.named_parameters():
                stack = torch.stack([n[name].detach().to(torch.promote_types(param.dtype, torch.float32))
                                     for n in named])
                param.copy_(stack.mean(0).to(param.dtype))

    def restore(self, model: nn.Module, *, phase: str, params: Mapping[str, Any],
                record: Mapping[str, Any] | None) -> None:
        if phase != "apply" or not record:
            return
        n = len(encoder_layers(model))
        if int(record["num_layers"]) != n:
            raise ValueError(f"weight_sharing record was made on a {record['num_layers']}-layer model; this one "
                             f"has {n}")
        share_layers(model, [list(g) for g in record["groups"]], [int(r) for r in record["representatives"]])


@hookimpl
def register_techniques(register) -> None:
    register(WeightSharing())
