"""Low-rank factorisation of the encoder's Linear layers (truncated SVD) and ALBERT's factorised
embedding (Lan et al., 2020, "ALBERT: A Lite BERT").

Linear layers: a trained weight ``W`` (out x in) is replaced by its best rank-``r`` approximation in the
Frobenius norm (Eckart-Young), ``W ~= U_r S_r V_r^T``, stored as two Linear layers: ``first`` (in -> r,
weight ``sqrt(S_r) V_r^T``, no bias) and ``second`` (r -> out, weight ``U_r sqrt(S_r)``, the original
bias). The square root splits the scale evenly between the factors so neither starts out tiny or huge
for recovery training. The rank is chosen per module kind ("attention": query/key/value and the
attention output projection; "ffn": intermediate and output dense) either as a fraction of the full rank
or as the smallest rank keeping a fraction of the spectral energy ``sum S_i^2`` (so each matrix gets the
rank its own spectrum needs).

A layer is factorised only when it gets smaller: ``r * (in + out) < in * out``; otherwise it stays an
``nn.Linear`` (logged and recorded). Params, saved size and FLOPs fall in proportion. Latency is another
matter: two thin matmuls replace one wide one, and small GEMMs run below peak throughput, so wall-clock
gains appear only when ``r`` is well below break-even (about half of it or less: for MiniLM's 384x384
attention matrices break-even is r = 192, for its 384x1536 FFN matrices r = 307). Near break-even the
factorised model can be *slower* than the original while still being smaller.

Factorised embedding: the word embedding ``V x H`` becomes a ``V x E`` lookup table followed by an
``E -> H`` projection, both from the truncated SVD of the trained matrix (the table holds ``U_E S_E``,
the projection the orthonormal ``V_E^T``). On all-MiniLM-L6-v2 the 30522 x 384 embedding is 11.7M of
the model's 22.7M parameters (~47 MB of ~90 MB in fp32); E = 128 saves ~31 MB. It does not reduce
FLOPs: the lookup is free and the projection *adds* ``E * H`` multiply-adds per token. On the tiny test
vocabulary (33 words) it can never save anything, so the tiny examples leave it off. The factorised
module has no dense ``weight``: sequence classifiers tie nothing to it, but ``resize_token_embeddings``
and LM-head weight tying are not supported on a factorised model.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn

from autocompress import hookimpl
from autocompress.surgery import base_prefix, encoder_layers, set_module, sliced_linear, unique_layers
from autocompress.technique import CategoricalParam, FloatParam, IntParam, Stage, Technique, TechniqueContext

# Encoder sub-modules of each kind, relative to a BertLayer.
KINDS: dict[str, tuple[str, ...]] = {
    "attention": ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"),
    "ffn": ("intermediate.dense", "output.dense"),
}


# ----------------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------------


class LowRankLinear(nn.Module):
    """``y = second(first(x))``: a Linear map of rank at most ``rank`` stored as two factors.

    ``first``: ``nn.Linear(in_features, rank, bias=False)``; ``second``: ``nn.Linear(rank, out_features)``
    (with the original bias). Both are plain ``nn.Linear`` so quantisation and masking code treat them
    like any other Linear. :meth:`sliced` lets :func:`autocompress.surgery.sliced_linear` (and so head and
    FFN-neuron pruning) remove output rows or input columns.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, *,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        if not 1 <= rank:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.first = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.second = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    # Derived from the factors, so slicing a factor can never leave them stale.
    @property
    def in_features(self) -> int:
        return self.first.in_features

    @property
    def out_features(self) -> int:
        return self.second.out_features

    @property
    def rank(self) -> int:
        return self.first.out_features

    @property
    def bias(self) -> torch.Tensor | None:
        return self.second.bias

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int,
                    svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> "LowRankLinear":
        """The rank-``rank`` truncated SVD of ``linear`` (exact up to rounding when rank = full rank);
        ``svd`` is its ``(U, S, V^T)`` if already computed."""
        w = linear.weight.detach()
        u, s, vh = svd if svd is not None else _svd(w)
        root = s[:rank].sqrt()
        new = torch.nn.utils.skip_init(cls, linear.in_features, linear.out_features, rank,
                                       bias=linear.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            new.first.weight.copy_(root[:, None] * vh[:rank])
            new.second.weight.copy_(u[:, :rank] * root[None, :])
            if linear.bias is not None:
                new.second.bias.copy_(linear.bias.detach())
        for p in new.parameters():
            p.requires_grad_(linear.weight.requires_grad)
        new.train(linear.training)
        return new

    def dense_weight(self) -> torch.Tensor:
        """The ``out x in`` matrix this module multiplies by (for analysis and tests)."""
        return self.second.weight @ self.first.weight

    def sliced(self, index: torch.Tensor, dim: int) -> "LowRankLinear":
        """A new module keeping output rows (``dim=0``: slices ``second``) or input columns (``dim=1``:
        slices ``first``) ``index``; the rank is unchanged."""
        if dim not in (0, 1):
            raise ValueError(f"dim must be 0 (output rows) or 1 (input columns), got {dim}")
        new = torch.nn.utils.skip_init(type(self), self.in_features, self.out_features, self.rank,
                                       bias=self.bias is not None, device=self.first.weight.device,
                                       dtype=self.first.weight.dtype)
        new.first = sliced_linear(self.first, index, 1) if dim == 1 else self.first
        new.second = sliced_linear(self.second, index, 0) if dim == 0 else self.second
        new.train(self.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class FactorizedEmbedding(nn.Module):
    """ALBERT's factorised word embedding: ``projection(embedding(input_ids))``, a ``V x E`` table then an
    ``E -> H`` Linear without bias. Takes ``input_ids`` like ``nn.Embedding`` and exposes
    ``num_embeddings`` (V), ``embedding_dim`` (H, what callers of ``get_input_embeddings()`` expect) and
    ``padding_idx``. It has no ``weight``: code that would tie or resize the dense matrix fails loudly
    instead of silently using a wrong tensor (sequence classifiers tie nothing)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, factor_dim: int, padding_idx: int | None = None,
                 *, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        # padding_idx keeps the pad row out of gradient updates, as the original nn.Embedding did.
        self.embedding = nn.Embedding(num_embeddings, factor_dim, padding_idx=padding_idx, device=device,
                                      dtype=dtype)
        self.projection = nn.Linear(factor_dim, embedding_dim, bias=False, device=device, dtype=dtype)

    @property
    def num_embeddings(self) -> int:
        return self.embedding.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.projection.out_features

    @property
    def factor_dim(self) -> int:
        return self.embedding.embedding_dim

    @property
    def padding_idx(self) -> int | None:
        return self.embedding.padding_idx

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, factor_dim: int) -> "FactorizedEmbedding":
        """Initialise from the rank-``factor_dim`` truncated SVD of ``emb.weight`` (``V x H``)."""
        w = emb.weight.detach()
        u, s, vh = _svd(w)
        new = torch.nn.utils.skip_init(cls, emb.num_embeddings, emb.embedding_dim, factor_dim,
                                       padding_idx=emb.padding_idx, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            new.embedding.weight.copy_(u[:, :factor_dim] * s[None, :factor_dim])
            new.projection.weight.copy_(vh[:factor_dim].T)
        for p in new.parameters():
            p.requires_grad_(emb.weight.requires_grad)
        new.train(emb.training)
        return new

    def dense_weight(self) -> torch.Tensor:
        """The ``V x H`` matrix this module looks up rows of (for analysis and tests)."""
        return self.embedding.weight @ self.projection.weight.T

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.projection(self.embedding(input_ids))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, factor_dim={self.factor_dim}"


def _svd(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD in float64 on CPU (accurate and deterministic whatever the model's device and dtype; the
    largest matrix, a 30522 x 384 embedding, takes about a second), returned in ``w``'s device/dtype."""
    u, s, vh = torch.linalg.svd(w.to(device="cpu", dtype=torch.float64), full_matrices=False)
    return tuple(t.to(device=w.device, dtype=w.dtype) for t in (u, s, vh))  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------------
# Rank selection
# ----------------------------------------------------------------------------------------------------------


def choose_rank(singular_values: torch.Tensor, *, mode: str, value: float, multiple: int = 1) -> int:
    """The rank for one matrix: ``mode="rank"``: ``ceil(value * full_rank)``; ``mode="energy"``: the
    smallest rank whose singular values keep ``value`` of ``sum S_i^2``. Rounded up to ``multiple``
    (GPU kernels prefer multiples of 8) and capped at the full rank."""
    full = int(singular_values.numel())
    if mode == "rank":
        r = math.ceil(value * full - 1e-9)
    elif mode == "energy":
        energy = singular_values.double().pow(2)
        total = float(energy.sum())
        if total == 0.0:
            r = 1
        else:
            kept = energy.cumsum(0) / total
            r = int((kept < value - 1e-12).sum()) + 1
    else:
        raise ValueError(f"unknown rank mode {mode!r}; use 'rank' or 'energy'")
    r = max(1, r)
    if multiple > 1:
        r = math.ceil(r / multiple) * multiple
    return min(full, r)


def worth_factorising(in_features: int, out_features: int, rank: int) -> bool:
    """True when the two factors hold fewer weights (and cost fewer FLOPs) than the dense matrix."""
    return rank * (in_features + out_features) < in_features * out_features


def _encoder_linears(model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """``(name, kind, module)`` for each distinct encoder projection, named by its first position.
    ``named_modules()`` visits a module shared by several layers once, so nothing is factorised twice."""
    kind_of: dict[int, str] = {}
    for _, layer in unique_layers(model):
        for kind, paths in KINDS.items():
            for path in paths:
                kind_of[id(layer.get_submodule(path))] = kind
    return [(name, kind_of[id(m)], m) for name, m in model.named_modules() if id(m) in kind_of]


def _word_embeddings_name(model: nn.Module) -> str:
    prefix = base_prefix(model)
    return (prefix + "." if prefix else "") + "embeddings.word_embeddings"


# ----------------------------------------------------------------------------------------------------------
# The technique
# ----------------------------------------------------------------------------------------------------------


class LowRankFactorization(Technique):
    name = "low_rank"
    description = ("Truncated-SVD factorisation of encoder Linear layers (rank per attention/FFN, by rank "
                   "fraction or retained spectral energy) and ALBERT's factorised word embedding. Smaller; "
                   "faster only when the rank is well below break-even.")
    stage = Stage.STRUCTURE
    order = 20  # after depth reduction and head pruning (factorises what they left), before token elimination
    params = (
        CategoricalParam("mode", ("energy", "rank"), "energy",
                         help="how attention/ffn are read: retained fraction of spectral energy, or of full rank"),
        FloatParam("attention", 0.05, 1.0, 1.0,
                   help="query/key/value/attention-output: energy or rank fraction kept (1 = leave alone)"),
        FloatParam("ffn", 0.05, 1.0, 1.0,
                   help="intermediate/output dense: energy or rank fraction kept (1 = leave alone)"),
        CategoricalParam("embedding_dim", (0, 32, 64, 128, 256), 0,
                         help="ALBERT factorised word embedding width E (0 = off; skipped unless it saves params)"),
        IntParam("rank_multiple", 1, 64, 8, searched=False,
                 help="round ranks up to a multiple of this (GPU matmul kernels prefer multiples of 8)"),
    )
    reduces = frozenset({"params", "size", "flops", "latency"})

    def identity_params(self) -> dict[str, Any]:
        return {"attention": 1.0, "ffn": 1.0, "embedding_dim": 0}

    def example_params(self) -> dict[str, Any]:
        # Tiny model (hidden 32, FFN 64): rank 8 of 32 is well under break-even (16 and 21).
        return {"mode": "rank", "attention": 0.25, "ffn": 0.25, "embedding_dim": 0}

    def supports(self, model: nn.Module, *, device: str = "cpu") -> str | None:
        try:
            layers = encoder_layers(model)
            for layer in layers:
                for paths in KINDS.values():
                    for path in paths:
                        layer.get_submodule(path)
        except (AttributeError, ValueError):
            return (f"low-rank factorisation needs a BERT-like model (.bert.encoder.layer[i] with attention.self."
                    f"query/key/value, attention.output.dense, intermediate.dense, output.dense); got "
                    f"{type(model).__name__}")
        return None

    def apply(self, model: nn.Module, *, params: Mapping[str, Any], ctx: TechniqueContext) -> dict[str, Any] | None:
        p = {**self.defaults(), **params}
        self.validate(p)
        mode, multiple = str(p["mode"]), int(p["rank_multiple"])
        factorized: dict[str, int] = {}
        skipped: dict[str, str] = {}
        for name, kind, module in _encoder_linears(model):
            value = float(p[kind])
            if value >= 1.0:
                continue  # this kind is off: exact identity, no SVD
            if type(module) is not nn.Linear:
                skipped[name] = f"is a {type(module).__name__}, not an nn.Linear"
                continue
            svd = _svd(module.weight.detach())
            rank = choose_rank(svd[1], mode=mode, value=value, multiple=multiple)
            n_in, n_out = module.in_features, module.out_features
            if not worth_factorising(n_in, n_out, rank):
                skipped[name] = (f"rank {rank} of a {n_out}x{n_in} matrix is not below break-even "
                                 f"{n_in * n_out // (n_in + n_out)}")
                continue
            set_module(model, name, LowRankLinear.from_linear(module, rank, svd))
            factorized[name] = rank
        embedding = self._factorise_embedding(model, int(p["embedding_dim"]), skipped)
        for name, why in skipped.items():
            ctx.log(f"low_rank: left {name} as is: {why}")
        if not factorized and embedding is None:
            return None  # nothing changed: no recipe step, and no recovery training on its account
        ctx.log(f"low_rank: factorised {len(factorized)} Linear layers, ranks {sorted(set(factorized.values()))}")
        return {"factorized": factorized, "skipped": skipped, "embedding": embedding}

    def _factorise_embedding(self, model: nn.Module, dim: int, skipped: dict[str, str]) -> dict[str, Any] | None:
        if dim == 0:
            return None
        name = _word_embeddings_name(model)
        try:
            emb = model.get_submodule(name)
        except AttributeError:
            skipped[name] = "no word embedding found"
            return None
        if type(emb) is not nn.Embedding:
            skipped[name] = f"is a {type(emb).__name__}, not an nn.Embedding"
            return None
        vocab, hidden = emb.num_embeddings, emb.embedding_dim
        if dim >= hidden or not worth_factorising(vocab, hidden, dim):
            skipped[name] = (f"E={dim} saves nothing on a {vocab}x{hidden} embedding "
                             f"(needs E < {min(hidden, vocab * hidden // (vocab + hidden))})")
            return None
        set_module(model, name, FactorizedEmbedding.from_embedding(emb, dim))
        return {"name": name, "dim": dim, "vocab": vocab, "hidden": hidden}

    def restore(self, model: nn.Module, *, phase: str, params: Mapping[str, Any],
                record: Mapping[str, Any] | None) -> None:
        if phase != "apply" or not record:
            return
        for name, rank in record["factorized"].items():
            linear = model.get_submodule(name)
            if type(linear) is not nn.Linear:
                raise ValueError(f"low_rank record factorises {name}, which is a {type(linear).__name__} here")
            w = linear.weight
            # Empty factors of the recorded shapes; the saved weights are loaded right after.
            set_module(model, name, torch.nn.utils.skip_init(
                LowRankLinear, linear.in_features, linear.out_features, int(rank), bias=linear.bias is not None,
                device=w.device, dtype=w.dtype))
        emb_rec = record.get("embedding")
        if emb_rec:
            emb = model.get_submodule(emb_rec["name"])
            if type(emb) is not nn.Embedding or (emb.num_embeddings, emb.embedding_dim) != (
                    emb_rec["vocab"], emb_rec["hidden"]):
                raise ValueError(f"low_rank record factorises a {emb_rec['vocab']}x{emb_rec['hidden']} embedding at "
                                 f"{emb_rec['name']}; this model has {emb!r}")
            set_module(model, emb_rec["name"], torch.nn.utils.skip_init(
                FactorizedEmbedding, emb.num_embeddings, emb.embedding_dim, int(emb_rec["dim"]),
                padding_idx=emb.padding_idx, device=emb.weight.device, dtype=emb.weight.dtype))


@hookimpl
def register_techniques(register) -> None:
    register(LowRankFactorization())
