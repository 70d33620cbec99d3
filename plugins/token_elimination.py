"""Progressive word-vector elimination (PoWER-BERT, Goyal et al., ICML 2020).

After the self-attention sublayer of encoder layer ``j`` every token gets a *significance*: the attention
it receives, i.e. the attention probabilities summed over heads and over the (valid) query positions. The
``ell_j`` most significant tokens are kept, in their original order ([CLS] is always kept, so it stays at
position 0 where the pooler reads it), and the others are dropped from the sequence *physically*: hidden
states and attention mask are gathered, so the FFN of layer ``j`` and every later layer run on fewer
tokens. FLOPs and latency fall; no weight is removed, so size and parameter count are unchanged.

Retention configuration. ``ell_j`` is a fraction of each example's real (unpadded) length ``L``:
``ell_j = ceil(f_j * L)``; a padded batch is gathered to the widest row and shorter rows are padded and
masked, so padding is never kept over a real token and a batch gives each example the same result as
running it alone. The fractions ``f_1 >= f_2 >= ...`` form a monotone schedule: 1 up to layer
``floor(start_layer * n)``, then ``1 - (1 - keep_final) * p ** power`` with ``p`` rising linearly to 1 at
the last layer. ``keep_final = 1`` is the exact identity.

Optional learned retention (``learn``): PoWER-BERT's soft-extract layer. During recovery training each
token's attention output is multiplied by a learnable retention ``r_j(q) in [0, 1]`` of its relative
significance rank ``q = rank / L`` (16 bins, linearly interpolated; [CLS] is never scaled), and the mass
regulariser ``mass_lambda * sum_j mean(r_j)`` (the retained fraction summed over layers) is added to the
loss. The paper indexes ``r`` by absolute sorted position; relative bins make the learned mass a fraction
of each example's length, the unit of the hard schedule. ``r`` has its own Adam optimiser
(``retention_lr``) because the model's fine-tuning rate is far too small to move it. After the last
training step the learned fractions ``mean(r_j)`` (capped by the hard schedule, made monotone) replace the
schedule and the model switches to hard extraction, before FLOPs are counted. PoWER-BERT then re-trains
with the learned configuration; the pipeline has a single recovery phase, so that step is left out.

Implementation. The encoder is replaced by :class:`TokenEliminationEncoder`, which holds the *same*
``layer`` ModuleList (state-dict keys stay ``bert.encoder.layer.N...``; later techniques may replace or
share layer objects). Each layer is still called as a module, exactly as ``BertEncoder`` calls it, so every
forward hook fires (movement-pruning masks and head gates on ``attention.self``, transformers' capture of
``hidden_states`` on ``BertLayer`` and of ``attentions`` on ``BertSelfAttention``). In a layer that
eliminates, the wrapper (a) switches the attention kernel to eager for that call (SDPA does not return the
probabilities) and (b) adds, for that call only, a forward hook on ``layer.attention`` (``BertAttention``:
self-attention + output projection + residual LayerNorm) that ranks the tokens from the probabilities and
gathers its output. ``BertLayer`` then feeds the shorter sequence to ``intermediate`` and ``output``: the
extraction sits between the attention sublayer and the FFN, as in the paper. Layers that eliminate nothing
run unchanged with the model's own kernel and mask (so keep 1.0 is bit-identical).

Outputs: ``output_hidden_states`` / ``output_attentions`` still work, but entries get shorter from layer
to layer, and after an elimination position ``i`` is the ``i``-th *kept* token, so only position 0
([CLS]) lines up with the input and with an uncompressed teacher.

Limits: encoder-only BERT-like models without a KV cache; [CLS] is the first position (right padding);
gradient checkpointing is refused (the per-call hook would be missing in the recomputation); the
attention-kernel switch writes ``config._attn_implementation`` during the forward, so one model must not
run forwards from two threads at once. Tokens are ranked with a stable ``argsort`` per layer, a small cost
the FLOP counter does not see. ONNX export works: under ``torch.export`` the kept width is a function of
the padded length only (see ``TokenEliminationEncoder.forward``), and the ranks come from counted pairwise
comparisons (ONNX has no stable sort); both give the same ranks.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from autocompress import hookimpl
from autocompress.surgery import base_model, encoder_layers
from autocompress.technique import (CategoricalParam, FloatParam, Stage, Technique, TechniqueContext,
                                    TrainingHooks)

SOFT_BINS = 16  # learned retention: bins of relative significance rank per layer
_EPS = 1e-6  # ceil(f * L) of 0.3 * 10 must be 3, not 4 (float error)


# ----------------------------------------------------------------------------------------------------------
# Schedule
# ----------------------------------------------------------------------------------------------------------


def retention_schedule(n_layers: int, keep_final: float, start_layer: float = 0.0,
                       power: float = 1.0) -> list[float]:
    """Per-layer fractions of the input length kept after each layer's attention: monotone non-increasing,
    1 before layer ``floor(start_layer * n_layers)``, ``keep_final`` at the last layer."""
    first = min(n_layers - 1, int(math.floor(start_layer * n_layers + 1e-9)))
    out = []
    for j in range(n_layers):
        progress = 0.0 if j < first else (j - first + 1) / (n_layers - first)
        out.append(round(1.0 - (1.0 - keep_final) * progress ** power, 6))
    return out


def monotone(fractions: Sequence[float]) -> list[float]:
    """Running minimum: a token eliminated at one layer cannot come back at a later one."""
    out, low = [], 1.0
    for f in fractions:
        low = min(low, float(f))
        out.append(round(low, 6))
    return out


def retained(fraction: float, lengths: torch.Tensor) -> torch.Tensor:
    """``ell = ceil(fraction * L)`` per example, at least 1 ([CLS]) and at most ``L``."""
    keep = torch.ceil(lengths.to(torch.float64) * fraction - _EPS).to(lengths.dtype)
    return torch.minimum(keep.clamp_min(1), lengths.clamp_min(1))


# ----------------------------------------------------------------------------------------------------------
# Masks, significance and selection
# ----------------------------------------------------------------------------------------------------------


def key_validity(mask: Any, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """``[B, T]`` bool: which positions are real tokens, from whatever mask ``BertModel`` built: ``None``
    (no padding), 2-D 0/1 (flash attention), 4-D bool (SDPA: True = attend) or 4-D additive float (eager:
    0 = attend, dtype-min = masked)."""
    if mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"token_elimination cannot read an attention mask of type {type(mask).__name__} "
                        f"(flex attention?); use the 'eager' or 'sdpa' attention implementation")
    if mask.dim() == 2:
        return mask.bool().expand(batch, length)
    if mask.dim() != 4:
        raise ValueError(f"token_elimination: unexpected attention mask shape {tuple(mask.shape)}")
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    # A key is a real token if some query may attend to it (bidirectional masks repeat one row).
    return allowed.any(dim=1).any(dim=1).expand(batch, length)


def additive_mask(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B, 1, 1, T]`` additive mask (0 / dtype-min) that both eager and SDPA attention accept."""
    zero = torch.zeros((), dtype=dtype, device=valid.device)
    low = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=valid.device)
    return torch.where(valid, zero, low)[:, None, None, :]


