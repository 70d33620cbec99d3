"""The fine-tuned baseline: fine-tuned once per model, data and recipe, cached, and shared by every trial.

The cache key names the base model and the data by content (never by path), so another checkout, virtualenv or
Ray node finds the same baseline. ``baseline.soup`` averages several fine-tunes (:mod:`autocompress.soup`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from .data import cache_root
from .spec import Spec, without_later_defaults

if TYPE_CHECKING:
    from torch import nn

    from .data import Encoded, TaskData


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def baseline_location(spec: Spec, data: "TaskData") -> tuple[str, Path]:
    """The cache key of a study's fine-tuned baseline (model, data, hyperparameters, seed) and its folder
    (``model/`` inside holds the weights once fine-tuned)."""
    from .modeling import model_fingerprint, resolve_model_path

    baseline = without_later_defaults({"baseline": spec.baseline.model_dump(mode="json")})["baseline"]
    if not baseline["select_checkpoints"]:
        del baseline["select_checkpoints"]  # added later: keys of baselines cached before it stay valid
    parts = {"model": spec.model.model_dump(mode="json"), "data": data.fingerprint, "baseline": baseline,
             "seed": spec.seed, "v": 1}
    # The model by content, not by name or path: keyed by path (before session 14), a fresh clone's own
    # virtualenv, or a Ray node's, missed the cache and fine-tuned the baseline again (an hour on 2 CPU cores).
    key = _hash({**parts, "model": spec.model.model_dump(mode="json", exclude={"name"}),
                 "model_fingerprint": model_fingerprint(spec.model.name)})
    bdir = cache_root() / "baselines" / key
    if not (bdir / "model").is_dir():
        legacy = cache_root() / "baselines" / _hash({**parts, "model_path": resolve_model_path(spec.model.name)})
        if (legacy / "model" / "config.json").is_file():
            try:
                legacy.rename(bdir)  # adopted under the new key: the fine-tune is not repeated
            except OSError:
                pass  # another process adopted it first, or bdir appeared meanwhile
    return key, bdir


def get_baseline(spec: Spec, data: "TaskData", train: "Encoded", *, tokenizer: Any, device: str,
                 pad_token_id: int, log: Callable[[str], None], validation: "Encoded | None" = None,
                 ) -> tuple["nn.Module", Path, str]:
    """Fine-tune the base model once, cached by model, data and hyperparameters. With
    ``baseline.select_checkpoints`` it keeps the checkpoint most accurate on ``validation`` (never on the
    evaluation split, which only reports)."""
    from transformers import AutoModelForSequenceClassification

    from .modeling import load_base_classifier
    from .train import fine_tune, steps_for

    key, bdir = baseline_location(spec, data)
    done = bdir / "model" / "config.json"
    if done.is_file():
        log(f"Reusing the cached fine-tuned baseline {bdir}")
        model = AutoModelForSequenceClassification.from_pretrained(str(bdir / "model"))
        return model.to(device).eval(), bdir, key
    import torch

    b = spec.baseline
    if b.soup:
        model = _soup_baseline(spec, data, train, tokenizer=tokenizer, device=device, pad_token_id=pad_token_id,
                               log=log, validation=validation, bdir=bdir)
        return model.eval(), bdir, key
    seed = spec.seed if b.seed is None else b.seed  # spec.seed also carves validation: an ingredient leaves it
    # The new classification head is drawn from torch's global generator: seeded here, a cold cache fine-tunes
    # the same baseline on every machine and run (before 21dcf52 only the training was seeded).
    torch.manual_seed(seed)
    model = load_base_classifier(spec.model, label_names=data.label_names)
    steps = steps_for(examples=len(train), batch_size=b.batch_size, epochs=b.epochs, max_steps=b.max_steps)
    log(f"Fine-tuning the baseline: {steps} steps of batch {b.batch_size} on {len(train)} examples (cached afterwards)")
    reporter = _step_reporter(log, steps)
    score = None
    if b.select_checkpoints:
        from .measure import evaluate

        if validation is None or not len(validation):
            raise ValueError("baseline.select_checkpoints needs the validation split")  # a caller's bug

        def score(m: "nn.Module") -> float:
            accuracy = evaluate(m, validation, device=device, pad_token_id=pad_token_id)["accuracy"]
            log(f"  checkpoint: validation accuracy {accuracy * 100:.2f}")
            return accuracy

    stats = fine_tune(model, train, steps=steps, batch_size=b.batch_size, learning_rate=b.learning_rate,
                      weight_decay=b.weight_decay, warmup_ratio=b.warmup_ratio, seed=seed, device=device,
                      pad_token_id=pad_token_id, on_step=reporter, checkpoints=b.select_checkpoints, score=score,
                      average_last=b.average_checkpoints, group_by_length=b.group_by_length,
                      micro_batches=b.micro_batches)
    average = stats.get("average")
    if average:
        log(f"  kept the mean of the checkpoints of steps {', '.join(map(str, average['steps']))}: validation "
            f"accuracy {average['score'] * 100:.2f}")
    elif "best_step" in stats:
        log(f"  kept the checkpoint of step {stats['best_step']}/{steps} (best validation accuracy)")
    _save_baseline(model, stats, bdir)
    return model.eval(), bdir, key


def _soup_baseline(spec: Spec, data: "TaskData", train: "Encoded", *, tokenizer: Any, device: str, pad_token_id: int,
                   log: Callable[[str], None], validation: "Encoded | None", bdir: Path) -> "nn.Module":
    """``baseline.soup``: fine-tune (or reuse) each ingredient as a baseline of its own, then keep their greedy
    soup on validation (:func:`autocompress.soup.greedy_soup`)."""
    from .measure import evaluate
    from .soup import greedy_soup

    if validation is None or not len(validation):
        raise ValueError("baseline.soup needs the validation split")  # a caller's bug: prepare always carves one
    b = spec.baseline
    recipes = [b.model_copy(update={"soup": []}), *(b.ingredient(i) for i in range(len(b.soup)))]
    names = ["the recipe itself", *(", ".join(f"{k}={v}" for k, v in c.items()) for c in b.soup)]
    states, own = [], []
    model = None
    for name, recipe in zip(names, recipes):
        log(f"Soup ingredient {len(states) + 1}/{len(recipes)} ({name}):")
        del model  # one fine-tune in memory at a time, besides the state dicts
        model, _, _ = get_baseline(spec.model_copy(update={"baseline": recipe}), data, train, tokenizer=tokenizer,
                                   device=device, pad_token_id=pad_token_id, log=log, validation=validation)
        states.append({k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
        own.append(evaluate(model, validation, device=device, pad_token_id=pad_token_id)["accuracy"])
        log(f"  validation accuracy {own[-1] * 100:.2f}")

    def score(state: Mapping[str, Any]) -> float:
        model.load_state_dict(state)
        return evaluate(model, validation, device=device, pad_token_id=pad_token_id)["accuracy"]

    soup = greedy_soup(states, score, own_scores=own)
    for i, candidate, joined in soup["tried"]:
        log(f"  soup + {names[i]}: validation accuracy {candidate * 100:.2f} ({'kept' if joined else 'left out'})")
    log(f"  kept the soup of {', '.join(names[i] for i in soup['kept'])}: validation accuracy {soup['score'] * 100:.2f}")
    model.load_state_dict(soup["state"])
    stats = {"soup": {"ingredients": names, "own_scores": own, "tried": soup["tried"], "kept": soup["kept"],
                      "score": soup["score"]}}
    _save_baseline(model, stats, bdir)
    return model


def training_lines(stats: Mapping[str, Any]) -> list[str]:
    """How a cached baseline was chosen, one line a step, from its ``train_stats.json``: each checkpoint's
    validation score, the averaging, and for a soup each ingredient's score and what the greedy soup kept.
    Shared by ``autocompress baseline`` and the bench report, so both say the same."""
    lines = [f"checkpoint of step {step}: validation accuracy {score * 100:.2f}"
             for step, score in stats.get("checkpoints") or []]
    if stats.get("average"):
        lines.append(f"kept the mean of steps {', '.join(map(str, stats['average']['steps']))}: validation "
                     f"accuracy {stats['average']['score'] * 100:.2f}")
    elif "best_step" in stats:
        lines.append(f"kept the checkpoint of step {stats['best_step']} (best validation accuracy)")
    soup = stats.get("soup")
    if soup:
        lines += [f"soup ingredient {name}: validation accuracy {score * 100:.2f}"
                  for name, score in zip(soup["ingredients"], soup["own_scores"])]
        lines += [f"soup + {soup['ingredients'][i]}: validation accuracy {score * 100:.2f} "
                  f"({'kept' if joined else 'left out'})" for i, score, joined in soup.get("tried") or []]
        lines.append(f"kept the soup of {', '.join(soup['ingredients'][i] for i in soup['kept'])}: validation "
                     f"accuracy {soup['score'] * 100:.2f}")
    return lines


def read_training(bdir: Path) -> dict[str, Any]:
    """The ``train_stats.json`` of the baseline cached in ``bdir`` (empty if there is none)."""
    f = bdir / "train_stats.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def _save_baseline(model: "nn.Module", stats: Mapping[str, Any], bdir: Path) -> None:
    done = bdir / "model" / "config.json"
    tmp = bdir / f"model.partial.{os.getpid()}"  # per process: workers starting together on a cold cache
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    (bdir / "train_stats.json").write_text(json.dumps(stats, indent=2))
    if not done.is_file():
        shutil.rmtree(bdir / "model", ignore_errors=True)
    try:
        tmp.rename(bdir / "model")  # atomic: an interrupted fine-tune never leaves a half-written cache
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process cached the same fine-tune first


def _step_reporter(log: Callable[[str], None], total: int) -> Callable[[int, int, float], None]:
    start = time.perf_counter()
    every = max(1, total // 10)

    def report(step: int, steps: int, loss: float) -> None:
        if step % every == 0 or step == steps:
            el = time.perf_counter() - start
            log(f"  step {step}/{steps}  loss {loss:.4f}  {el:.0f}s elapsed, ~{el / step * (steps - step):.0f}s left")

    return report
