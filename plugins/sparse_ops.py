"""Building blocks of the ``movement_pruning`` plugin that know nothing about training: the cubic
sparsity schedule, top-v masks (per matrix and global with a per-layer floor) and sparse weight storage
(:class:`SparseLinear`: kept values + packed bitmask or int32 indices). Kept apart from the technique
(``movement_pruning.py``) so each stays readable.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------------------------------------
# Schedule and top-v masks
# ----------------------------------------------------------------------------------------------------------


def cubic_sparsity(step: float, total: int, target: float, initial_warmup: float, final_warmup: float) -> float:
    """Sparsity after ``step`` of ``total`` optimiser steps: 0 until ``initial_warmup * total``, cubic
    ramp to ``target`` at ``(1 - final_warmup) * total``, then ``target`` (Zhu & Gupta 2017)."""
    if total <= 0:
        return float(target)
    start, end = initial_warmup * total, (1.0 - final_warmup) * total
    if step < start:
        return 0.0
    if step >= end:
        return float(target)
    p = (step - start) / (end - start)
    return float(target) * (1.0 - (1.0 - p) ** 3)


def n_pruned(fraction: float, n: int) -> int:
    return int(math.floor(fraction * n + 0.5))  # round half up, as head_pruning does


def top_mask(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Boolean mask of the ``n_keep`` highest of a 1-D ``scores``; ties go to the lower index.
    ``kthvalue`` (selection, O(n)) rather than a sort: it runs every step on every matrix."""
    n = scores.numel()
    if n_keep >= n:
        return torch.ones(n, dtype=torch.bool, device=scores.device)
    flat = scores.detach().float()
    threshold = torch.kthvalue(flat, n - n_keep).values
    mask = flat > threshold
    missing = n_keep - int(mask.sum())
    if missing > 0:
        ties = flat == threshold
        mask |= ties & (torch.cumsum(ties.int(), 0) <= missing)
    return mask


def global_masks(scores: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """Top-v over the concatenation of per-layer ``scores``, keeping each layer's best unit whatever it
    scores (a layer without heads or FFN neurons is not representable by the surgery helpers)."""
    sizes = [s.numel() for s in scores]
    total = sum(sizes)
    n_keep = max(len(scores), total - n_pruned(sparsity, total))
    flat = torch.cat([s.detach().float().reshape(-1) for s in scores])
    offset = 0
    for s, n in zip(scores, sizes):
        flat[offset + int(s.detach().argmax())] = math.inf
        offset += n
    return list(top_mask(flat, n_keep).split(sizes))


# ----------------------------------------------------------------------------------------------------------
# Sparse storage
# ----------------------------------------------------------------------------------------------------------


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor (flattened, row-major) into int32 words, bit ``i % 32`` of word ``i // 32``.
    int32 rather than uint8 so the mask is not counted as weights (``param_count`` counts int8/uint8
    buffers as quantised weights); the bytes on disk are the same."""
    flat = mask.reshape(-1).to(torch.int64)
    flat = F.pad(flat, (0, (-flat.numel()) % 32))
    shifts = torch.arange(32, device=flat.device, dtype=torch.int64)
    words = (flat.view(-1, 32) << shifts).sum(dim=1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # two's complement wrap


def unpack_bits(words: torch.Tensor, n: int) -> torch.Tensor:
    shifts = torch.arange(32, device=words.device, dtype=torch.int64)
    bits = ((words.to(torch.int64) & 0xFFFFFFFF)[:, None] >> shifts) & 1
    return bits.reshape(-1)[:n].bool()


class SparseLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` stored sparsely: ``values`` (the kept weights, row-major) and either
    ``bitmask`` (int32 words, one bit per weight: 1/32 of the dense fp32 bytes) or ``indices`` (int32 flat
    positions, smaller when fewer than 1/32 of the weights are kept). Saves size on disk and in parameter
    count, **not time**: ``forward`` rebuilds the dense weight once (a non-persistent cache) and runs
    ``F.linear``. Exposes ``in_features`` / ``out_features`` / ``bias`` / ``weight`` (read-only, dense)."""

    def __init__(self, in_features: int, out_features: int, nnz: int, bias: bool = True, *,
                 index_format: str = "bitmask", device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        if index_format not in ("bitmask", "indices"):
            raise ValueError(f"index_format must be 'bitmask' or 'indices', got {index_format!r}")
        self.in_features, self.out_features, self.index_format = int(in_features), int(out_features), index_format
        dtype = dtype or torch.float32
        self.values = nn.Parameter(torch.zeros(int(nnz), device=device, dtype=dtype), requires_grad=False)
        n = self.in_features * self.out_features
        size = (n + 31) // 32 if index_format == "bitmask" else int(nnz)
        self.register_buffer(index_format, torch.zeros(size, device=device, dtype=torch.int32))
        self.bias = (nn.Parameter(torch.zeros(self.out_features, device=device, dtype=dtype), requires_grad=False)
                     if bias else None)
        self._dense: torch.Tensor | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, mask: torch.Tensor) -> "SparseLinear":
        """``linear``'s weight where ``mask`` is true (zero elsewhere), in the smaller index format."""
        w = linear.weight.detach()
        keep = mask.reshape(-1).to(device=w.device, dtype=torch.bool)
        nnz = int(keep.sum())
        fmt = "indices" if nnz < keep.numel() / 32 else "bitmask"
        new = cls(linear.in_features, linear.out_features, nnz, linear.bias is not None, index_format=fmt,
                  device=w.device, dtype=w.dtype)
        with torch.no_grad():
            new.values.copy_(w.reshape(-1)[keep])
            if fmt == "bitmask":
                new.bitmask.copy_(pack_bits(keep))
            else:
                new.indices.copy_(keep.nonzero().reshape(-1).to(torch.int32))
            if linear.bias is not None:
                new.bias.copy_(linear.bias.detach())
        new.train(linear.training)
        return new

    def _rebuild(self) -> torch.Tensor:
        # Outside inference mode: a cache made inside it could not be used by a later autograd-enabled call.
        with torch.inference_mode(False), torch.no_grad():
            n = self.in_features * self.out_features
            dense = torch.zeros(n, device=self.values.device, dtype=self.values.dtype)
            where = (unpack_bits(self.bitmask, n) if self.index_format == "bitmask" else self.indices.long())
            dense[where] = self.values
            return dense.view(self.out_features, self.in_features)

    @property
    def weight(self) -> torch.Tensor:
        if self._dense is None or self._dense.device != self.values.device or self._dense.dtype != self.values.dtype:
            self._dense = self._rebuild()
        return self._dense

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._dense = None

    def _apply(self, fn, recurse: bool = True):
        self._dense = None
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_dense": None}  # a cache: not worth copying or pickling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.values.numel()}, "
                f"format={self.index_format}")
