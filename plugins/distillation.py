"""Knowledge distillation from the fine-tuned baseline, with DistilBERT-style student depth reduction.

The teacher is the fine-tuned baseline (``ctx.teacher()``: frozen, eval mode); the student is the model
being compressed.

Depth reduction (``apply``, the only part that changes cost). ``depth`` is the fraction of the teacher's
``n`` encoder layers the student keeps: ``m = round(depth * n)`` (half up, at least 1) layers, evenly
spaced over ``0 .. n-1`` including the first and the last (``round(i * (n - 1) / (m - 1))``). The
DistilBERT paper initialises its student "by taking one layer out of two"; its released extraction script
keeps teacher layers ``[0, 2, 4, 7, 9, 11]`` of 12, which is exactly this rule. The other layers are
removed physically from ``bert.encoder.layer`` and ``config.num_hidden_layers`` is updated, so params,
FLOPs, latency and saved size all fall. The kept teacher indices are the record: they are the
teacher->student layer map (student layer ``i`` started as teacher layer ``kept[i]``), and ``restore``
rebuilds the reduced depth from them. ``depth`` 1.0 keeps every layer and records nothing.

Pre-distillation (``pretrain_steps`` > 0, off by default). A trial's recovery budget (a few hundred steps)
cannot distil a much shallower student. With ``pretrain_steps`` the reduced student is first distilled
for that many steps on the whole training split (the trainer of ``ctx.fine_tune``), once per baseline,
depth and recipe: the weights are kept with ``ctx.cached`` and every later trial of that depth starts from
them, then goes through the other techniques and its own recovery training (with the trial's own losses)
as usual. The first trial of a depth pays for it. Two fixed recipes (``pretrain_recipe``):

* ``logit``: logit KD at alpha 0.5 and T 2 for all the steps.
* ``tinybert``: TinyBERT's two-stage task distillation. First half of the steps: intermediate-layer
  distillation only (hidden-state MSE with the embeddings, and attention-map MSE; no task loss, no logits),
  so each student layer learns to do what its teacher layer did; second half: prediction-layer
  distillation (soft cross-entropy against the teacher, alpha 1 at T 1). TinyBERT's ablations found the
  intermediate-layer losses the most important of its objectives for small students. It costs a teacher
  forward pass per step in the first stage.

Losses (``training_hooks``; they change accuracy, not cost):

* Hinton logit KD: ``alpha * KL(softmax(t / T) || softmax(s / T)) * T^2``, and the task cross-entropy is
  weighted ``1 - alpha`` (``TrainingHooks.task_loss_weight``). Teacher logits come from
  ``ctx.teacher_logits(batch)``, which the engine caches per training example: logit KD costs no teacher
  forward pass after the first trial. ``alpha`` 0 with no hidden/attention loss is plain fine-tuning (the
  "no KD" control) and returns no hooks.
* ``hidden_loss`` ``cosine`` (DistilBERT): ``1 - cos`` between each student layer's output and the output
  of the teacher layer it maps to, averaged over real tokens (``attention_mask``) and layers.
* ``hidden_loss`` ``tinybert`` (TinyBERT): MSE between the same pairs plus the embeddings output
  (``hidden_states[0]``), through one learned linear projection student width -> teacher width when the
  widths differ (the projection is in ``TrainingHooks.parameters``; it is thrown away after training; the
  cosine loss uses it too in that case). No technique in this project changes the hidden width (head
  pruning and low-rank change inner widths only), so it matters for students built narrower elsewhere.
  Layers are averaged rather than summed as in the paper, so ``hidden_weight`` means the same at any depth.
* ``attention_loss`` (TinyBERT, off unless asked): MSE between the mapped layers' attention
  probabilities over real query/key pairs (TinyBERT's code compares pre-softmax scores, which transformers
  does not return). When head counts differ (head pruning) the head-averaged maps are compared. Needs
  ``output_attentions``: the trainer switches the student to eager attention, and the teacher runs eager
  for its forward.
* Both are weighted by ``hidden_weight``. **Cost:** the hidden/attention losses need the teacher's hidden
  states/attentions for the exact batch, so they run one teacher forward (no grad) per training step inside
  the loss hook; only the logit KD is served from the cache.

Composition. Distillation runs first among structural techniques (order 0), so head pruning, low-rank
factorisation, token elimination and weight sharing change the *student* afterwards. The layer map is
positional (student position ``i`` <-> teacher layer ``kept[i]``) and the student's states are read from
``outputs.hidden_states`` / ``outputs.attentions`` at those positions, so it survives head pruning and
low-rank (hidden width unchanged; the projection covers any width change), and weight sharing (a shared
layer still yields one state per position). Token elimination shortens the student's sequence from layer
to layer; wherever the student's and teacher's lengths differ, hidden states are compared at the [CLS]
position only (the only position still aligned), and attention maps of that layer are skipped (their
query and key positions no longer line up). Quantisation is post-training and unaffected. A technique that
changes depth after distillation would break the map; ``training_hooks`` then raises a clear error.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from autocompress import hookimpl
from autocompress.surgery import encoder_layers, keep_layers
from autocompress.technique import (CategoricalParam, FloatParam, IntParam, Requirement, Stage, Technique,
                                    TechniqueContext, TrainingHooks)

# The fixed recipe of pre-distillation (``pretrain_steps``): fixed rather than the trial's alpha and temperature,
# so every trial of one depth shares one cached student.
PRE_DISTIL_ALPHA = 0.5
PRE_DISTIL_TEMPERATURE = 2.0
# Keys of a training batch that the teacher's forward takes (labels and example_index are not inputs).
_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
HIDDEN_LOSSES = ("none", "cosine", "tinybert")
PRE_DISTIL_RECIPES = ("logit", "tinybert")


# ----------------------------------------------------------------------------------------------------------
# Depth reduction
# ----------------------------------------------------------------------------------------------------------


def student_depth(n_layers: int, depth: float) -> int:
    """``round(depth * n_layers)`` half up, within ``[1, n_layers]``."""
    # The epsilon keeps 0.5 * 5 = 2.5 from landing just below .5 through float error.
    return max(1, min(n_layers, int(math.floor(depth * n_layers + 0.5 + 1e-9))))


def kept_layers(n_layers: int, depth: float) -> list[int]:
    """The teacher layers a student of ``depth`` keeps: evenly spaced, first and last included (12 -> 6
    gives DistilBERT's ``[0, 2, 4, 7, 9, 11]``). One layer keeps layer 0."""
    m = student_depth(n_layers, depth)
    if m == 1:
        return [0]
    # round(i * (n - 1) / (m - 1)) half up, in integers (no float ties); m <= n makes the step >= 1, so the
    # indices are distinct and increasing.
    return [(2 * i * (n_layers - 1) + (m - 1)) // (2 * (m - 1)) for i in range(m)]


# ----------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------


def logit_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al.: ``KL(softmax(t / T) || softmax(s / T)) * T^2``, mean over the batch (in float32).
    The ``T^2`` keeps gradient magnitudes comparable across temperatures."""
    t = float(temperature)
    s = F.log_softmax(student_logits.float() / t, dim=-1)
    p = F.log_softmax(teacher_logits.detach().float().to(student_logits.device) / t, dim=-1)
    return F.kl_div(s, p, reduction="batchmean", log_target=True) * (t * t)


def _aligned(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student/teacher states ``[B, T, d]`` and a ``[B, T]`` float weight of the positions to compare:
    every real token when the lengths agree, else (token elimination) the [CLS] position only."""
    teacher = teacher.detach().to(student.dtype)
    if student.shape[1] == teacher.shape[1]:
        if mask is None:
            weight = student.new_ones(student.shape[:2])
        else:
            weight = mask.to(device=student.device, dtype=student.dtype)
        return student, teacher, weight
    return student[:, :1], teacher[:, :1], student.new_ones(student.shape[0], 1)


def hidden_state_loss(kind: str, student_states: Sequence[torch.Tensor], teacher_states: Sequence[torch.Tensor],
                      layer_map: Sequence[int], mask: torch.Tensor | None,
                      projection: nn.Module | None = None) -> torch.Tensor:
    """``cosine`` (DistilBERT) or ``tinybert`` (MSE, embeddings included) between student layer ``i``'s
    output and teacher layer ``layer_map[i]``'s output, averaged over compared positions and layers.

    ``*_states`` are ``outputs.hidden_states`` tuples (embeddings output first)."""
    if len(student_states) != len(layer_map) + 1:
        raise ValueError(f"the student returned {len(student_states) - 1} layer outputs for a layer map of "
                         f"{len(layer_map)} layers; a technique changed the depth after distillation")
    pairs = [(i + 1, k + 1) for i, k in enumerate(layer_map)]
    if kind == "tinybert":
        pairs.insert(0, (0, 0))
    elif kind != "cosine":
        raise ValueError(f"unknown hidden_loss {kind!r}; use one of {HIDDEN_LOSSES}")
    terms = []
    for s_i, t_i in pairs:
        s, t, weight = _aligned(student_states[s_i], teacher_states[t_i], mask)
        if projection is not None:
            s = projection(s)
        if s.shape[-1] != t.shape[-1]:
            raise ValueError(f"student width {s.shape[-1]} != teacher width {t.shape[-1]} and no projection")
        if kind == "cosine":
            per_position = 1.0 - F.cosine_similarity(s, t, dim=-1)
        else:
            per_position = (s - t).pow(2).mean(dim=-1)
        terms.append((per_position * weight).sum() / weight.sum().clamp_min(1.0))
    return torch.stack(terms).mean()


def attention_map_loss(student_attn: Sequence[torch.Tensor], teacher_attn: Sequence[torch.Tensor],
                       layer_map: Sequence[int], mask: torch.Tensor | None) -> torch.Tensor:
    """TinyBERT attention loss: MSE between student layer ``i``'s and teacher layer ``layer_map[i]``'s
    attention probabilities ``[B, H, T, T]`` over real query/key pairs. Head-averaged when the head
    counts differ; layers whose sequence lengths differ (token elimination) are skipped. 0 if none left."""
    if len(student_attn) != len(layer_map):
        raise ValueError(f"the student returned {len(student_attn)} attention maps for a layer map of "
                         f"{len(layer_map)} layers; a technique changed the depth after distillation")
    terms = []
    for i, k in enumerate(layer_map):
        s, t = student_attn[i], teacher_attn[k].detach().to(student_attn[i].dtype)
        if s.shape[-1] != t.shape[-1] or s.shape[-2] != t.shape[-2]:
            continue  # positions no longer line up
        if s.shape[1] != t.shape[1]:
            s, t = s.mean(dim=1, keepdim=True), t.mean(dim=1, keepdim=True)
        if mask is None:
            weight = torch.ones_like(s)
        else:
            m = mask.to(device=s.device, dtype=s.dtype)
            weight = (m[:, None, :, None] * m[:, None, None, :]).expand_as(s)
        terms.append(((s - t).pow(2) * weight).sum() / weight.sum().clamp_min(1.0))
    if not terms:
        return student_attn[0].new_zeros(()) if student_attn else torch.zeros(())
    return torch.stack(terms).mean()


def teacher_states(teacher: nn.Module, batch: Mapping[str, Any], *, attentions: bool) -> Any:
    """One teacher forward (no grad) returning hidden states, and attentions with the eager kernel (SDPA
    does not return them). The kernel setting is restored afterwards: the teacher is shared by trials."""
    inputs = {k: batch[k] for k in _INPUT_KEYS if k in batch and batch[k] is not None}
    config = getattr(teacher, "config", None)
    saved = getattr(config, "_attn_implementation", None)
    if attentions and saved is not None:
        config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            return teacher(**inputs, output_hidden_states=True, output_attentions=attentions)
    finally:
        if attentions and saved is not None:
            config._attn_implementation = saved


def pre_distil_stages(recipe: str, steps: int, *,
                      depth: float) -> list[tuple[str, int, dict[str, Any], float | None]]:
    """The stages of a pre-distillation recipe: ``(name, steps, loss params, task loss weight or None for
    the params' own)``; stages of 0 steps are left out."""
    if recipe == "logit":
        stages = [("logit KD", steps, {"depth": depth, "alpha": PRE_DISTIL_ALPHA,
                                       "temperature": PRE_DISTIL_TEMPERATURE, "hidden_loss": "none"}, None)]
    elif recipe == "tinybert":
        first = steps // 2
        stages = [
            # TinyBERT's intermediate-layer stage has no task loss: the student only imitates the teacher's
            # embeddings, hidden states and attention maps.
            ("intermediate", first, {"depth": depth, "alpha": 0.0, "hidden_loss": "tinybert",
                                     "attention_loss": True, "hidden_weight": 1.0}, 0.0),
            ("prediction", steps - first, {"depth": depth, "alpha": 1.0, "temperature": 1.0,
                                           "hidden_loss": "none"}, None),
        ]
    else:
        raise ValueError(f"unknown pretrain_recipe {recipe!r}; use one of {PRE_DISTIL_RECIPES}")
    return [stage for stage in stages if stage[1] > 0]


# ----------------------------------------------------------------------------------------------------------
# The technique
# ----------------------------------------------------------------------------------------------------------


class Distillation(Technique):
    name = "distillation"
    description = ("Knowledge distillation from the fine-tuned baseline (Hinton logit KD, DistilBERT cosine "
                   "or TinyBERT hidden/attention losses) into a student whose depth is reduced DistilBERT-"
                   "style (evenly spaced teacher layers kept). Depth reduction makes it smaller and faster; "
                   "the KD losses only change accuracy.")
    stage = Stage.STRUCTURE
    order = 0  # depth first: head pruning, low-rank, token elimination and weight sharing act on the student
    params = (
        CategoricalParam("depth", (1.0, 0.67, 0.5, 0.34), 1.0,
                         help="fraction of the teacher's encoder layers the student keeps (1.0 = all)"),
        FloatParam("alpha", 0.0, 1.0, 0.5,
                   help="weight of the logit KD loss; the task loss gets 1 - alpha (0 = no logit KD)"),
        FloatParam("temperature", 1.0, 8.0, 2.0, help="softmax temperature of the logit KD loss"),
        CategoricalParam("hidden_loss", HIDDEN_LOSSES, "none",
                         help="hidden-state loss: DistilBERT cosine or TinyBERT MSE (one teacher forward per step)"),
        FloatParam("hidden_weight", 0.01, 10.0, 1.0, log=True,
                   help="weight of the hidden-state and attention losses"),
        CategoricalParam("attention_loss", (False, True), False, searched=False,
                         help="add TinyBERT's attention-map MSE (eager attention; one teacher forward per step)"),
        IntParam("pretrain_steps", 0, 100_000, 0, searched=False,
                 help="pre-distil a reduced-depth student this many steps once (logit KD, alpha 0.5), cache it "
                      "and start every trial of that depth from it (0 = start from the kept teacher layers)"),
        FloatParam("pretrain_learning_rate", 1e-6, 1e-2, 1e-4, log=True, searched=False,
                   help="learning rate of the pre-distillation"),
        CategoricalParam("pretrain_recipe", PRE_DISTIL_RECIPES, "logit", searched=False,
                         help="pre-distillation losses: logit KD throughout, or TinyBERT's two stages "
                              "(hidden-state + attention MSE for half the steps, then soft logits)"),
    )
    requires = frozenset({Requirement.TEACHER})
    reduces = frozenset({"params", "flops", "latency", "size"})  # from depth reduction only

    def identity_params(self) -> dict[str, Any]:
        return {"depth": 1.0, "alpha": 0.0, "hidden_loss": "none", "attention_loss": False}

    def example_params(self) -> dict[str, Any]:
        return {"depth": 0.5, "alpha": 0.5, "hidden_loss": "tinybert"}

    def _full(self, params: Mapping[str, Any]) -> dict[str, Any]:
        full = {**self.defaults(), **params}
        self.validate(full)
        return full

    def supports(self, model: nn.Module, *, device: str = "cpu") -> str | None:
        try:
            layers = encoder_layers(model)
            if len(layers) == 0:
                raise ValueError
        except (AttributeError, ValueError):
            return f"distillation needs a BERT-like model (.bert.encoder.layer); got {type(model).__name__}"
        return None

    # -- structure ------------------------------------------------------------------------------------
    def apply(self, model: nn.Module, *, params: Mapping[str, Any], ctx: TechniqueContext) -> dict[str, Any] | None:
        p = self._full(params)
        n = len(encoder_layers(model))
        keep = kept_layers(n, float(p["depth"]))
        if len(keep) == n:
            return None  # full depth: nothing changed, no recipe step
        if len(set(map(id, encoder_layers(model)))) != n:
            raise ValueError("distillation must reduce depth before layers are shared (weight_sharing)")
        keep_layers(model, keep)
        ctx.log(f"distillation: student keeps teacher layers {keep} of {n}")
        if p["pretrain_steps"]:
            self._pre_distil(model, p, keep=keep, n=n, ctx=ctx)
        return {"teacher_layers": n, "kept_layers": keep}

    def _pre_distil(self, model: nn.Module, p: Mapping[str, Any], *, keep: list[int], n: int,
                    ctx: TechniqueContext) -> None:
        """Task-specific distillation of the student before any other technique, once per baseline, depth
        and recipe: a trial's few hundred recovery steps cannot distil a shallow student (a 3-layer student
        lost 2.4-3.1 points after 300), thousands can, and every trial of that depth then starts from it."""
        steps, lr, recipe = int(p["pretrain_steps"]), float(p["pretrain_learning_rate"]), str(p["pretrain_recipe"])
        stages = pre_distil_stages(recipe, steps, depth=float(p["depth"]))
        if recipe == "logit":  # the key it had before there were recipes, so cached students stay valid
            what = f"alpha {PRE_DISTIL_ALPHA} T {PRE_DISTIL_TEMPERATURE}"
        else:
            what = f"{recipe}: " + ", then ".join(f"{s} steps {name}" for name, s, _, _ in stages)
        key = (f"distillation/pre-distilled student/layers {keep} of {n}/{steps} steps/lr {lr:g}/{what}/"
               f"{ctx.training_key}/v1")

        def compute() -> dict[str, torch.Tensor]:
            ctx.log(f"distillation: pre-distilling the {len(keep)}-layer student for {steps} steps ({recipe} "
                    "recipe; once, cached for every later trial of this depth)")
            seconds = 0.0
            for name, stage_steps, params, task_weight in stages:
                hooks = self.training_hooks(model, params=params, ctx=ctx)
                if hooks is not None and task_weight is not None:
                    hooks = dataclasses.replace(hooks, task_loss_weight=task_weight)
                if len(stages) > 1:
                    ctx.log(f"distillation: {name} stage, {stage_steps} steps")
                stats = ctx.fine_tune(model, steps=stage_steps, hooks=[hooks] if hooks else [], learning_rate=lr)
                seconds += float(stats.get("seconds", 0.0))
            ctx.log(f"distillation: pre-distilled in {seconds:.0f}s")
            return {k: v.detach().clone() for k, v in model.state_dict().items()}

        state = ctx.cached(key, compute)
        model.load_state_dict({k: v.to(next(model.parameters()).device) for k, v in state.items()})
        model.eval()

    def restore(self, model: nn.Module, *, phase: str, params: Mapping[str, Any],
                record: Mapping[str, Any] | None) -> None:
        if phase != "apply" or not record:
            return
        n = len(encoder_layers(model))
        if int(record["teacher_layers"]) != n:
            raise ValueError(f"distillation record was made on a {record['teacher_layers']}-layer model; this "
                             f"one has {n}")
        keep_layers(model, [int(k) for k in record["kept_layers"]])

    # -- training -------------------------------------------------------------------------------------
    def training_hooks(self, model: nn.Module, *, params: Mapping[str, Any],
                       ctx: TechniqueContext) -> TrainingHooks | None:
        p = self._full(params)
        alpha, temperature = float(p["alpha"]), float(p["temperature"])
        hidden, weight, attentions = str(p["hidden_loss"]), float(p["hidden_weight"]), bool(p["attention_loss"])
        needs_forward = hidden != "none" or attentions
        if alpha == 0.0 and not needs_forward:
            return None  # plain fine-tuning: the "no KD" control
        layer_map: list[int] = []
        projection: nn.Module | None = None
        teacher: nn.Module | None = None
        if needs_forward:
            teacher = ctx.teacher()
            # The map is recomputed from the teacher's depth and ``depth`` (what apply() recorded), so the
            # hooks need no state from apply().
            layer_map = kept_layers(len(encoder_layers(teacher)), float(p["depth"]))
            student_n = len(encoder_layers(model))
            if student_n != len(layer_map):
                raise ValueError(f"distillation maps {len(layer_map)} student layers to teacher layers "
                                 f"{layer_map}, but the student has {student_n}; depth must not change after "
                                 f"distillation's depth reduction")
            d_s, d_t = int(model.config.hidden_size), int(teacher.config.hidden_size)
            if hidden != "none" and d_s != d_t:
                device = next(model.parameters()).device
                projection = nn.Linear(d_s, d_t).to(device)  # TinyBERT's W_h, shared by all layers
                ctx.log(f"distillation: learning a {d_s}->{d_t} projection for the hidden-state loss")

        def loss(batch: Mapping[str, Any], outputs: Any, student: nn.Module) -> torch.Tensor:
            total = outputs.logits.new_zeros((), dtype=torch.float32)
            if alpha > 0.0:
                total = total + alpha * logit_kd_loss(outputs.logits, ctx.teacher_logits(batch), temperature)
            if not needs_forward:
                return total
            assert teacher is not None
            mask = batch.get("attention_mask")
            t_out = teacher_states(teacher, batch, attentions=attentions)
            if hidden != "none":
                if outputs.hidden_states is None:
                    raise RuntimeError("distillation's hidden-state loss got no hidden_states from the student")
                total = total + weight * hidden_state_loss(hidden, outputs.hidden_states, t_out.hidden_states,
                                                           layer_map, mask, projection).float()
            if attentions:
                if outputs.attentions is None:
                    raise RuntimeError("distillation's attention loss got no attentions from the student "
                                       "(the trainer must run it with eager attention)")
                total = total + weight * attention_map_loss(outputs.attentions, t_out.attentions, layer_map,
                                                            mask).float()
            return total

        return TrainingHooks(
            loss=loss,
            task_loss_weight=1.0 - alpha,
            output_hidden_states=hidden != "none",
            output_attentions=attentions,
            parameters=list(projection.parameters()) if projection is not None else [],
        )


@hookimpl
def register_techniques(register) -> None:
    register(Distillation())
