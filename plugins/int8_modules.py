"""int8 building blocks of the ``quantization`` plugin: weight scales (per channel, per group, per
tensor), the fake quantisation used by quantisation-aware training (the same rounding as the kernels), and
the two int8 modules, :class:`Int8DynamicLinear` (fbgemm/x86 dynamic-quantised matmul) and
:class:`Int8Embedding` (weight-only int8 rows). Kept apart from the technique (``quantization.py``) so
each stays readable; nothing here knows about pipelines or search.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_EPS = torch.finfo(torch.float32).eps

# ----------------------------------------------------------------------------------------------------------
# Scales (shared by the int8 modules and the fake quantisation of QAT, so both round identically)
# ----------------------------------------------------------------------------------------------------------


def weight_scales(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """Symmetric int8 scales of ``weight`` ``[out, in]``, one per ``group_size`` consecutive output rows
    (the last group may be shorter): ``max|w| / 127.5``, as torch's ``MinMaxObserver`` computes them."""
    out = weight.shape[0]
    g = max(1, min(int(group_size), out))
    n = math.ceil(out / g)
    row = weight.detach().abs().amax(dim=1).float()
    amax = F.pad(row, (0, n * g - out)).reshape(n, g).amax(dim=1)
    return (amax / 127.5).clamp_min(_EPS)


def row_scales(scales: torch.Tensor, group_size: int, out_features: int) -> torch.Tensor:
    """Expand group scales to one per output row."""
    return scales.repeat_interleave(max(1, int(group_size)))[:out_features]


