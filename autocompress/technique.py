"""The technique contract: a small validated config (search space + defaults) and the functions that
change a model, in the spirit of torchao's config/handler pairs.

A trial runs the enabled techniques as one pipeline, ordered by ``stage`` then ``order``:

1. ``apply(model, params=..., ctx=...)`` — structural change before recovery training (prune heads,
   factorise, share layers, shrink depth). Returns a JSON-able *record* of what it did, enough for
   ``restore`` to rebuild the same structure on a fresh model (e.g. which heads were kept).
2. ``training_hooks(model, params=..., ctx=...)`` — optional loss terms, mask updates and schedules used
   during recovery fine-tuning (distillation, movement pruning, quantisation-aware training).
3. ``finalize(model, params=..., ctx=...)`` — post-training transform (quantise, remove masked rows).
   Also returns a record.

``restore(model, phase=..., params=..., record=...)`` replays a recorded structural change on a freshly
built base model so a saved compressed model can be reloaded from plain tensors (safetensors) and JSON.
A technique that leaves the structure unchanged in a phase needs no ``restore`` for it.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Mapping, Union

if TYPE_CHECKING:  # keep ``import autocompress`` free of torch
    import torch
    from torch import nn


class Stage(enum.IntEnum):
    """Where a technique acts in the pipeline; lower runs first."""

    STRUCTURE = 10  # changes the architecture before recovery training
    TRAINING = 20  # only adds training-time behaviour (losses, masks)
    POST_TRAINING = 30  # transforms the trained model (quantisation)


class Requirement(str, enum.Enum):
    """What a technique asks the engine to provide through :class:`TechniqueContext`."""

    TEACHER = "teacher"  # the fine-tuned baseline, frozen, with cached outputs
    IMPORTANCE_DATA = "importance_data"  # labelled training batches to score weights/heads
    CALIBRATION_DATA = "calibration_data"  # unlabelled batches for calibration


# ----------------------------------------------------------------------------------------------------------
# Parameters: the search space of a technique
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FloatParam:
    """A real-valued knob searched in ``[low, high]`` (log scale if ``log``)."""

    name: str
    low: float
    high: float
    default: float
    log: bool = False
    help: str = ""
    searched: bool = True  # searched over its range when the spec does not mention it; else fixed at default
    kind: ClassVar[str] = "float"

    def check(self, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"expected a number in [{self.low}, {self.high}], got {value!r}")
        if not self.low <= float(value) <= self.high:
            raise ValueError(f"{value!r} is outside the allowed range [{self.low}, {self.high}]")
        return float(value)

    def domain(self) -> str:
        return f"[{self.low}, {self.high}]" + (" log" if self.log else "")


@dataclass(frozen=True)
class IntParam:
    """An integer knob searched in ``[low, high]`` with ``step``."""

    name: str
    low: int
    high: int
    default: int
    step: int = 1
    help: str = ""
    searched: bool = True
    kind: ClassVar[str] = "int"

    def check(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise ValueError(f"expected an integer in [{self.low}, {self.high}], got {value!r}")
        if not self.low <= value <= self.high:
            raise ValueError(f"{value!r} is outside the allowed range [{self.low}, {self.high}]")
        return int(value)

    def domain(self) -> str:
        return f"[{self.low}, {self.high}]" + (f" step {self.step}" if self.step != 1 else "")


@dataclass(frozen=True)
class CategoricalParam:
    """A knob that takes one of ``choices`` (strings, numbers or booleans)."""

    name: str
    choices: tuple[Any, ...]
    default: Any
    help: str = ""
    searched: bool = True
    kind: ClassVar[str] = "categorical"

    def check(self, value: Any) -> Any:
        for choice in self.choices:
            # bool is an int subclass: keep True from matching 1.
            if type(choice) is type(value) and choice == value:
                return choice
        raise ValueError(f"{value!r} is not one of {list(self.choices)}")

    def domain(self) -> str:
        return "{" + ", ".join(map(str, self.choices)) + "}"


Param = Union[FloatParam, IntParam, CategoricalParam]


# ----------------------------------------------------------------------------------------------------------
# What the engine gives a technique
# ----------------------------------------------------------------------------------------------------------


@dataclass
class TrainingHooks:
    """Training-time behaviour a technique adds to recovery fine-tuning.

    * ``loss(batch, outputs, model) -> Tensor``: an extra loss term added to the task loss.
    * ``task_loss_weight``: multiplies the task (cross-entropy) loss, e.g. ``1 - alpha`` for distillation.
    * ``before_step(step, total_steps)`` / ``after_step(step, total_steps)``: schedules, mask updates,
      re-applying masks after the optimiser step.
    * ``output_hidden_states`` / ``output_attentions``: ask the model for these in ``outputs``.
    * ``parameters``: extra trainable tensors (scores, projections) the optimiser must update.
    """

    loss: Callable[[Mapping[str, Any], Any, "nn.Module"], "torch.Tensor"] | None = None
    task_loss_weight: float = 1.0
    before_step: Callable[[int, int], None] | None = None
    after_step: Callable[[int, int], None] | None = None
    output_hidden_states: bool = False
    output_attentions: bool = False
    parameters: list[Any] = field(default_factory=list)


@dataclass
class OnnxInt8Linear:
    """An int8 dynamic-quantised Linear as the ONNX graph must compute it (see :meth:`Technique.onnx_prepare`).

    ``weight_int8``: int8 ``[out, in]``; ``scale``: float32 ``[out]``, one per output row. Activations are
    quantised per call and per tensor, asymmetric, to ``activation_levels + 1`` levels (127: 7-bit, what
    fbgemm's ``reduce_range`` does), from the min/max of the call including 0. The exporter emits exactly
    that (activation quantisation with fbgemm's rounding + ``MatMulInteger`` with int32 accumulation + one
    float rescale), so ONNX Runtime runs int8 kernels on the very same int8 weights and reproduces the
    PyTorch outputs bit for bit on the same input.
    """

    weight_int8: Any
    scale: Any
    activation_levels: int = 127


class TechniqueContext:
    """Engine services available to a technique while it changes a model.

    Everything expensive is computed lazily and cached across trials by the engine: the teacher, its
    outputs, data batches and any tensors a technique stores through :meth:`cached`.
    """

    def __init__(
        self,
        *,
        device: "torch.device | str" = "cpu",
        seed: int = 0,
        train_batches: Callable[[int], Iterator[Mapping[str, Any]]] | None = None,
        teacher: Callable[[], "nn.Module"] | None = None,
        cache: Callable[[str, Callable[[], dict[str, "torch.Tensor"]]], dict[str, "torch.Tensor"]]
        | None = None,
        teacher_logits: Callable[[Mapping[str, Any]], "torch.Tensor"] | None = None,
        log: Callable[[str], None] | None = None,
        fine_tune: Callable[..., dict[str, Any]] | None = None,
        training_key: str = "",
    ) -> None:
        self.device = device
        self.seed = seed
        self._train_batches = train_batches
        self._teacher = teacher
        self._cache = cache
        self._teacher_logits = teacher_logits
        self._log = log
        self._fine_tune = fine_tune
        # What :meth:`fine_tune` depends on besides its arguments (batch size, batching, seed, schedule): a
        # technique puts it in the key of what it trains and caches, so changing them recomputes it.
        self.training_key = training_key

    def train_batches(self, n: int) -> Iterator[Mapping[str, Any]]:
        """Yield ``n`` labelled, tokenised training batches (dicts of tensors on ``device``), in a
        fixed order so importance scores are reproducible."""
        if self._train_batches is None:
            raise RuntimeError("this context has no training data; declare Requirement.IMPORTANCE_DATA")
        return self._train_batches(n)

    def teacher(self) -> "nn.Module":
        """The fine-tuned baseline model (frozen, eval mode)."""
        if self._teacher is None:
            raise RuntimeError("this context has no teacher; declare Requirement.TEACHER")
        return self._teacher()

    def teacher_logits(self, batch: Mapping[str, Any]) -> "torch.Tensor":
        """The teacher's logits for a training batch. The engine serves them from a cache computed once per
        baseline (looked up by the batch's ``example_index``), so distillation costs no teacher forward
        pass per step; without that cache the teacher is run on the batch."""
        if self._teacher_logits is not None:
            return self._teacher_logits(batch)
        import torch

        teacher = self.teacher()
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        with torch.no_grad():
            return teacher(**inputs).logits

    def cached(
        self, key: str, compute: Callable[[], dict[str, "torch.Tensor"]]
    ) -> dict[str, "torch.Tensor"]:
        """Return ``compute()``'s tensors, computed once per baseline and ``key`` and stored on disk."""
        if self._cache is None:
            return compute()
        return self._cache(key, compute)

    def fine_tune(self, model: "nn.Module", *, steps: int, hooks: "list[TrainingHooks] | tuple" = (),
                  learning_rate: float | None = None) -> dict[str, Any]:
        """Train ``model`` in place for ``steps`` optimiser steps on the training split with the engine's
        trainer (cross-entropy plus the ``hooks``' loss terms; the recovery batch size, batching and seed;
        ``learning_rate`` defaults to the recovery one). For preparation a technique does once and keeps with
        :meth:`cached` (put :attr:`training_key` in the key), such as pre-distilling a student before trials
        fine-tune it. Returns the trainer's statistics (``steps``, ``final_loss``, ``seconds``)."""
        if self._fine_tune is None:
            raise RuntimeError("this context cannot train a model (no training data); run the technique "
                               "through the engine (autocompress search) or autocompress.testing.tiny_context")
        return self._fine_tune(model, steps=steps, hooks=list(hooks), learning_rate=learning_rate)

    def log(self, message: str) -> None:
        if self._log is not None:
            self._log(message)


# ----------------------------------------------------------------------------------------------------------
# The technique base class
# ----------------------------------------------------------------------------------------------------------


class Technique:
    """Base class of every compression technique. Subclasses set the class attributes and override the
    methods for the phases they act in; the defaults do nothing."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    stage: ClassVar[Stage] = Stage.STRUCTURE
    order: ClassVar[int] = 0  # tie-break within a stage
    params: ClassVar[tuple[Param, ...]] = ()
    requires: ClassVar[frozenset[Requirement]] = frozenset()
    incompatible_with: ClassVar[Mapping[str, str]] = {}
    # What the technique claims to reduce, so reports can say plainly when it saves size but not time, and
    # the contract suite (autocompress.testing) checks each claim that is observable on a tiny model.
    # A subset of {"size", "latency", "params", "flops", "tokens"} ("tokens": sequence length inside the
    # encoder).
    reduces: ClassVar[frozenset[str]] = frozenset()

    # -- config ---------------------------------------------------------------------------------------
    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def identity_params(self) -> dict[str, Any] | None:
        """Settings under which the technique must leave the model's outputs unchanged (e.g. prune 0%), or
        ``None`` if it has none. The contract suite checks it."""
        return None

    def example_params(self) -> dict[str, Any]:
        """A setting with a clearly observable effect on a tiny model; the contract suite checks the
        ``reduces`` claims with it and composes it with every other technique. An override may take a
        keyword-only ``device`` (``"cpu"``, ``"cuda"``) when the best example differs by device."""
        return self.defaults()

    def validate(self, params: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` with a clear message for unknown names or out-of-domain values (this base
        implementation); overrides call ``super().validate(params)`` and add cross-parameter checks."""
        known = {p.name: p for p in self.params}
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise ValueError(f"{self.name} has no parameter(s) {unknown}; its parameters: {', '.join(known)}")
        for name, value in params.items():
            try:
                known[name].check(value)
            except ValueError as exc:
                raise ValueError(f"{self.name}.{name}: {exc}") from None

    def supports(self, model: "nn.Module", *, device: str = "cpu") -> str | None:
        """Return ``None`` if the technique can act on ``model`` on ``device`` (``"cpu"``, ``"cuda"``),
        else the reason it cannot (e.g. an architecture it does not know, kernels missing on a device)."""
        return None

    # -- phases ---------------------------------------------------------------------------------------
    def apply(
        self, model: "nn.Module", *, params: Mapping[str, Any], ctx: TechniqueContext
    ) -> dict[str, Any] | None:
        """Change ``model`` in place before recovery training; return a JSON-able record."""
        return None

    def training_hooks(
        self, model: "nn.Module", *, params: Mapping[str, Any], ctx: TechniqueContext
    ) -> TrainingHooks | None:
        """Return training-time hooks for recovery fine-tuning, or ``None``."""
        return None

    def finalize(
        self, model: "nn.Module", *, params: Mapping[str, Any], ctx: TechniqueContext
    ) -> dict[str, Any] | None:
        """Change ``model`` in place after recovery training; return a JSON-able record."""
        return None

    def restore(
        self,
        model: "nn.Module",
        *,
        phase: str,
        params: Mapping[str, Any],
        record: Mapping[str, Any] | None,
    ) -> None:
        """Rebuild the structure a phase (``"apply"`` or ``"finalize"``) produced, on a fresh model,
        so that the saved state dict loads into it. Weights are loaded afterwards."""

    # -- deployment (autocompress export --onnx) ------------------------------------------------------
    def onnx_support(self, params: Mapping[str, Any]) -> str | None:
        """``None`` if a model this technique changed with ``params`` can be exported to ONNX (``torch.onnx``,
        dynamo exporter) and run by ONNX Runtime on CPU; otherwise the reason, which ``autocompress export
        --onnx`` reports under the technique's name instead of attempting an export that would fail deep
        inside the exporter. The default says yes: modules built from standard torch ops export, and the
        exporter still checks every exported model's predictions against PyTorch."""
        return None

    def onnx_prepare(
        self, model: "nn.Module", *, params: Mapping[str, Any], record: Mapping[str, Any] | None
    ) -> dict[str, OnnxInt8Linear] | None:
        """Make a *copy* of the compressed model traceable just before ONNX export; called once per recipe
        step of this technique, in recipe order. Swap modules the exporter cannot trace (opaque int8 kernels)
        for ``nn.Linear`` holding their dequantised weights, and return ``{module name: OnnxInt8Linear}`` for
        them: the exporter then replaces those float MatMuls by the int8 computation they stand for.
        ``None`` (the default) when nothing needs changing."""
        return None

    def __repr__(self) -> str:
        return f"<Technique {self.name}>"
