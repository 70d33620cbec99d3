"""int8 building blocks of the ``quantization`` plugin: weight scales (per channel, per group, per
tensor), the fake quantisation used by quantisation-aware training (the same rounding as the kernels), and
the two int8 modules, :class:`Int8DynamicLinear` (fbgemm/x86 dynamic-quantised matmul) and
:class:`Int8Embedding` (weight-only int8 rows). Kept apart from the technique (``quantization.py``) so
each stays readable; nothing here knows about pipelines or search.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

_EPS = torch.finfo(torch.float32).eps
#: Weight widths: 8 runs and stores int8; 4 / 3 / 2 store packed (Q-BERT-style low-bit) and run the same int8
#: kernels on the unpacked values, so they save size, not time.
BITS = (8, 4, 3, 2)

# ----------------------------------------------------------------------------------------------------------
# Scales (shared by the int8 modules and the fake quantisation of QAT, so both round identically)
# ----------------------------------------------------------------------------------------------------------


def levels(bits: int) -> tuple[int, int]:
    """(lowest, highest) signed integer a ``bits``-bit weight takes: (-128, 127) for 8, (-8, 7) for 4."""
    if int(bits) not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    return -(1 << (int(bits) - 1)), (1 << (int(bits) - 1)) - 1


def weight_scales(weight: torch.Tensor, group_size: int, bits: int = 8) -> torch.Tensor:
    """Symmetric scales of ``weight`` ``[out, in]``, one per ``group_size`` consecutive output rows (the last
    group may be shorter): ``max|w| / 127.5`` for 8 bits, as torch's ``MinMaxObserver`` computes them
    (``max|w| / 7.5`` for 4 bits: the same rule, half a level past the top so -8 is used too)."""
    out = weight.shape[0]
    g = max(1, min(int(group_size), out))
    n = math.ceil(out / g)
    row = weight.detach().abs().amax(dim=1).float()
    amax = F.pad(row, (0, n * g - out)).reshape(n, g).amax(dim=1)
    return (amax / (levels(bits)[1] + 0.5)).clamp_min(_EPS)


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed ``bits``-bit integers (an int8 tensor) packed densely into a flat uint8 tensor: each run of
    8 values (offset to unsigned) fills ``bits`` bytes. 8 bits is a plain reinterpretation."""
    if bits == 8:
        return q.reshape(-1).view(torch.uint8).clone()
    lo, hi = levels(bits)
    flat = q.reshape(-1).to(torch.int64) - lo
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) > hi - lo):
        raise ValueError(f"values outside the {bits}-bit range [{lo}, {hi}]")
    flat = F.pad(flat, (0, -flat.numel() % 8)).reshape(-1, 8)
    word = (flat << (torch.arange(8, dtype=torch.int64) * bits)).sum(dim=1)  # 8 * bits <= 32 bits
    return ((word[:, None] >> (torch.arange(bits, dtype=torch.int64) * 8)) & 0xFF).to(torch.uint8).reshape(-1)


