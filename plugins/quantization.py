"""Post-training quantisation: int8 Linear layers (dynamic quantisation) and int8 embedding tables, or an
fp16 / bf16 cast; optional quantisation-aware recovery training (QAT).

``dtype: int8`` (default, **CPU only**). Every exact ``nn.Linear`` of the base model (encoder, pooler,
low-rank factors; the task head with ``include_classifier``) becomes an :class:`Int8DynamicLinear`: int8
weights, activations quantised per call (7-bit, per tensor) by the fbgemm/x86 kernels
``quantized::linear_dynamic`` that ``torch.ao.nn.quantized.dynamic.Linear`` runs. The state dict holds
plain tensors (int8 weights, float32 scales and bias), so models save to safetensors and reload strictly;
the packed kernel weight is a cache. torch 2.13 deprecated the ``qint8`` dtypes (pytorch#184982), so
weights are rounded with plain arithmetic and a ``qint8`` view exists only inside the packed weight.

``granularity`` of the weight scales: ``channel`` (per output row), ``tensor`` (per matrix) or ``group``
(Q-BERT, Shen et al. 2020): one scale per head for attention query/key/value (a head's ``head_size``
consecutive output rows), per ``group_size`` consecutive rows elsewhere. Only the group scales are saved;
they are expanded to per-row scales for fbgemm's per-channel kernel, so ``group`` is exactly as fast as
``channel``, never finer, and saves only the few KB of per-row scales.

``bits: 4`` / ``embedding_bits: 4 | 3`` (Q-BERT's low-bit weights, Shen et al. 2020): the weights are rounded
to 4 (3) bits with the same symmetric scales and saved packed, two (8/3) per byte; in memory they are the int8
values of the same grid, so Linears run the same int8 kernels: **size, not time**. Embedding tables may take a
scale per ``embedding_group`` columns (e.g. 128), which keeps 3-4 bit tables accurate for a few hundred KB of
scales (the size and accuracy of each setting on SST-2 are in the quantization and joint fronts of
``results/sst2-minilm/report.md``).

``embeddings`` (weight-only int8, any device): exact ``nn.Embedding`` tables of the base model with at
least 16 rows (word, position; BERT's 2-row token-type table would save 2 KB and perturb every token)
become :class:`Int8Embedding` (int8, one float32 scale per row); the forward gathers int8 rows and
dequantises only those. Size only, not time. The largest size lever: all-MiniLM-L6-v2 saves 90.9 MB in
fp32, 58.7 MB with int8 Linears, 23.0 MB with int8 embeddings too (measured).

``dtype: fp16 / bf16``: ``model.to(dtype)``, LayerNorm included (torch's layer_norm accumulates in float32
for half inputs on CPU and CUDA). Halves the size (MiniLM: 45.4 MB, 33.7 MB with int8 embeddings). Fast on
CUDA; on CPU bf16 is fast only with AVX512-BF16/AMX and fp16 only with AMX-FP16, otherwise latency may
*rise*: finalize logs which case applies and the engine measures it.

``qat`` (int8 only): during recovery the Linears that finalize will quantise compute with fake-quantised
weights (same rounding and granularity) and inputs (the kernel's 7-bit per-tensor rounding), embeddings
with fake-quantised rows; straight-through gradients. Installed as an instance-level ``forward`` (class,
parameters and state-dict keys unchanged, so other techniques' hooks and parametrisations still apply),
removed after the last training step and again by finalize.

Composition: shared modules (weight sharing) are quantised once and replaced wherever they are used;
other linear-like modules (e.g. movement pruning's ``SparseLinear``) stay float, and are logged.

ONNX (``autocompress export --onnx``): int8 Linears are handed to the exporter with their int8 weights and
scales (``onnx_prepare``), which emits the same computation as ONNX int8 ops (7-bit activations rounded as
fbgemm rounds them + ``MatMulInteger``); int8 embeddings and fp16 export as they are; bf16 is refused (ONNX
Runtime has no bfloat16 CPU kernels).
"""

from __future__ import annotations

