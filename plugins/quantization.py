"""Post-training int8 dynamic quantisation of the encoder's ``nn.Linear`` layers.

Weights are quantised once, symmetrically to int8 (per output channel or per tensor); activations are
quantised on the fly per batch by PyTorch's fbgemm/x86 (or oneDNN) CPU kernels
``quantized::linear_dynamic``, the same kernels ``torch.ao.nn.quantized.dynamic.Linear`` runs. The module
here, :class:`Int8DynamicLinear`, differs from torch's in one way that matters to autocompress: its state
dict holds only plain tensors (int8 weights, float32 scales, int64 zero points, float32 bias), so a
quantised model saves to safetensors and reloads with ``load_state_dict(strict=True)``; the kernel's packed
weight is a non-persistent cache rebuilt from those tensors.

Why plain int8 tensors rather than ``torch.qint8`` ones: torch 2.13 deprecated the quantized dtypes and
``torch.quantize_per_*`` (pytorch/pytorch#184982). The weights are therefore rounded with plain
arithmetic; a ``qint8`` view is made only at packing time, which is all the kernel still needs. If the
kernel goes away, only :meth:`Int8DynamicLinear._pack` / ``forward`` change, not the saved format.

Scope: every ``nn.Linear`` of the base model (encoder layers and the pooler). The pooler's dense layer is
a hidden x hidden matrix on the path to the logits, as large as an attention projection and no more
sensitive, so it is quantised with the encoder. The task head (``classifier``) is tiny (hidden x labels),
saves nothing measurable and writes the logits directly, so it stays fp32 unless ``include_classifier``.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping

import torch
from torch import nn

from autocompress import hookimpl
from autocompress.technique import CategoricalParam, Stage, Technique, TechniqueContext

_KERNEL_ENGINES = ("x86", "fbgemm", "onednn")


class Int8DynamicLinear(nn.Module):
    """``y = x W^T + b`` with W stored as int8 and x quantised to uint8 per call (dynamic quantisation).

    Buffers (all saved): ``weight_int8`` int8 ``[out, in]``; ``weight_scale`` float32 ``[out]`` (per
    channel) or ``[1]`` (per tensor); ``weight_zero_point`` int64, same shape, zeros (symmetric);
    ``bias`` float32 ``[out]`` or absent. Runs on CPU only. Accepts inputs of any leading shape and any
    float dtype (computed in float32, returned in the input dtype).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 per_channel: bool = True) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        n_scales = self.out_features if per_channel else 1
        self.register_buffer("weight_int8", torch.zeros(self.out_features, self.in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(n_scales, dtype=torch.float32))
        self.register_buffer("weight_zero_point", torch.zeros(n_scales, dtype=torch.int64))
        self.register_buffer("bias", torch.zeros(self.out_features, dtype=torch.float32) if bias else None)
        self._packed: Any = None  # the kernel's prepacked weight: a cache, never saved

    @property
    def per_channel(self) -> bool:
        return self.weight_scale.numel() != 1

    @classmethod
    def from_float(cls, linear: nn.Linear, *, per_channel: bool = True) -> "Int8DynamicLinear":
        """Quantise ``linear``'s weight symmetrically to int8 (scale = max|w| / 127.5, as torch's
        ``MinMaxObserver`` with ``per_*_symmetric`` computes it) and copy its bias as float32."""
        w = linear.weight.detach().to(device="cpu", dtype=torch.float32)
        amax = w.abs().amax(dim=1) if per_channel else w.abs().amax().reshape(1)
        scale = (amax / 127.5).clamp_min(torch.finfo(torch.float32).eps)
        q = torch.round(w / scale[:, None]).clamp_(-128, 127).to(torch.int8)
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, per_channel=per_channel)
        mod.weight_int8.copy_(q)
        mod.weight_scale.copy_(scale)
        if linear.bias is not None:
            mod.bias.copy_(linear.bias.detach().to(device="cpu", dtype=torch.float32))
        mod._pack()
        return mod

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight the kernel effectively multiplies by (for analysis and tests)."""
        return self.weight_int8.float() * self.weight_scale[:, None]

    # -- the packed-weight cache ----------------------------------------------------------------------
    def _pack(self) -> None:
        if self.weight_int8.device.type != "cpu":
            raise RuntimeError("Int8DynamicLinear runs CPU kernels only; move the model to CPU")
        scale = self.weight_scale.to(torch.float64)
        zero_point = self.weight_zero_point.to(torch.int64)
        with warnings.catch_warnings():
            # The qint8 wrapper is the deprecated part (pytorch#184982); it lives only inside the kernel's
            # packed weight, so the warning tells the user nothing they can act on.
            warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*")
            if self.per_channel:
                qweight = torch._make_per_channel_quantized_tensor(self.weight_int8, scale, zero_point, 0)
            else:
                qweight = torch._make_per_tensor_quantized_tensor(
                    self.weight_int8, float(scale[0]), int(zero_point[0]))
        bias = None if self.bias is None else self.bias.float()
        self._packed = torch.ops.quantized.linear_prepack(qweight, bias)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
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
        state = self.__dict__.copy()
        state["_packed"] = None
        return state

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
                f"bias={self.bias is not None}, per_channel={self.per_channel}")


# ----------------------------------------------------------------------------------------------------------
# Model surgery
# ----------------------------------------------------------------------------------------------------------


def _base_prefix(model: nn.Module) -> str:
    """The attribute name of the base model (``"bert"`` for BERT), or ``""`` if the model is one."""
    prefix = getattr(model, "base_model_prefix", "")
    return prefix if prefix and isinstance(getattr(model, prefix, None), nn.Module) else ""


def quantizable_linears(model: nn.Module, *, include_classifier: bool = False) -> list[str]:
    """Names of the ``nn.Linear`` modules to quantise: all of the base model (encoder and pooler), plus
    the task head if ``include_classifier``. Only exact ``nn.Linear`` (not subclasses, which may carry
    their own forward logic from another technique)."""
    prefix = _base_prefix(model)
    names = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        in_base = not prefix or name.startswith(prefix + ".")
        if in_base or include_classifier:
            names.append(name)
    return names


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def quantize_linears(model: nn.Module, names: list[str], *, per_channel: bool = True) -> None:
    """Replace each named ``nn.Linear`` with an :class:`Int8DynamicLinear` holding its quantised weight."""
    for name in names:
        linear = model.get_submodule(name)
        if type(linear) is not nn.Linear:
            raise TypeError(f"{name} is a {type(linear).__name__}, not an nn.Linear")
        if linear.weight.device.type != "cpu":
            raise RuntimeError("int8 dynamic quantisation runs on CPU; move the model to CPU before finalize")
        _set_module(model, name, Int8DynamicLinear.from_float(linear, per_channel=per_channel))


class Quantization(Technique):
    name = "quantization"
    description = ("Post-training int8 dynamic quantisation of the encoder's Linear layers (int8 weights, "
                   "per-batch activation scales; fbgemm/x86 CPU kernels). Saves ~4x on Linear weights.")
    stage = Stage.POST_TRAINING
    order = 0
    params = (
        CategoricalParam("dtype", ("int8",), "int8", help="weight/activation integer type (int8 only for now)"),
        CategoricalParam("per_channel", (True, False), True,
                         help="one weight scale per output channel (more accurate) or one per matrix"),
        CategoricalParam("include_classifier", (False, True), False, searched=False,
                         help="also quantise the task head (tiny; its output is the logits)"),
    )
    reduces = frozenset({"size", "latency"})

    def supports(self, model: nn.Module, *, device: str = "cpu") -> str | None:
        if not str(device).startswith("cpu"):
            return "int8 dynamic quantisation runs fbgemm/onednn CPU kernels only; run quantised trials on CPU"
        engines = torch.backends.quantized.supported_engines
        if not {"x86", "fbgemm"} & set(engines):
            return f"this torch build has no x86/fbgemm quantized engine (has {engines})"
        if torch.backends.quantized.engine not in _KERNEL_ENGINES:
            return (f"torch.backends.quantized.engine is {torch.backends.quantized.engine!r}; "
                    f"set it to 'x86' for the int8 kernels")
        if not quantizable_linears(model):
            return f"{type(model).__name__} has no nn.Linear layers to quantise"
        return None

    def finalize(self, model: nn.Module, *, params: Mapping[str, Any], ctx: TechniqueContext) -> dict[str, Any]:
        per_channel = bool(params["per_channel"])
        names = quantizable_linears(model, include_classifier=bool(params["include_classifier"]))
        quantize_linears(model, names, per_channel=per_channel)
        ctx.log(f"quantization: {len(names)} Linear layers to int8 ({'per channel' if per_channel else 'per tensor'})")
        return {"quantized": names, "per_channel": per_channel, "dtype": str(params["dtype"])}

    def restore(self, model: nn.Module, *, phase: str, params: Mapping[str, Any],
                record: Mapping[str, Any] | None) -> None:
        if phase != "finalize" or not record:
            return
        per_channel = bool(record["per_channel"])
        for name in record["quantized"]:
            linear = model.get_submodule(name)
            if not isinstance(linear, nn.Linear):
                raise TypeError(f"quantization record names {name}, which is a {type(linear).__name__}")
            # Empty int8 module of the right shape; load_state_dict fills it and it repacks on first use.
            _set_module(model, name, Int8DynamicLinear(linear.in_features, linear.out_features,
                                                       linear.bias is not None, per_channel=per_channel))


@hookimpl
def register_techniques(register) -> None:
    register(Quantization())