def significance(probs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """PoWER-BERT significance ``[B, T]``: attention received, summed over heads and valid queries.
    Padding gets -inf (never kept over a real token); a real first token ([CLS]) gets +inf (always kept)."""
    probs = probs.detach().float()
    sig = (probs.sum(dim=1) * valid[:, :, None]).sum(dim=1)
    sig = sig.masked_fill(~valid, float("-inf"))
    sig[:, 0] = torch.where(valid[:, 0], torch.full_like(sig[:, 0], float("inf")), sig[:, 0])
    return sig


def ranks(sig: torch.Tensor) -> torch.Tensor:
    """Rank of each position by significance (0 = most significant; ties by position)."""
    if torch.compiler.is_exporting():
        return ranks_by_counting(sig)
    order = torch.argsort(sig, dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(sig.shape[1], device=sig.device).expand_as(order))
    return rank


def ranks_by_counting(sig: torch.Tensor) -> torch.Tensor:
    """The same ranks as the number of positions that beat each one, from ``[B, T, T]`` comparisons: what
    the ONNX graph computes, because ONNX has no stable sort (torch.onnx cannot export ``sort(stable=True)``)
    while comparisons and sums export everywhere. Eager PyTorch keeps the argsort: measured 5-8x faster."""
    pos = torch.arange(sig.shape[1], device=sig.device)
    beats = (sig[:, None, :] > sig[:, :, None]) | ((sig[:, None, :] == sig[:, :, None]) & (pos[None, :] < pos[:, None]))
    return beats.sum(dim=-1)


def select(rank: torch.Tensor, keep: torch.Tensor, *, width: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``[B, W]`` of each row's ``keep`` best tokens in original order (W = ``width``, by default the
    largest keep; shorter rows are filled with dropped positions), and their validity ``[B, W]``."""
    length = rank.shape[1]
    width = int(keep.max()) if width is None else width
    pos = torch.arange(length, device=rank.device).expand_as(rank)
    kept = rank < keep[:, None]
    index = torch.argsort(torch.where(kept, pos, pos + length), dim=-1)[:, :width]
    return index, torch.arange(width, device=rank.device)[None, :] < keep[:, None]


def soft_multiplier(r: torch.Tensor, rank: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Learned retention ``r[rank / L]`` per token ``[B, T]``, linear between bin centres (so the integral
    over the rank axis is exactly ``mean(r)``); [CLS] (rank 0 of a real row) keeps 1."""
    bins = r.shape[0]
    q = (rank.to(r.dtype) + 0.5) / lengths.clamp_min(1)[:, None].to(r.dtype)
    x = (q * bins - 0.5).clamp(0, bins - 1)
    lo = x.floor().long()
    hi = (lo + 1).clamp(max=bins - 1)
    w = x - lo.to(x.dtype)
    mult = r[lo] * (1 - w) + r[hi] * w
    return torch.where(rank == 0, torch.ones_like(mult), mult)


# ----------------------------------------------------------------------------------------------------------
# The encoder wrapper
# ----------------------------------------------------------------------------------------------------------


class _Soft:
    """Learned retention during training: ``r [layers, SOFT_BINS]`` (a plain tensor, deliberately not an
    ``nn.Parameter`` of the encoder, so the saved state dict is unchanged)."""

    def __init__(self, n_layers: int, device: Any, lr: float) -> None:
        self.r = torch.ones(n_layers, SOFT_BINS, device=device, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.r], lr=lr)

    def fractions(self) -> list[float]:
        return [float(f) for f in self.r.detach().clamp(0, 1).mean(dim=-1).cpu()]