import types
from collections import Counter
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from autocompress import hookimpl
from autocompress.surgery import base_prefix, unique_layers
from autocompress.technique import (CategoricalParam, IntParam, OnnxInt8Linear, Stage, Technique, TechniqueContext,
                                    TrainingHooks)

# The int8 modules and scale maths live in a sibling module of this plugin; re-exported for users and tests.
from plugins.int8_modules import (Int8DynamicLinear, Int8Embedding, fake_quantize_activation,  # noqa: F401
                                  fake_quantize_rows, fake_quantize_weight, row_scales, weight_scales)

_KERNEL_ENGINES = ("x86", "fbgemm", "onednn")
GRANULARITIES = ("channel", "group", "tensor")
FLOAT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
MIN_EMBEDDING_ROWS = 16
_EPS = torch.finfo(torch.float32).eps
_QAT_ATTR = "_autocompress_qat_group_size"


# ----------------------------------------------------------------------------------------------------------
# Model surgery
# ----------------------------------------------------------------------------------------------------------


def _in_base(model: nn.Module, name: str) -> bool:
    prefix = base_prefix(model)
    return not prefix or name.startswith(prefix + ".")


def quantizable_linears(model: nn.Module, *, include_classifier: bool = False) -> list[str]:
    """Names of the exact ``nn.Linear`` modules to quantise (subclasses and wrappers may carry another
    technique's forward logic): all of the base model, plus the task head if ``include_classifier``.
    ``named_modules()`` lists a shared module once, under its first name."""
    return [name for name, m in model.named_modules()
            if type(m) is nn.Linear and (include_classifier or _in_base(model, name))]


def quantizable_embeddings(model: nn.Module) -> list[str]:
    """Exact ``nn.Embedding`` tables of the base model with at least ``MIN_EMBEDDING_ROWS`` rows."""
    return [name for name, m in model.named_modules()
            if type(m) is nn.Embedding and _in_base(model, name) and m.num_embeddings >= MIN_EMBEDDING_ROWS]


def skipped_linear_like(model: nn.Module) -> Counter:
    """Types of base-model modules that compute a linear map but are not ``nn.Linear`` and contain none
    (e.g. ``SparseLinear``): quantisation leaves them in float."""
    return Counter(type(m).__name__ for name, m in model.named_modules()
                   if _in_base(model, name) and hasattr(m, "in_features") and type(m) is not nn.Linear
                   and not isinstance(m, Int8DynamicLinear) and not any(type(c) is nn.Linear for c in m.modules()))


def head_group_sizes(model: nn.Module) -> dict[int, int]:
    """``id(linear) -> head_size`` for the Linears producing attention query/key/value rows (for a
    low-rank factorised projection, its output factor); empty for models that are not BERT-like."""
    sizes: dict[int, int] = {}
    try:
        layers = [layer for _, layer in unique_layers(model)]
    except (AttributeError, ValueError):
        return sizes
    for layer in layers:
        attn = getattr(getattr(layer, "attention", None), "self", None)
        head_size = getattr(attn, "attention_head_size", None)
        if head_size is None:
            continue
        for proj in (getattr(attn, n, None) for n in ("query", "key", "value")):
            if proj is None:
                continue
            for m in proj.modules():
                if type(m) is nn.Linear and m.out_features == proj.out_features:
                    sizes[id(m)] = int(head_size)
    return sizes


def group_sizes(model: nn.Module, names: list[str], granularity: str, group_size: int) -> dict[str, int]:
    """Rows per weight scale for each named Linear."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    heads = head_group_sizes(model) if granularity == "group" else {}
    out: dict[str, int] = {}
    for name in names:
        m = model.get_submodule(name)
        out[name] = {"channel": 1, "tensor": int(m.out_features)}.get(granularity) or heads.get(id(m), int(group_size))
    return out


def replace_everywhere(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``old`` is a child (a module shared by several parents is replaced in all)."""
    for parent in list(model.modules()):
        for key, child in list(parent._modules.items()):
            if child is old:
                setattr(parent, key, new)