def fake_quantize_weight(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """``weight`` rounded to its int8 grid (forward) with an identity gradient (straight-through)."""
    s = row_scales(weight_scales(weight, group_size), group_size, weight.shape[0])[:, None]
    q = (weight.detach().float() / s).round().clamp(-128, 127) * s
    return weight + (q.to(weight.dtype) - weight).detach()


def fake_quantize_activation(x: torch.Tensor) -> torch.Tensor:
    """What the dynamic kernel does to its input: asymmetric per-tensor quantisation to 7 bits
    (``reduce_range``) with min/max (including 0) of this very call; straight-through gradient."""
    xd = x.detach().float()
    lo, hi = xd.amin().clamp(max=0), xd.amax().clamp(min=0)
    scale = ((hi - lo) / 127).clamp_min(_EPS)
    zero = (-lo / scale).round().clamp(0, 127)
    q = ((xd / scale).round() + zero).clamp(0, 127).sub(zero).mul(scale)
    return x + (q.to(x.dtype) - x).detach()


def fake_quantize_rows(rows: torch.Tensor) -> torch.Tensor:
    """Embedding rows rounded as :class:`Int8Embedding` stores them (per row, ``max|w| / 127``)."""
    rd = rows.detach().float()
    s = (rd.abs().amax(dim=-1, keepdim=True) / 127).clamp_min(_EPS)
    return rows + (((rd / s).round().clamp(-127, 127) * s).to(rows.dtype) - rows).detach()


# ----------------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------------


class Int8DynamicLinear(nn.Module):
    """``y = x W^T + b`` with W stored as int8 and x quantised per call (dynamic quantisation).

    Buffers (all saved): ``weight_int8`` int8 ``[out, in]``; ``weight_scale`` float32, one per
    ``group_size`` output rows (``group_size`` 1: per channel; ``out_features``: per tensor); ``bias``
    float32 ``[out]`` or absent. Symmetric, so no zero points are stored (files written before this
    loaded an all-zero ``weight_zero_point``, which is accepted and dropped). CPU only; accepts inputs of
    any leading shape and float dtype (computed in float32, returned in the input dtype).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, group_size: int = 1,
                 per_channel: bool | None = None) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        if per_channel is not None:  # the older boolean spelling
            group_size = 1 if per_channel else self.out_features
        self.group_size = max(1, min(int(group_size), self.out_features))
        n_scales = math.ceil(self.out_features / self.group_size)
        self.register_buffer("weight_int8", torch.zeros(self.out_features, self.in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(n_scales, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(self.out_features, dtype=torch.float32) if bias else None)
        self._packed: Any = None  # the kernel's prepacked weight: a cache, never saved

    @property
    def per_channel(self) -> bool:
        return self.weight_scale.numel() != 1

    @classmethod
    def from_float(cls, linear: nn.Linear, *, group_size: int = 1,
                   per_channel: bool | None = None) -> "Int8DynamicLinear":
        """Quantise ``linear``'s weight symmetrically to int8 and copy its bias as float32."""
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size=group_size,
                  per_channel=per_channel)
        w = linear.weight.detach().to(device="cpu", dtype=torch.float32)
        scale = weight_scales(w, mod.group_size)
        mod.weight_int8.copy_(torch.round(w / row_scales(scale, mod.group_size, mod.out_features)[:, None])
                              .clamp_(-128, 127).to(torch.int8))
        mod.weight_scale.copy_(scale)
        if linear.bias is not None:
            mod.bias.copy_(linear.bias.detach().to(device="cpu", dtype=torch.float32))
        mod._pack()
        return mod

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight the kernel effectively multiplies by (for analysis and tests)."""
        return self.weight_int8.float() * row_scales(self.weight_scale, self.group_size, self.out_features)[:, None]

    # -- the packed-weight cache ----------------------------------------------------------------------
    def _pack(self) -> None:
        if self.weight_int8.device.type != "cpu":
            raise RuntimeError("Int8DynamicLinear runs CPU kernels only; move the model to CPU")
        with warnings.catch_warnings():
            # The qint8 wrapper is the deprecated part (pytorch#184982); it lives only inside the kernel's
            # packed weight, so the warning tells the user nothing they can act on.
            warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*")
            if self.per_channel:
                scale = row_scales(self.weight_scale, self.group_size, self.out_features).to(torch.float64)
                qweight = torch._make_per_channel_quantized_tensor(
                    self.weight_int8, scale, torch.zeros(self.out_features, dtype=torch.int64), 0)
            else:
                qweight = torch._make_per_tensor_quantized_tensor(self.weight_int8, float(self.weight_scale[0]), 0)
        bias = None if self.bias is None else self.bias.float()
        self._packed = torch.ops.quantized.linear_prepack(qweight, bias)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        zero_point = state_dict.pop(prefix + "weight_zero_point", None)  # older files: always zeros
        if zero_point is not None and bool((zero_point != 0).any()):
            error_msgs.append(f"{prefix}weight_zero_point: non-zero zero points; this module is symmetric")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self._packed = None  # repacked lazily from the loaded buffers on the next forward

    def _apply(self, fn, recurse: bool = True):
        # ``model.half()`` / ``.to(bfloat16)`` would cast the scales and bias too and silently change the
        # results; keep quantisation metadata in float32 whatever the surrounding model's dtype.
        kept = {n: b for n, b in self._buffers.items() if b is not None and b.dtype == torch.float32}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers[name]
            if new is not None and new.dtype != torch.float32:
                self._buffers[name] = old.to(new.device)
        self._packed = None
        return self

    def __getstate__(self) -> dict[str, Any]:
        # The packed weight is an opaque kernel object: drop it from pickles/deep copies, rebuild on use.
        return {**self.__dict__, "_packed": None}

    # -- compute --------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is None:
            self._pack()
        if x.device.type != "cpu":
            raise RuntimeError("Int8DynamicLinear runs CPU kernels only; got an input on " + str(x.device))
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(torch.float32).contiguous()
        # reduce_range=True quantises activations to 7 bits, exactly as torch's dynamic Linear does on
        # fbgemm/x86: it keeps the u8 x s8 pairwise sums of the AVX2/AVX-512 kernels from saturating int16.
        y = torch.ops.quantized.linear_dynamic(x2, self._packed, True)
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, group_size={self.group_size}")


class Int8Embedding(nn.Module):
    """An embedding table stored as int8 with one float32 scale per row (symmetric, ``max|w| / 127``).

    The forward gathers the int8 rows and their scales and dequantises only those, returning the dtype the
    model was last cast to (float32 unless ``model.to(bfloat16)`` etc.; the scales stay float32). Runs on
    any device. Buffers (saved): ``weight_int8`` ``[V, D]`` int8, ``weight_scale`` ``[V]`` float32.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = int(num_embeddings), int(embedding_dim), padding_idx
        self.register_buffer("weight_int8", torch.zeros(self.num_embeddings, self.embedding_dim, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(self.num_embeddings, dtype=torch.float32))
        self.out_dtype = torch.float32

    @classmethod
    def from_float(cls, emb: nn.Embedding) -> "Int8Embedding":
        w = emb.weight.detach().float()
        mod = cls(emb.num_embeddings, emb.embedding_dim, emb.padding_idx).to(w.device)
        scale = (w.abs().amax(dim=1) / 127).clamp_min(_EPS)
        mod.weight_int8.copy_(torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8))
        mod.weight_scale.copy_(scale)
        mod.out_dtype = emb.weight.dtype
        return mod

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_int8.float() * self.weight_scale[:, None]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        flat = input_ids.reshape(-1)
        rows = self.weight_int8.index_select(0, flat).float() * self.weight_scale.index_select(0, flat)[:, None]
        return rows.reshape(*input_ids.shape, self.embedding_dim).to(self.out_dtype)

    def _apply(self, fn, recurse: bool = True):
        # Keep the scales float32 under model-wide casts, but follow the cast for the output dtype (a
        # bf16 model's LayerNorm wants bf16 input). Probe with the current output dtype, so a plain
        # ``.to(device)`` keeps it.
        scale = self.weight_scale
        super()._apply(fn, recurse)
        if self.weight_scale.dtype != torch.float32:
            self._buffers["weight_scale"] = scale.to(self.weight_scale.device)
        probe = fn(torch.zeros(0, dtype=self.out_dtype, device=scale.device))
        if isinstance(probe, torch.Tensor) and probe.is_floating_point():
            self.out_dtype = probe.dtype
        return self

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per row, out_dtype={self.out_dtype}"