class TokenEliminationEncoder(nn.Module):
    """Drop-in for ``BertEncoder`` that eliminates tokens after each layer's attention sublayer (see the
    module docstring). Holds the original ``layer`` ModuleList object and no parameters of its own."""

    def __init__(self, encoder: nn.Module, fractions: Sequence[float]) -> None:
        super().__init__()
        self.config = encoder.config
        self.layer = encoder.layer  # the same ModuleList object: state-dict keys are unchanged
        self.fractions = [float(f) for f in fractions]
        self.soft: _Soft | None = None

    def extra_repr(self) -> str:
        return f"fractions={self.fractions}"

    def forward(self, hidden_states: torch.Tensor, attention_mask: Any = None,
                encoder_hidden_states: Any = None, encoder_attention_mask: Any = None,
                past_key_values: Any = None, use_cache: bool | None = None, **kwargs: Any):
        from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

        if encoder_hidden_states is not None or past_key_values is not None or use_cache:
            raise ValueError("token_elimination supports encoder-only models without a KV cache")
        layers = self.layer
        if len(self.fractions) != len(layers):
            raise RuntimeError(f"token_elimination has a schedule for {len(self.fractions)} layers, the encoder "
                               f"has {len(layers)}; depth must not change after token_elimination")
        batch, length = hidden_states.shape[:2]
        valid = key_validity(attention_mask, batch, length, hidden_states.device)
        lengths = valid.sum(dim=-1)  # real length L of each example: fractions are of L
        current = lengths.clamp_min(1)
        mask = attention_mask  # the model's own mask and kernel until the first elimination
        soft = self.soft if self.training else None
        # Under torch.export (ONNX) nothing may depend on tensor values: a layer eliminates iff its fraction
        # is below 1, and the gathered width is ceil(fraction * T) of the padded length T (>= every row's
        # keep, and equal to it for the longest row when batches are padded to their longest), so the graph
        # has symbolic shapes only. Extra columns are masked like padding: the same predictions.
        exporting = torch.compiler.is_exporting()
        width = length
        for j, layer in enumerate(layers):
            keep = torch.minimum(retained(self.fractions[j], lengths), current)
            eliminates = self.fractions[j] < 1.0 if exporting else bool((keep < current).any())
            if soft is None and not eliminates:
                hidden_states = layer(hidden_states, mask, **kwargs)
                continue
            width = min(width, math.ceil(self.fractions[j] * length - _EPS)) if exporting else None
            if getattr(layer, "gradient_checkpointing", False) and self.training:
                raise RuntimeError("token_elimination does not support gradient checkpointing")
            state: dict[str, torch.Tensor] = {}
            # .to(): the model may have moved device after the hooks were made (the gradient follows).
            r = None if soft is None else soft.r[j].to(hidden_states.device)
            hook = layer.attention.register_forward_hook(_extract_hook(valid, lengths, keep, r, state, width=width))
            config = layer.attention.self.config
            saved = config._attn_implementation
            config._attn_implementation = "eager"  # the probabilities are needed; SDPA returns none
            try:
                hidden_states = layer(hidden_states, additive_mask(valid, hidden_states.dtype), **kwargs)
            finally:
                config._attn_implementation = saved
                hook.remove()
            valid, current = state["valid"], keep
            mask = additive_mask(valid, hidden_states.dtype)
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=hidden_states)