def quantize_linears(model: nn.Module, names: list[str], *, group_sizes: Mapping[str, int] | int = 1,
                     bits: int = 8) -> None:
    """Replace each named ``nn.Linear`` with an :class:`Int8DynamicLinear` holding its quantised weight."""
    for name in names:
        linear = model.get_submodule(name)
        if type(linear) is not nn.Linear:
            raise TypeError(f"{name} is a {type(linear).__name__}, not an nn.Linear")
        if linear.weight.device.type != "cpu":
            raise RuntimeError("int8 dynamic quantisation runs on CPU; move the model to CPU before finalize")
        g = group_sizes if isinstance(group_sizes, int) else group_sizes[name]
        replace_everywhere(model, linear, Int8DynamicLinear.from_float(linear, group_size=g, bits=bits))


def quantize_embeddings(model: nn.Module, names: list[str], *, bits: int = 8, group: int = 0) -> None:
    for name, emb in ((n, model.get_submodule(n)) for n in names):
        if type(emb) is not nn.Embedding:
            raise TypeError(f"{name} is a {type(emb).__name__}, not an nn.Embedding")
        replace_everywhere(model, emb, Int8Embedding.from_float(emb, bits=bits, group=_group(emb, group)))


def _group(emb: nn.Module, group: int) -> int:
    """Columns per embedding scale: ``group`` where it divides the width, else the whole row."""
    return int(group) if group and emb.embedding_dim % int(group) == 0 else 0


# ----------------------------------------------------------------------------------------------------------
# Quantisation-aware training: an instance-level forward on each module, removed before finalize
# ----------------------------------------------------------------------------------------------------------


def _qat_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    # self.weight goes through any parametrisation (e.g. a pruning mask) first, then is rounded.
    group, bits = getattr(self, _QAT_ATTR)
    return F.linear(fake_quantize_activation(x), fake_quantize_weight(self.weight, group, bits), self.bias)


