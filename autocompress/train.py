"""Fine-tuning: the baseline once, and recovery training in each trial with the techniques' hooks."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .errors import TrialError
from .technique import TrainingHooks

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .data import Encoded


def fine_tune(
    model: "nn.Module",
    enc: "Encoded",
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    weight_decay: float = 0.01,
    warmup_ratio: float = 0.06,
    seed: int = 0,
    device: str = "cpu",
    hooks: Sequence[TrainingHooks] = (),
    pad_token_id: int = 0,
    on_step: Callable[[int, int, float], None] | None = None,
    checkpoints: int = 0,
    score: Callable[["nn.Module"], float] | None = None,
    average_last: int = 0,
    group_by_length: bool = False,
    micro_batches: int = 1,
) -> dict[str, Any]:
    """Train ``model`` for ``steps`` optimiser steps of cross-entropy plus the hooks' loss terms.

    With ``checkpoints`` = N > 0, ``score(model)`` (higher is better; a held-out split, never the one
    reported) is taken at N evenly spaced steps, the last included, and the model ends with the weights of
    the best: ``load_best_model_at_end`` in transformers' Trainer. With ``average_last`` = K >= 2 as well, the
    model ends with the mean of the last K checkpoints' weights instead (checkpoint averaging, a fixed recipe
    as in Vaswani et al. 2017; "model soups" for fine-tuning), and the mean's score is recorded.
    ``group_by_length`` draws batches of similar length (fewer padded tokens, so faster steps;
    :func:`autocompress.data.length_grouped`). ``micro_batches`` = N > 1 splits each batch by length
    (:func:`split_by_length`) and accumulates the parts' gradients: the same step, fewer padded tokens. Returns
    ``{"steps", "final_loss", "seconds"}``, plus ``"checkpoints"`` ([step, score] each) and ``"best_step"``
    when selecting, and ``"average"`` ({"steps", "score"}) when averaging. A non-finite loss raises
    :class:`TrialError` (the trial is recorded as failed with that reason; the study goes on).
    """
    import torch

    if steps <= 0:
        return {"steps": 0, "final_loss": None, "seconds": 0.0}
    if checkpoints and score is None:
        raise ValueError("fine_tune(checkpoints=N) needs score=: the function that rates a checkpoint")
    if micro_batches < 1:
        raise ValueError(f"fine_tune(micro_batches={micro_batches}) needs 1 or more parts per batch")
    if average_last and not 2 <= average_last <= checkpoints:
        raise ValueError(f"fine_tune(average_last={average_last}) averages 2 to checkpoints={checkpoints} "
                         "of the scored checkpoints; raise checkpoints or set average_last=0")
    torch.manual_seed(seed)
    model.to(device).train()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name or name.endswith(".bias") else decay).append(p)
    extra = [p for h in hooks for p in h.parameters]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay + extra, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=learning_rate)
    warmup = int(steps * warmup_ratio)

    def schedule(step: int) -> float:  # linear warm-up, then linear decay to zero
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (steps - step) / max(1, steps - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    want_hidden = any(h.output_hidden_states for h in hooks)
    want_attn = any(h.output_attentions for h in hooks)
    task_weight = math.prod(h.task_loss_weight for h in hooks) if hooks else 1.0
    # Attention probabilities are only returned by the eager kernel (SDPA computes them implicitly).
    config = getattr(model, "config", None)
    saved_impl = getattr(config, "_attn_implementation", None)
    if want_attn and saved_impl is not None:
        config._attn_implementation = "eager"
    keeper = _BestCheckpoint(steps, checkpoints, score, average_last=average_last) if checkpoints else None
    try:
        stats = _loop(model, enc, steps=steps, batch_size=batch_size, seed=seed, device=device, hooks=hooks,
                      pad_token_id=pad_token_id, on_step=on_step, optimizer=optimizer, scheduler=scheduler,
                      groups=groups, want_hidden=want_hidden, want_attn=want_attn, task_weight=task_weight,
                      keeper=keeper, group_by_length=group_by_length, micro_batches=micro_batches)
    finally:
        if want_attn and saved_impl is not None:
            config._attn_implementation = saved_impl
    if keeper is not None:
        stats.update(keeper.restore(model))
    return stats


class _BestCheckpoint:
    """Scores the model at evenly spaced steps and keeps a CPU copy of the best weights (and of the last
    ``average_last``, whose mean the model ends with)."""

    def __init__(self, steps: int, n: int, score: Callable[["nn.Module"], float], *, average_last: int = 0) -> None:
        n = min(n, steps)
        at = sorted({round(steps * (i + 1) / n) for i in range(n)})
        self.at, self.averaged = set(at), set(at[-average_last:]) if average_last >= 2 else set()
        self.score, self.seen, self.best, self.tail = score, [], None, []

    def after(self, step: int, model: "nn.Module") -> None:
        if step not in self.at:
            return
        value = float(self.score(model))
        model.train()  # scoring switched it to eval
        self.seen.append([step, value])
        if step in self.averaged:
            self.tail.append((step, _snapshot(model)))
        if self.best is None or value > self.best[1]:
            # When averaging, the best single checkpoint is only reported: no copy of its weights is needed.
            self.best = (step, value, None if self.averaged else _snapshot(model))

    def restore(self, model: "nn.Module") -> dict[str, Any]:
        step, _, state = self.best
        out: dict[str, Any] = {"checkpoints": self.seen, "best_step": step}
        if len(self.tail) >= 2:
            # The mean is kept whatever validation says of it: picking between it and the best single
            # checkpoint would be one more choice fitted to a noisy validation split.
            model.load_state_dict(average_states([s for _, s in self.tail]))
            out["average"] = {"steps": [s for s, _ in self.tail], "score": float(self.score(model))}
            return out
        model.load_state_dict(state)
        return out


def _snapshot(model: "nn.Module") -> dict[str, Any]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def average_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The element-wise mean of floating-point tensors; other tensors (integer buffers such as
    ``position_ids``) are taken from the last state."""
    import torch

    out = {}
    for k, last in states[-1].items():
        if torch.is_floating_point(last):
            out[k] = torch.stack([s[k].to(torch.float32) for s in states]).mean(0).to(last.dtype)
        else:
            out[k] = last.clone()
    return out


