"""Layer dropping: remove whole encoder layers of the fine-tuned model, chosen by a searched strategy.

Two papers motivate it:

* Fan et al. 2020, "Reducing Transformer Depth on Demand with Structured Dropout" (LayerDrop), prune a
  trained model by dropping layers "every other": with a pruning rate ``p`` the layers at depth ``d`` with
  ``d = 0 (mod floor(1/p))`` go (``which: every_other``; the stride generalises to any count here).
* Sajjad et al. 2020/2023, "On the Effect of Dropping Layers of Pre-trained Transformer Models", compare
  where to drop from and find that dropping the *top* layers of a pre-trained BERT, then fine-tuning,
  keeps most of the accuracy (``which: top``); they also test ``bottom`` and symmetric (``middle``)
  dropping.

The dropped layers are deleted from ``bert.encoder.layer`` (the ``nn.ModuleList`` keeps the others,
renumbered ``0..m-1``) and ``config.num_hidden_layers`` is updated, so parameters, FLOPs, latency and saved
size all fall; recovery fine-tuning (the engine's, no teacher) then adapts the remaining layers. The record
names the dropped layer indices and the depth before, and ``restore`` deletes the same layers from a fresh
base model so the saved tensors load strictly.

How this differs from the built-in ``distillation`` technique, which also reduces depth: distillation always
keeps evenly spaced layers *including the first and the last* and pairs the smaller student with a teacher
(KD losses). Layer dropping needs no teacher, lets the search pick *which* layers go (top dropping removes
the last layers, so a lower layer feeds the classifier), and drops an arbitrary fraction rather than a
fixed menu of depths. Both change depth, and distillation's teacher-student layer map assumes it alone
sets the depth, so the two are declared incompatible.

This module uses only autocompress's public plugin API (``autocompress.technique``,
``autocompress.surgery``, ``autocompress.hookimpl``).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from torch import nn

from autocompress import hookimpl
from autocompress.surgery import encoder_layers, keep_layers
from autocompress.technique import CategoricalParam, FloatParam, Stage, Technique, TechniqueContext

STRATEGIES = ("top", "bottom", "every_other", "middle")


# ----------------------------------------------------------------------------------------------------------
# Which layers go
# ----------------------------------------------------------------------------------------------------------


def n_dropped(n_layers: int, drop: float) -> int:
    """``round(drop * n_layers)`` half up, leaving at least one layer."""
    # The epsilon keeps 0.5 * 5 = 2.5 from landing just below .5 through float error.
    return max(0, min(n_layers - 1, int(math.floor(drop * n_layers + 0.5 + 1e-9))))


def layers_to_drop(n_layers: int, drop: float, which: str) -> list[int]:
    """The sorted indices of the encoder layers that ``which`` removes for a fraction ``drop``.

    * ``top``: the last ``k`` layers (those nearest the classifier);
    * ``bottom``: the first ``k`` layers (those nearest the embeddings);
    * ``every_other``: LayerDrop's rule, one layer per stride ``n / k``, the last of each stride window
      (``k = n/2`` drops layers 1, 3, 5, ...; ``k = n/4`` drops 3, 7, 11, ...);
    * ``middle``: ``k`` consecutive layers centred in the stack (the first and last layers stay).
    """
    if which not in STRATEGIES:
        raise ValueError(f"layer_drop.which: {which!r} is not one of {list(STRATEGIES)}")
    k = n_dropped(n_layers, drop)
    if k == 0:
        return []
    if which == "top":
        return list(range(n_layers - k, n_layers))
    if which == "bottom":
        return list(range(k))
    if which == "every_other":
        # floor((j + 1) * n / k) - 1 in integers: distinct because the stride n / k is >= 1.
        return [(j + 1) * n_layers // k - 1 for j in range(k)]
    start = (n_layers - k) // 2
    return list(range(start, start + k))


def remove_layers(model: nn.Module, dropped: Sequence[int]) -> None:
    """Delete encoder layers ``dropped`` in place and update every config that records the depth."""
    layers = encoder_layers(model)
    n = len(layers)
    dropped = sorted({int(i) for i in dropped})
    if dropped and (dropped[0] < 0 or dropped[-1] >= n or len(dropped) >= n):
        raise ValueError(f"cannot drop layers {dropped} from a model with {n} encoder layers (one must stay)")
    # autocompress.surgery deletes in place (the ModuleList object survives, state-dict keys renumber)
    # and updates num_hidden_layers on every config that records it.
    keep_layers(model, [i for i in range(n) if i not in dropped])


# ----------------------------------------------------------------------------------------------------------
# The technique
# ----------------------------------------------------------------------------------------------------------


class LayerDrop(Technique):
    name = "layer_drop"
    description = ("Remove a searched fraction of whole encoder layers (top, bottom, every other or middle; "
                   "Fan et al. 2020 LayerDrop pruning, Sajjad et al. 2020), then recover by fine-tuning. "
                   "No teacher. Smaller and faster.")
    stage = Stage.STRUCTURE
    # After distillation's slot (0) and before head pruning (10): later structural techniques (head pruning,
    # low-rank, token elimination, weight sharing) then only work on the layers that stay.
    order = 5
    params = (
        FloatParam("drop", 0.0, 0.75, 0.0, help="fraction of encoder layers removed, rounded half up (0 = none)"),
        CategoricalParam("which", STRATEGIES, "top",
                         help="which layers go: top (nearest the classifier), bottom, every_other, middle"),
    )
    incompatible_with = {
        "distillation": ("both remove encoder layers, and distillation's teacher-student layer map assumes "
                         "it alone sets the depth; reduce depth with distillation.depth or with layer_drop, "
                         "not both"),
    }
    reduces = frozenset({"params", "flops", "latency", "size"})

    def identity_params(self) -> dict[str, Any]:
        return {"drop": 0.0}

    def example_params(self) -> dict[str, Any]:
        return {"drop": 0.5, "which": "every_other"}

    def supports(self, model: nn.Module, *, device: str = "cpu") -> str | None:
        try:
            if len(encoder_layers(model)) == 0:
                raise ValueError
        except (AttributeError, ValueError):
            return f"layer_drop needs a BERT-like model (.bert.encoder.layer); got {type(model).__name__}"
        return None

    def apply(self, model: nn.Module, *, params: Mapping[str, Any], ctx: TechniqueContext) -> dict[str, Any] | None:
        full = {**self.defaults(), **params}
        n = len(encoder_layers(model))
        dropped = layers_to_drop(n, float(full["drop"]), str(full["which"]))
        if not dropped:
            # Nothing removed: no recipe step, so the pipeline also skips recovery training for it.
            return None
        remove_layers(model, dropped)
        ctx.log(f"layer_drop: removed encoder layers {dropped} of {n} ({full['which']})")
        return {"layers_before": n, "dropped": dropped}

    def restore(self, model: nn.Module, *, phase: str, params: Mapping[str, Any],
                record: Mapping[str, Any] | None) -> None:
        if phase != "apply" or not record:
            return
        n = len(encoder_layers(model))
        if int(record["layers_before"]) != n:
            raise ValueError(f"layer_drop record was made on a {record['layers_before']}-layer model; this one "
                             f"has {n} layers (was the recipe replayed on the right base config?)")
        remove_layers(model, [int(i) for i in record["dropped"]])


@hookimpl
def register_techniques(register) -> None:
    register(LayerDrop())