def _qat_embedding_forward(self: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    # Per-row quantisation of the table equals per-row quantisation of the gathered rows: round only those.
    bits, group = getattr(self, _QAT_ATTR)
    return fake_quantize_rows(F.embedding(ids, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                                          self.scale_grad_by_freq, self.sparse), bits, group)


def install_qat(model: nn.Module, linears: Mapping[str, int], embeddings: list[str], *, bits: int = 8,
                embedding_bits: int = 8, embedding_group: int = 0) -> int:
    """Fake-quantise the named Linears (``name -> group size``) and embeddings; returns how many modules."""
    remove_qat(model)
    for name, g in linears.items():
        m = model.get_submodule(name)
        setattr(m, _QAT_ATTR, (int(g), int(bits)))
        m.forward = types.MethodType(_qat_linear_forward, m)  # bound method: deep copies rebind it
    for name in embeddings:
        m = model.get_submodule(name)
        setattr(m, _QAT_ATTR, (int(embedding_bits), _group(m, embedding_group)))
        m.forward = types.MethodType(_qat_embedding_forward, m)
    return len(linears) + len(embeddings)


def remove_qat(model: nn.Module) -> int:
    """Restore the class forward of every fake-quantised module; returns how many there were."""
    n = 0
    for m in model.modules():
        if _QAT_ATTR in m.__dict__:
            del m.__dict__[_QAT_ATTR]
            m.__dict__.pop("forward", None)
            n += 1
    return n


def int8_unavailable(device: str = "cpu") -> str | None:
    """Why the int8 Linear kernels cannot run on ``device`` in this torch build, or ``None``."""
    if not str(device).startswith("cpu"):
        return (f"dtype int8 runs fbgemm/x86 CPU kernels only and the model is on {device}; set "
                f"techniques.quantization.params.dtype to fp16 or bf16 on CUDA, or run on CPU")
    engines = torch.backends.quantized.supported_engines
    if not {"x86", "fbgemm"} & set(engines):
        return f"this torch build has no x86/fbgemm quantized engine (has {engines}); use dtype bf16 or fp16"
    if torch.backends.quantized.engine not in _KERNEL_ENGINES:
        return (f"torch.backends.quantized.engine is {torch.backends.quantized.engine!r}; "
                f"set it to 'x86' for the int8 kernels")
    return None


def cpu_half_note(dtype: str) -> str:
    """An honest one-liner on whether this CPU has native kernels for ``dtype`` matmuls."""
    probes, what = ((("_is_avx512_bf16_supported", "_is_amx_tile_supported"), "AVX512-BF16/AMX") if dtype == "bf16"
                    else (("_is_amx_fp16_supported",), "AMX-FP16"))
    fast = False
    for probe in probes:  # private torch.cpu probes: absent or failing means "not known to be there"
        try:
            fast = fast or bool(getattr(torch.cpu, probe)())
        except Exception:  # noqa: BLE001
            pass
    cap = torch.backends.cpu.get_cpu_capability()
    if fast:
        return f"CPU capability {cap} with {what}: native {dtype} matmuls, latency should fall"
    return f"CPU capability {cap} without {what}: {dtype} matmuls are converted or emulated, latency may rise"


def _device_of(model: nn.Module, ctx: TechniqueContext) -> str:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return str(t.device)
    return str(ctx.device)


# ----------------------------------------------------------------------------------------------------------
# The technique
# ----------------------------------------------------------------------------------------------------------


class Quantization(Technique):
    name = "quantization"
    description = ("Post-training quantisation: int8 dynamic Linear layers (fbgemm/x86 CPU kernels, per "
                   "channel/group/tensor scales) and int8 embedding tables, or an fp16/bf16 cast; optional "
                   "quantisation-aware recovery. int8 saves ~4x on Linears and embeddings.")
    stage = Stage.POST_TRAINING
    order = 0
    params = (
        CategoricalParam("dtype", ("int8", "fp16", "bf16"), "int8", searched=False,
                         help="int8 Linears (CPU kernels), or cast all weights to fp16/bf16 (CPU or CUDA)"),
        CategoricalParam("granularity", GRANULARITIES, "channel",
                         help="int8 weight scales: per output channel, per group (Q-BERT: per head for Q/K/V, "
                              "group_size rows elsewhere) or per matrix"),
        IntParam("group_size", 8, 4096, 128, step=8, searched=False,
                 help="rows per scale for granularity=group outside attention Q/K/V"),
        CategoricalParam("bits", (8, 4), 8,
                         help="Linear weight width (int8 only): 4 stores two weights per byte (Q-BERT low-bit) and "
                              "runs the same int8 kernels, so it saves size, not time"),
        CategoricalParam("embeddings", (True, False), True,
                         help="store word/position embedding tables as int8 with a scale per row (size only)"),
        CategoricalParam("embedding_bits", (8, 4, 3), 8,
                         help="embedding table width: 4 or 3 store packed rows, dequantised per gathered row"),
        IntParam("embedding_group", 0, 4096, 0, step=8, searched=False,
                 help="columns per embedding scale (0: one per row); finer groups keep low-bit tables accurate"),
        CategoricalParam("include_classifier", (False, True), False, searched=False,
                         help="also quantise the task head (tiny; its output is the logits)"),
        CategoricalParam("qat", (False, True), False, searched=False,
                         help="fake-quantise weights and activations during recovery training (int8 only)"),
    )
    reduces = frozenset({"size", "latency"})

    def example_params(self, *, device: str = "cpu") -> dict[str, Any]:
        if not str(device).startswith("cpu"):
            return {"dtype": "bf16", "embeddings": True}  # int8 Linears run CPU kernels only
        return {"dtype": "int8", "granularity": "channel", "embeddings": True}

    def _full(self, params: Mapping[str, Any]) -> dict[str, Any]:
        # Direct callers' older per_channel is read as the granularity (validate refuses it in specs).
        p = {**self.defaults(), **params}
        if "per_channel" in params and "granularity" not in params:
            p["granularity"] = "channel" if params["per_channel"] else "tensor"
        return p

    def validate(self, params: Mapping[str, Any]) -> None:
        if "per_channel" in params:
            raise ValueError("quantization.per_channel was replaced by granularity (per_channel: true -> "
                             "granularity: channel, false -> granularity: tensor)")
        super().validate(params)
        p = {**self.defaults(), **params}
        if p["qat"] and p["dtype"] != "int8":
            raise ValueError(f"quantization.qat fake-quantises to int8; it does not apply to dtype {p['dtype']} "
                             f"(set qat: false)")

    def supports(self, model: nn.Module, *, device: str = "cpu") -> str | None:
        # Permissive about the device: int8 is CPU-only but fp16/bf16 run anywhere, and supports() does not
        # see the params; apply() refuses int8 off CPU with the fix, before any recovery training.
        if not quantizable_linears(model) and not quantizable_embeddings(model):
            return f"{type(model).__name__} has no nn.Linear or nn.Embedding layers to quantise"
        return None

    @staticmethod
    def _check_int8(dtype: str, device: str) -> None:
        problem = int8_unavailable(device) if dtype == "int8" else None
        if problem:
            raise RuntimeError(f"quantization: {problem}")

    def apply(self, model: nn.Module, *, params: Mapping[str, Any], ctx: TechniqueContext) -> None:
        # Nothing changes before training; refuse int8 off CPU here, before recovery time is spent.
        self._check_int8(str(self._full(params)["dtype"]), _device_of(model, ctx))

    def training_hooks(self, model: nn.Module, *, params: Mapping[str, Any],
                       ctx: TechniqueContext) -> TrainingHooks | None:
        p = self._full(params)
        if not p["qat"] or p["dtype"] != "int8":
            return None
        names = quantizable_linears(model, include_classifier=bool(p["include_classifier"]))
        sizes = group_sizes(model, names, str(p["granularity"]), int(p["group_size"]))
        embeddings = quantizable_embeddings(model) if p["embeddings"] else []
        n = install_qat(model, sizes, embeddings, bits=int(p["bits"]), embedding_bits=int(p["embedding_bits"]),
                        embedding_group=int(p["embedding_group"]))
        ctx.log(f"quantization: QAT fake-quantises {n} modules during recovery")

        def after_step(step: int, total: int) -> None:
            if step + 1 >= total:
                remove_qat(model)

        return TrainingHooks(after_step=after_step)

    def finalize(self, model: nn.Module, *, params: Mapping[str, Any], ctx: TechniqueContext) -> dict[str, Any]:
        p = self._full(params)
        remove_qat(model)
        dtype, device = str(p["dtype"]), _device_of(model, ctx)
        self._check_int8(dtype, device)
        embeddings = quantizable_embeddings(model) if p["embeddings"] else []
        ebits, egroup = int(p["embedding_bits"]), int(p["embedding_group"])
        quantize_embeddings(model, embeddings, bits=ebits, group=egroup)
        record: dict[str, Any] = {"dtype": dtype, "embeddings": embeddings, "qat": bool(p["qat"])}
        if embeddings:  # restore needs both to rebuild the tables' scale shapes (8-bit tables can be grouped too)
            record.update(embedding_bits=ebits, embedding_group=egroup)
        if dtype != "int8":
            model.to(FLOAT_DTYPES[dtype])
            note = cpu_half_note(dtype) if device.startswith("cpu") else device
            ctx.log(f"quantization: weights cast to {dtype}, {len(embeddings)} {ebits}-bit embedding tables ({note})"
                    + (f"; bits {p['bits']} applies to int8 Linears only, ignored" if int(p["bits"]) != 8 else ""))
            return {**record, "quantized": []}
        granularity = str(p["granularity"])
        names = quantizable_linears(model, include_classifier=bool(p["include_classifier"]))
        sizes = group_sizes(model, names, granularity, int(p["group_size"]))
        skipped = skipped_linear_like(model)
        bits = int(p["bits"])
        quantize_linears(model, names, group_sizes=sizes, bits=bits)
        ctx.log(f"quantization: {len(names)} Linear layers to {bits}-bit weights on int8 kernels ({granularity}), "
                f"{len(embeddings)} {ebits}-bit embedding tables" + (f"; left in float: {dict(skipped)}" if skipped else ""))
        record.update(granularity=granularity, quantized=names, bits=bits)
        if granularity == "group":  # rows per scale: group_size, except per-head Q/K/V (listed)
            record["group_size"] = int(p["group_size"])
            record["group_sizes"] = {n: g for n, g in sizes.items() if g != int(p["group_size"])}
        return record

    def restore(self, model: nn.Module, *, phase: str, params: Mapping[str, Any],
                record: Mapping[str, Any] | None) -> None:
        if phase != "finalize" or not record:
            return
        # Records written before granularity existed carry per_channel instead.
        granularity = record.get("granularity") or ("channel" if record.get("per_channel", True) else "tensor")
        recorded = record.get("group_sizes") or {}
        for name in record.get("quantized", []):
            linear = model.get_submodule(name)
            if not isinstance(linear, nn.Linear):
                raise TypeError(f"quantization record names {name}, which is a {type(linear).__name__}")
            g = ({"channel": 1, "tensor": linear.out_features}.get(granularity)
                 or int(recorded.get(name, record.get("group_size", 1))))
            # Empty int8 module of the right shape; load_state_dict fills it and it repacks on first use.
            replace_everywhere(model, linear, Int8DynamicLinear(linear.in_features, linear.out_features,
                                                                linear.bias is not None, group_size=g,
                                                                bits=int(record.get("bits", 8))))
        for name in record.get("embeddings", []):
            emb = model.get_submodule(name)
            if not isinstance(emb, nn.Embedding):
                raise TypeError(f"quantization record names embedding {name}, which is a {type(emb).__name__}")
            replace_everywhere(model, emb, Int8Embedding(
                emb.num_embeddings, emb.embedding_dim, emb.padding_idx, bits=int(record.get("embedding_bits", 8)),
                # records written before 8-bit tables recorded their group: the params that built them carry it
                group=_group(emb, int(record.get("embedding_group", params.get("embedding_group", 0))))))
        dtype = record.get("dtype", "int8")
        if dtype in FLOAT_DTYPES:
            model.to(FLOAT_DTYPES[dtype])

    # -- ONNX export ------------------------------------------------------------------------------------
    def onnx_support(self, params: Mapping[str, Any]) -> str | None:
        # Measured with torch 2.13 / onnxruntime 1.31: fp16 graphs run on ONNX Runtime's CPU provider, bf16
        # ones do not (no bfloat16 Add/MatMul kernels: NOT_IMPLEMENTED when the session runs).
        if self._full(params)["dtype"] == "bf16":
            return ("dtype bf16: ONNX Runtime's CPU provider has no bfloat16 kernels (Add, MatMul), so the "
                    "exported graph would not run; export an fp16 or int8 trial instead")
        return None

    def onnx_prepare(self, model: nn.Module, *, params: Mapping[str, Any],
                     record: Mapping[str, Any] | None) -> dict[str, OnnxInt8Linear] | None:
        """int8 Linears call ``quantized::linear_dynamic`` on an opaque packed weight that torch.onnx cannot
        trace: each becomes an ``nn.Linear`` holding the weight the kernel multiplies by (int8 x scale) for
        the trace, and is handed back with its int8 weight and per-row scales, which the exporter lowers to
        ONNX's ``QuantizeLinear`` (7-bit activations, as fbgemm) + ``MatMulInteger``. Int8 embeddings are
        plain gathers and export as int8 tables unchanged."""
        if not record or record.get("dtype", "int8") != "int8":
            return None
        out: dict[str, OnnxInt8Linear] = {}
        for name in record.get("quantized", []):
            q = model.get_submodule(name)
            if not isinstance(q, Int8DynamicLinear):
                continue
            linear = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
            with torch.no_grad():
                linear.weight.copy_(q.dequantized_weight())
                if q.bias is not None:
                    linear.bias.copy_(q.bias)
            replace_everywhere(model, q, linear)  # a shared (weight sharing) layer is swapped everywhere
            out[name] = OnnxInt8Linear(weight_int8=q.weight_int8.clone(),
                                       scale=row_scales(q.weight_scale, q.group_size, q.out_features).float().clone(),
                                       activation_levels=127)  # reduce_range: 7-bit activations, see forward
        return out


@hookimpl
def register_techniques(register) -> None:
    register(Quantization())