def _extract_hook(valid: torch.Tensor, lengths: torch.Tensor, keep: torch.Tensor, r: torch.Tensor | None,
                  state: dict[str, torch.Tensor], *, width: Any = None):
    """Forward hook on ``BertAttention``: rank tokens by the probabilities it returns, optionally scale
    them by the learned retention, and gather its output down to the kept tokens."""

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        attention_output, probs = output[0], output[1]
        if probs is None:
            raise RuntimeError("token_elimination got no attention probabilities; the attention kernel of "
                               f"{type(module).__name__} did not honour the eager implementation")
        rank = ranks(significance(probs, valid))
        if r is not None:
            attention_output = attention_output * soft_multiplier(r, rank, lengths)[..., None].to(
                attention_output.dtype)
        index, state["valid"] = select(rank, keep, width=width)
        gathered = attention_output.gather(1, index[..., None].expand(-1, -1, attention_output.shape[-1]))
        return (gathered,) + tuple(output[1:])

    return hook


def install(model: nn.Module, fractions: Sequence[float]) -> TokenEliminationEncoder:
    """Wrap ``model``'s encoder (or update the schedule of an existing wrapper)."""
    base = base_model(model)
    encoder = base.encoder
    if not isinstance(encoder, TokenEliminationEncoder):
        encoder = TokenEliminationEncoder(encoder, fractions)
        base.encoder = encoder
    if len(fractions) != len(encoder.layer):
        raise ValueError(f"a schedule of {len(fractions)} fractions for an encoder of {len(encoder.layer)} layers")
    encoder.fractions = [float(f) for f in fractions]
    return encoder


def _wrapper(model: nn.Module) -> TokenEliminationEncoder:
    encoder = getattr(base_model(model), "encoder", None)
    if not isinstance(encoder, TokenEliminationEncoder):
        raise ValueError("token_elimination: the model's encoder is not wrapped (apply/restore 'apply' first)")
    return encoder


# ----------------------------------------------------------------------------------------------------------
# The technique
# ----------------------------------------------------------------------------------------------------------