def _loop(model, enc, *, steps, batch_size, seed, device, hooks, pad_token_id, on_step, optimizer, scheduler,
          groups, want_hidden, want_attn, task_weight, keeper=None, group_by_length=False,
          micro_batches=1) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from .data import infinite_batches
    from .timing import add_compute

    data = infinite_batches(enc, batch_size=batch_size, device=device, seed=seed, pad_token_id=pad_token_id,
                            group_by_length=group_by_length, with_index=True)
    start = time.perf_counter()
    loss_value = float("nan")
    for step in range(steps):
        for h in hooks:
            if h.before_step:
                h.before_step(step, steps)
        kwargs: dict[str, Any] = {}
        if want_hidden:
            kwargs["output_hidden_states"] = True
        if want_attn:
            kwargs["output_attentions"] = True
        optimizer.zero_grad(set_to_none=True)
        loss_value, backward_seconds = 0.0, 0.0
        for part, share in split_by_length(next(data), micro_batches):
            labels = part.pop("labels")
            index = part.pop("example_index")
            outputs = model(**part, **kwargs)
            loss = task_weight * F.cross_entropy(outputs.logits, labels) if task_weight else outputs.logits.sum() * 0
            part["labels"] = labels
            part["example_index"] = index  # hooks look up cached teacher outputs by it
            for h in hooks:
                if h.loss:
                    loss = loss + h.loss(part, outputs, model)
            if share != 1.0:
                loss = loss * share  # the parts' losses add up to the whole batch's mean loss
            value = float(loss.detach())
            if not math.isfinite(value):
                raise TrialError(f"training loss became {value} at step {step + 1}/{steps}; lower the learning rate or the compression")
            loss_value += value
            t_backward = time.perf_counter()
            loss.backward()
            backward_seconds += time.perf_counter() - t_backward
        t_backward = time.perf_counter()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        optimizer.step()
        scheduler.step()
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        add_compute(backward_seconds + time.perf_counter() - t_backward)  # forwards are timed by the clock's hooks
        for h in hooks:
            if h.after_step:
                h.after_step(step, steps)
        if on_step:
            on_step(step + 1, steps, loss_value)
        if keeper is not None:
            keeper.after(step + 1, model)
    model.eval()
    optimizer.zero_grad(set_to_none=True)
    return {"steps": steps, "final_loss": loss_value, "seconds": time.perf_counter() - start}


def split_by_length(batch: dict[str, "torch.Tensor"], parts: int) -> list[tuple[dict[str, "torch.Tensor"], float]]:
    """``batch`` (right-padded, as :func:`autocompress.data.batches` makes them) cut into ``parts``
    length-sorted micro-batches, each trimmed to its own longest example, with each part's share of the
    examples. Random batches of short texts pad to their longest (SST-2: ~3x the mean length), so the short
    parts skip most of that padding; the examples and the step are the same as the whole batch's."""
    import torch

    size = len(batch["labels"])
    mask = batch.get("attention_mask")
    if parts <= 1 or size <= 1 or mask is None:
        return [(batch, 1.0)]
    lengths = mask.sum(dim=1)
    out = []
    for idx in torch.tensor_split(torch.argsort(lengths, stable=True), min(parts, size)):
        width = int(lengths[idx].max())
        out.append(({k: v[idx, :width] if v.dim() == 2 else v[idx] for k, v in batch.items()}, len(idx) / size))
    return out


def steps_for(*, examples: int, batch_size: int, epochs: float, max_steps: int | None) -> int:
    return max_steps if max_steps is not None else max(1, math.ceil(examples / batch_size * epochs))
