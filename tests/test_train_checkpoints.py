"""baseline.select_checkpoints: the fine-tune keeps the checkpoint best on validation, not the last one."""
from __future__ import annotations

import copy

import pytest
import torch

from autocompress import engine, testing
from autocompress.spec import load_spec
from autocompress.tiny import make_tiny_classifier
from autocompress.train import fine_tune


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_the_best_scored_checkpoint_is_kept():
    model = make_tiny_classifier()
    scores = iter([0.5, 0.9, 0.7, 0.6])  # the second of four checkpoints is best
    snapshots = {}

    def score(m):
        value = next(scores)
        snapshots[value] = _weights(m)
        m.eval()  # as a real evaluation does: fine_tune must put the model back in training mode
        return value

    stats = fine_tune(model, testing.tiny_encoded(48), steps=12, batch_size=8, learning_rate=1e-2,
                      checkpoints=4, score=score)
    assert stats["checkpoints"] == [[3, 0.5], [6, 0.9], [9, 0.7], [12, 0.6]]
    assert stats["best_step"] == 6
    kept = model.state_dict()
    assert all(torch.equal(kept[k], v) for k, v in snapshots[0.9].items())
    assert not all(torch.equal(kept[k], v) for k, v in snapshots[0.6].items())  # not the last one


def test_without_checkpoints_training_ends_as_before():
    a, b = make_tiny_classifier(), make_tiny_classifier()
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    enc = testing.tiny_encoded(48)
    stats = fine_tune(a, enc, steps=6, batch_size=8, learning_rate=1e-2, checkpoints=0)
    fine_tune(b, enc, steps=6, batch_size=8, learning_rate=1e-2, checkpoints=6, score=lambda m: 0.0)
    assert "best_step" not in stats
    # ties keep the first checkpoint, so b ends at step 1; a (no selection) ends at step 6
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_checkpoints_need_a_score():
    with pytest.raises(ValueError, match="score="):
        fine_tune(make_tiny_classifier(), testing.tiny_encoded(8), steps=2, batch_size=4, learning_rate=1e-3,
                  checkpoints=2)


def test_cache_key_of_baselines_without_selection_is_unchanged(tmp_path, tiny_model_dir, tiny_data_dir,
                                                               monkeypatch, isolated_cache):
    from conftest import write_tiny_spec

    from autocompress.data import load_task_data

    hashed = []
    real = engine._hash
    monkeypatch.setattr(engine, "_hash", lambda obj: hashed.append(obj) or real(obj))
    path = write_tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir)
    plain, selecting = load_spec(path), load_spec(path, overrides=["baseline.select_checkpoints=3"])
    data = load_task_data(plain.data, seed=plain.seed)
    key_plain, _ = engine.baseline_location(plain, data)
    key_selecting, _ = engine.baseline_location(selecting, data)
    assert "select_checkpoints" not in hashed[0]["baseline"]  # keys cached before the option existed still match
    assert hashed[1]["baseline"]["select_checkpoints"] == 3 and key_plain != key_selecting