class TokenElimination(Technique):
    name = "token_elimination"
    description = ("PoWER-BERT progressive token elimination: after each layer's attention, keep the tokens "
                   "that receive the most attention and drop the rest from the sequence, so later FFNs and "
                   "layers run on fewer tokens. Saves FLOPs and latency, not size (no weights removed).")
    stage = Stage.STRUCTURE
    order = 30  # after head pruning and low-rank (it only calls their modules), before weight sharing
    params = (
        FloatParam("keep_final", 0.1, 1.0, 1.0,
                   help="fraction of each input's tokens kept after the last layer (1 = no elimination)"),
        FloatParam("start_layer", 0.0, 0.9, 0.0,
                   help="fraction of the depth before elimination begins (0 = from the first layer)"),
        FloatParam("power", 0.25, 4.0, 1.0, log=True,
                   help="shape of the decay from 1 to keep_final (<1: drop early, >1: drop late)"),
        CategoricalParam("learn", (False, True), False, searched=False,
                         help="learn the retention per layer during recovery (PoWER-BERT soft-extract)"),
        FloatParam("mass_lambda", 1e-4, 1.0, 1e-2, log=True, searched=False,
                   help="learn: weight of the retained-mass regulariser (higher = fewer tokens)"),
        FloatParam("retention_lr", 1e-4, 1e-1, 1e-2, log=True, searched=False,
                   help="learn: Adam learning rate of the retention parameters"),
    )
    reduces = frozenset({"flops", "latency", "tokens"})

    def identity_params(self) -> dict[str, Any]:
        return {"keep_final": 1.0}

    def example_params(self) -> dict[str, Any]:
        return {"keep_final": 0.5}

    def supports(self, model: nn.Module, *, device: str = "cpu") -> str | None:
        try:
            layers = encoder_layers(model)
            if len(layers) == 0 or not all(hasattr(layer.attention, "self") and hasattr(layer, "intermediate")
                                           for layer in layers):
                raise ValueError
        except (AttributeError, ValueError):
            return (f"token elimination needs a BERT-like encoder (.bert.encoder.layer[i].attention.self); "
                    f"got {type(model).__name__}")
        config = getattr(model, "config", None)
        if getattr(config, "is_decoder", False):
            return "token elimination needs an encoder-only (bidirectional) model, not a decoder"
        return None

    def schedule(self, model: nn.Module, params: Mapping[str, Any]) -> list[float]:
        return retention_schedule(len(encoder_layers(model)), float(params["keep_final"]),
                                  float(params["start_layer"]), float(params["power"]))

    def apply(self, model: nn.Module, *, params: Mapping[str, Any], ctx: TechniqueContext) -> dict[str, Any]:
        fractions = self.schedule(model, params)
        install(model, fractions)
        ctx.log(f"token_elimination: kept fraction per layer {fractions}")
        return {"fractions": fractions}

    def training_hooks(self, model: nn.Module, *, params: Mapping[str, Any],
                       ctx: TechniqueContext) -> TrainingHooks | None:
        if not params.get("learn", False):
            return None
        encoder = _wrapper(model)
        device = next(model.parameters()).device
        soft = encoder.soft = _Soft(len(encoder.layer), device, float(params["retention_lr"]))
        weight = float(params["mass_lambda"])

        def loss(batch: Mapping[str, Any], outputs: Any, model: nn.Module) -> torch.Tensor:
            return weight * soft.r.clamp(0, 1).mean(dim=-1).sum().to(outputs.logits.device)

        def before_step(step: int, total: int) -> None:
            soft.optimizer.zero_grad(set_to_none=True)

        def after_step(step: int, total: int) -> None:
            soft.optimizer.step()
            with torch.no_grad():
                soft.r.clamp_(0, 1)
            if step + 1 >= total:  # hard extraction from here on, so FLOPs are counted as deployed
                self._harden(encoder, ctx)

        return TrainingHooks(loss=loss, before_step=before_step, after_step=after_step)

    def _harden(self, encoder: TokenEliminationEncoder, ctx: TechniqueContext) -> None:
        """Replace the schedule by the learned one (capped by the hard schedule) and drop the soft layer."""
        if encoder.soft is None:
            return
        learned = encoder.soft.fractions()
        encoder.fractions = monotone([min(h, f) for h, f in zip(encoder.fractions, learned)])
        encoder.soft = None
        ctx.log(f"token_elimination: learned kept fraction per layer {encoder.fractions}")

    def finalize(self, model: nn.Module, *, params: Mapping[str, Any],
                 ctx: TechniqueContext) -> dict[str, Any] | None:
        if not params.get("learn", False):
            return None
        encoder = _wrapper(model)
        self._harden(encoder, ctx)  # no-op when training already switched to hard extraction
        return {"fractions": list(encoder.fractions)}

    def restore(self, model: nn.Module, *, phase: str, params: Mapping[str, Any],
                record: Mapping[str, Any] | None) -> None:
        if not record or phase not in ("apply", "finalize"):
            return
        fractions = [float(f) for f in record["fractions"]]
        if phase == "apply":
            install(model, fractions)
        else:
            _wrapper(model).fractions = fractions


@hookimpl
def register_techniques(register) -> None:
    register(TokenElimination())
