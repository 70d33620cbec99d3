"""Run a pipeline of techniques on a model: the one code path shared by search trials, the contract test
suite (:mod:`autocompress.testing`) and anyone compressing a model by hand.

Order: every technique's ``apply`` (structure), then recovery training with all techniques' training
hooks, then every technique's ``finalize`` (post-training transforms). Techniques run in ``(stage,
order)`` order; each phase that returns a record adds a recipe step, and the recipe is what
:func:`autocompress.modeling.load_compressed` replays to rebuild the model from plain tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from .errors import TrialError
from .technique import Requirement, Stage, Technique, TechniqueContext, TrainingHooks

if TYPE_CHECKING:
    from torch import nn


@dataclass
class PipelineResult:
    recipe: list[dict[str, Any]] = field(default_factory=list)
    train_stats: dict[str, Any] = field(default_factory=lambda: {"steps": 0})


def ordered(techniques: Sequence[Technique]) -> list[Technique]:
    """Techniques in pipeline order: by stage, then ``order``, then name (deterministic)."""
    return sorted(techniques, key=lambda t: (int(t.stage), t.order, t.name))


def check_supported(model: "nn.Module", techniques: Sequence[Technique], *, device: str) -> None:
    for tech in techniques:
        reason = tech.supports(model, device=device)
        if reason:
            raise TrialError(f"technique {tech.name!r} cannot act on this model on {device}: {reason}")


def run_pipeline(
    model: "nn.Module",
    steps: Sequence[tuple[Technique, Mapping[str, Any]]],
    *,
    ctx: TechniqueContext,
    train: Callable[["nn.Module", list[TrainingHooks]], dict[str, Any]] | None = None,
    before_finalize: Callable[["nn.Module"], None] | None = None,
    device: str = "cpu",
) -> PipelineResult:
    """Compress ``model`` in place with ``steps`` (``(technique, params)``, already in pipeline order).

    ``train(model, hooks)`` runs recovery training and returns its stats; it is called when a structural
    change was made or a technique asked for training hooks (and skipped when ``train`` is ``None``).
    ``before_finalize(model)`` runs after the structural finalizes and before the post-training transforms
    (the engine counts FLOPs there, since quantised kernels are invisible to the FLOP counter).
    """
    check_supported(model, [t for t, _ in steps], device=device)
    for tech, params in steps:
        try:
            tech.validate(dict(params))
        except ValueError as exc:
            raise TrialError(f"technique {tech.name!r} rejected its parameters {dict(params)}: {exc}") from None
    result = PipelineResult()
    for tech, params in steps:
        if Requirement.TEACHER in tech.requires:
            ctx.teacher()  # build (and cache) the teacher before the student changes
        record = tech.apply(model, params=dict(params), ctx=ctx)
        if record is not None:
            result.recipe.append({"technique": tech.name, "phase": "apply", "params": dict(params), "record": record})
    hooks = [h for tech, params in steps if (h := tech.training_hooks(model, params=dict(params), ctx=ctx))]
    if train is not None and (result.recipe or hooks):
        result.train_stats = train(model, hooks)
    # Structural finalizes (e.g. movement pruning removing masked heads) come before ``before_finalize``
    # so that FLOPs are counted on the final architecture; post-training transforms (quantisation) after,
    # since the FLOP counter cannot see quantised kernels.
    early = [s for s in steps if s[0].stage < Stage.POST_TRAINING]
    post = [s for s in steps if s[0].stage >= Stage.POST_TRAINING]
    _finalize(model, early, ctx, result)
    if before_finalize is not None:
        before_finalize(model)
    _finalize(model, post, ctx, result)
    return result


def _finalize(model: "nn.Module", steps: Sequence[tuple[Technique, Mapping[str, Any]]], ctx: TechniqueContext,
              result: PipelineResult) -> None:
    for tech, params in steps:
        record = tech.finalize(model, params=dict(params), ctx=ctx)
        if record is not None:
            result.recipe.append({"technique": tech.name, "phase": "finalize", "params": dict(params), "record": record})
