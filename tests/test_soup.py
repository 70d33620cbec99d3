"""baseline.soup: a greedy model soup of several fine-tunes, chosen on validation only."""
from __future__ import annotations

import json

import pytest
import torch

from autocompress.errors import SpecError
from autocompress.soup import average_state_dicts, greedy_soup
from autocompress.spec import load_spec


def _state(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((2,), value), "ids": torch.arange(3)}


def test_average_state_dicts_averages_floats_and_keeps_integer_buffers():
    mean = average_state_dicts([_state(1.0), _state(3.0)])
    assert torch.equal(mean["w"], torch.full((2,), 2.0)) and torch.equal(mean["ids"], torch.arange(3))
    with pytest.raises(ValueError, match="other tensors"):
        average_state_dicts([_state(1.0), {"v": torch.zeros(2)}])


def test_greedy_soup_keeps_an_ingredient_only_if_validation_does_not_drop():
    # The score peaks at w = 2: ingredients 1.0 and 3.0 help each other, 10.0 spoils any mean it joins.
    def score(sd):
        return 1.0 - abs(float(sd["w"][0]) - 2.0) / 10

    states = [_state(10.0), _state(1.0), _state(3.0)]
    soup = greedy_soup(states, score)
    assert soup["own_scores"] == [score(s) for s in states]
    assert soup["kept"] == [1, 2]  # by own score: 1.0 and 3.0 tie at 0.9 (given order), 10.0 last and left out
    assert soup["score"] == pytest.approx(1.0)
    assert torch.equal(soup["state"]["w"], torch.full((2,), 2.0))
    assert [t[0] for t in soup["tried"]] == [2, 0] and soup["tried"][1][2] is False


def test_a_single_ingredient_soup_is_that_ingredient():
    soup = greedy_soup([_state(5.0)], lambda sd: 0.5)
    assert soup["kept"] == [0] and soup["tried"] == [] and torch.equal(soup["state"]["w"], torch.full((2,), 5.0))


@pytest.mark.parametrize("entry, message", [
    ("[{learning_rte: 3.0e-5}]", "unknown: learning_rte"),
    ("[{}]", "soup\\[0\\]"),
    ("[{learning_rate: 2}]", "invalid recipe"),
    ("[{soup: [{seed: 2}]}]", "unknown: soup"),
    ("[{batch_size: 16}]", "changes nothing"),  # the tiny spec's own batch size
])
def test_bad_soup_entries_are_refused_when_the_spec_loads(tmp_path, tiny_model_dir, tiny_data_dir, entry, message):
    from conftest import write_tiny_spec

    path = write_tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir)
    with pytest.raises(SpecError, match=message):
        load_spec(path, overrides=[f"baseline.soup={entry}"])


def test_the_baseline_soup_fine_tunes_each_ingredient_once_and_keeps_the_greedy_soup(
        tmp_path, tiny_model_dir, tiny_data_dir, isolated_cache):
    from conftest import write_tiny_spec

    from autocompress.baseline import baseline_location, get_baseline
    from autocompress.data import encode, load_task_data
    from autocompress.measure import evaluate
    from autocompress.modeling import load_tokenizer

    spec = load_spec(write_tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir),
                     overrides=["baseline.max_steps=6", "baseline.soup=[{seed: 1}, {learning_rate: 1.0e-3}]"])
    data = load_task_data(spec.data, seed=spec.seed)
    tok = load_tokenizer(spec.model)
    train, validation = (encode(s, tok, max_length=spec.model.max_length, cache_dir=None)
                         for s in (data.train, data.validation))
    logs: list[str] = []
    kw = dict(tokenizer=tok, device="cpu", pad_token_id=0, log=logs.append, validation=validation)
    model, bdir, key = get_baseline(spec, data, train, **kw)
    cached = sorted(p.name for p in (isolated_cache / "baselines").iterdir())
    assert len(cached) == 4 and key in cached  # three ingredients, each a baseline of its own, and the soup
    stats = json.loads((bdir / "train_stats.json").read_text())["soup"]
    assert stats["ingredients"] == ["the recipe itself", "seed=1", "learning_rate=0.001"]
    assert stats["score"] >= max(stats["own_scores"])  # greedy: never below its best ingredient on validation
    assert evaluate(model, validation, device="cpu", pad_token_id=0)["accuracy"] == pytest.approx(stats["score"])
    plain = spec.model_copy(update={"baseline": spec.baseline.model_copy(update={"soup": []})})
    assert baseline_location(plain, data)[0] in cached  # the recipe itself is cached under its usual key
    logs.clear()
    again, _, _ = get_baseline(spec, data, train, **kw)  # reused, nothing fine-tuned
    assert any("Reusing" in line for line in logs) and not any("Fine-tuning" in line for line in logs)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_training_lines_say_what_was_chosen_on_validation():
    from autocompress.baseline import training_lines

    stats = {"checkpoints": [[10, 0.8], [20, 0.85]], "average": {"steps": [10, 20], "score": 0.84},
             "soup": {"ingredients": ["the recipe itself", "seed=1"], "own_scores": [0.84, 0.9],
                      "tried": [[0, 0.88, False]], "kept": [1], "score": 0.9}}
    assert training_lines(stats) == [
        "checkpoint of step 10: validation accuracy 80.00", "checkpoint of step 20: validation accuracy 85.00",
        "kept the mean of steps 10, 20: validation accuracy 84.00",
        "soup ingredient the recipe itself: validation accuracy 84.00", "soup ingredient seed=1: validation accuracy 90.00",
        "soup + the recipe itself: validation accuracy 88.00 (left out)",
        "kept the soup of seed=1: validation accuracy 90.00"]
    assert training_lines({"checkpoints": [[5, 0.7]], "best_step": 5})[-1] == \
        "kept the checkpoint of step 5 (best validation accuracy)"
    assert training_lines({}) == []