def unpack_bits(packed: torch.Tensor, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the int8 tensor of ``shape``."""
    n = math.prod(shape)
    if bits == 8:
        return packed.reshape(-1)[:n].view(torch.int8).reshape(shape).clone()
    lo = levels(bits)[0]
    b = packed.reshape(-1, bits).to(torch.int64)
    word = (b << (torch.arange(bits, dtype=torch.int64) * 8)).sum(dim=1)
    vals = (word[:, None] >> (torch.arange(8, dtype=torch.int64) * bits)) & ((1 << bits) - 1)
    return (vals.reshape(-1)[:n] + lo).to(torch.int8).reshape(shape)


def packed_numel(shape: tuple[int, ...], bits: int) -> int:
    n = math.prod(shape)
    return n if bits == 8 else math.ceil(n / 8) * int(bits)


def row_scales(scales: torch.Tensor, group_size: int, out_features: int) -> torch.Tensor:
    """Expand group scales to one per output row."""
    return scales.repeat_interleave(max(1, int(group_size)))[:out_features]


def fake_quantize_weight(weight: torch.Tensor, group_size: int, bits: int = 8) -> torch.Tensor:
    """``weight`` rounded to its ``bits``-bit grid (forward) with an identity gradient (straight-through)."""
    s = row_scales(weight_scales(weight, group_size, bits), group_size, weight.shape[0])[:, None]
    q = (weight.detach().float() / s).round().clamp(*levels(bits)) * s
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


def embedding_scales(rows: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Symmetric scales of embedding ``rows`` ``[..., D]``: one per ``group`` consecutive columns of a row
    (0: the whole row), ``max|w| / (2^(bits-1) - 1)``; shape ``[..., D / group]``."""
    d = rows.shape[-1]
    g = d if not group else int(group)
    amax = rows.detach().float().abs().reshape(*rows.shape[:-1], d // g, g).amax(dim=-1)
    return (amax / levels(bits)[1]).clamp_min(_EPS)


def grouped(rows: torch.Tensor, scales: torch.Tensor, op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``op(rows, scale)`` with each scale of ``scales`` ``[..., n]`` broadcast over its ``D / n`` columns of
    ``rows`` ``[..., D]`` (a view, no expanded copy of the scales: this is on every forward)."""
    *lead, d = rows.shape
    n = scales.shape[-1]
    return op(rows.reshape(*lead, n, d // n), scales[..., None]).reshape(*lead, d)


def fake_quantize_rows(rows: torch.Tensor, bits: int = 8, group: int = 0) -> torch.Tensor:
    """Embedding rows rounded as :class:`Int8Embedding` stores them (``bits`` wide, a scale per ``group``
    columns of a row, 0: per row)."""
    rd = rows.detach().float()
    s = embedding_scales(rd, bits, group)
    hi = levels(bits)[1]
    q = grouped(grouped(rd, s, torch.div).round().clamp(-hi, hi), s, torch.mul)
    return rows + (q.to(rows.dtype) - rows).detach()


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
                 per_channel: bool | None = None, bits: int = 8) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.bits = int(bits)
        levels(self.bits)  # validates
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
    def from_float(cls, linear: nn.Linear, *, group_size: int = 1, per_channel: bool | None = None,
                   bits: int = 8) -> "Int8DynamicLinear":
        """Quantise ``linear``'s weight symmetrically to ``bits`` and copy its bias as float32."""
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size=group_size,
                  per_channel=per_channel, bits=bits)
        w = linear.weight.detach().to(device="cpu", dtype=torch.float32)
        scale = weight_scales(w, mod.group_size, mod.bits)
        mod.weight_int8.copy_(torch.round(w / row_scales(scale, mod.group_size, mod.out_features)[:, None])
                              .clamp_(*levels(mod.bits)).to(torch.int8))
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

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        _save_packed(self, destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        zero_point = state_dict.pop(prefix + "weight_zero_point", None)  # older files: always zeros
        if zero_point is not None and bool((zero_point != 0).any()):
            error_msgs.append(f"{prefix}weight_zero_point: non-zero zero points; this module is symmetric")
        _unpack_into(self, state_dict, prefix, error_msgs)
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
                f"bias={self.bias is not None}, group_size={self.group_size}, bits={self.bits}")


class Int8Embedding(nn.Module):
    """An embedding table stored as int8 with one float32 scale per row (symmetric, ``max|w| / 127``).

    The forward gathers the int8 rows and their scales and dequantises only those, returning the dtype the
    model was last cast to (float32 unless ``model.to(bfloat16)`` etc.; the scales stay float32). Runs on
    any device. Buffers (saved): ``weight_int8`` ``[V, D]`` int8, ``weight_scale`` ``[V]`` float32.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, *,
                 bits: int = 8, group: int = 0) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = int(num_embeddings), int(embedding_dim), padding_idx
        self.bits, self.group = int(bits), int(group) if group and int(group) < self.embedding_dim else 0
        levels(self.bits)
        if self.group and self.embedding_dim % self.group:
            raise ValueError(f"embedding group {group} does not divide the embedding width {self.embedding_dim}")
        n_scales = self.embedding_dim // self.group if self.group else 1
        self.register_buffer("weight_int8", torch.zeros(self.num_embeddings, self.embedding_dim, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(self.num_embeddings, *((n_scales,) if self.group else ()),
                                                        dtype=torch.float32))
        self.out_dtype = torch.float32

    @classmethod
    def from_float(cls, emb: nn.Embedding, *, bits: int = 8, group: int = 0) -> "Int8Embedding":
        w = emb.weight.detach().float()
        mod = cls(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, bits=bits, group=group).to(w.device)
        scale = embedding_scales(w, mod.bits, mod.group)
        hi = levels(mod.bits)[1]
        mod.weight_int8.copy_(grouped(w, scale, torch.div).round_().clamp_(-hi, hi).to(torch.int8))
        mod.weight_scale.copy_(scale.reshape(mod.weight_scale.shape))
        mod.out_dtype = emb.weight.dtype
        return mod

    def _dequantize(self, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return grouped(q.float(), scales if self.group else scales[:, None], torch.mul)

    def dequantized_weight(self) -> torch.Tensor:
        return self._dequantize(self.weight_int8, self.weight_scale)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        flat = input_ids.reshape(-1)
        rows = self._dequantize(self.weight_int8.index_select(0, flat), self.weight_scale.index_select(0, flat))
        return rows.reshape(*input_ids.shape, self.embedding_dim).to(self.out_dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        _save_packed(self, destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        _unpack_into(self, state_dict, prefix, error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

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
        per = f"per {self.group} columns" if self.group else "per row"
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.bits}-bit {per}, out_dtype={self.out_dtype}"


# ----------------------------------------------------------------------------------------------------------
# Low-bit storage: below 8 bits the file holds ``weight_packed`` (uint8, dense) instead of ``weight_int8``;
# in memory the module keeps the unpacked int8 values, so the kernels and the forward are unchanged.
# ----------------------------------------------------------------------------------------------------------


def _save_packed(mod: nn.Module, destination: dict, prefix: str, keep_vars: bool) -> None:
    nn.Module._save_to_state_dict(mod, destination, prefix, keep_vars)
    if mod.bits < 8:
        q = destination.pop(prefix + "weight_int8")
        destination[prefix + "weight_packed"] = pack_bits(q.detach().cpu(), mod.bits)


def _unpack_into(mod: nn.Module, state_dict: dict, prefix: str, error_msgs: list[str]) -> None:
    packed = state_dict.pop(prefix + "weight_packed", None)
    if packed is None:
        if mod.bits < 8:
            error_msgs.append(f"{prefix}weight_packed: missing; this {mod.bits}-bit module stores its weight packed")
        return
    shape = tuple(mod.weight_int8.shape)
    if mod.bits == 8 or packed.numel() != packed_numel(shape, mod.bits):
        error_msgs.append(f"{prefix}weight_packed: {packed.numel()} bytes do not hold a {mod.bits}-bit {list(shape)} "
                          f"weight; the file was written with other quantization settings")
        return
    state_dict[prefix + "weight_int8"] = unpack_bits(packed, mod.bits, shape)
