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

    from autocompress import baseline

    hashed = []
    real = baseline._hash
    monkeypatch.setattr(baseline, "_hash", lambda obj: hashed.append(obj) or real(obj))
    path = write_tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir)
    plain, selecting = load_spec(path), load_spec(path, overrides=["baseline.select_checkpoints=3"])
    data = load_task_data(plain.data, seed=plain.seed)
    key_plain, _ = engine.baseline_location(plain, data)
    key_selecting, _ = engine.baseline_location(selecting, data)
    keys = [h for h in hashed if "model_fingerprint" in h]  # not the look-ups of the older path-keyed caches
    assert "select_checkpoints" not in keys[0]["baseline"]  # keys cached before the option existed still match
    assert keys[1]["baseline"]["select_checkpoints"] == 3 and key_plain != key_selecting


def _averaging_run(scores, *, average_last=3):
    """Train with 4 checkpoints, scored from ``scores`` in turn (the last is the mean's)."""
    model = make_tiny_classifier()
    feed, snapshots = iter(scores), []

    def score(m):
        snapshots.append(_weights(m))
        return next(feed)

    stats = fine_tune(model, testing.tiny_encoded(48), steps=12, batch_size=8, learning_rate=1e-2,
                      checkpoints=4, score=score, average_last=average_last)
    return model, stats, snapshots


def test_the_mean_of_the_last_checkpoints_is_kept():
    model, stats, snaps = _averaging_run([0.5, 0.9, 0.7, 0.6, 0.8])  # kept though the best single scored more
    assert stats["average"] == {"steps": [6, 9, 12], "score": 0.8}
    assert stats["best_step"] == 6  # the best single checkpoint is still reported
    kept = model.state_dict()
    for k, v in kept.items():
        if torch.is_floating_point(v):
            torch.testing.assert_close(v, torch.stack([s[k] for s in snaps[1:4]]).mean(0))
    assert torch.equal(snaps[4]["classifier.weight"], kept["classifier.weight"])  # the mean was what was scored
    assert not torch.equal(kept["classifier.weight"], snaps[1]["classifier.weight"])


def test_without_averaging_the_best_single_checkpoint_is_kept():
    model, stats, snaps = _averaging_run([0.5, 0.9, 0.7, 0.6], average_last=0)
    assert "average" not in stats and stats["best_step"] == 6
    assert all(torch.equal(model.state_dict()[k], v) for k, v in snaps[1].items())


def test_average_checkpoints_is_validated():
    with pytest.raises(ValueError, match="average_last=5"):
        fine_tune(make_tiny_classifier(), testing.tiny_encoded(8), steps=4, batch_size=4, learning_rate=1e-3,
                  checkpoints=4, score=lambda m: 0.0, average_last=5)
    from autocompress.spec import TrainSpec

    with pytest.raises(ValueError, match="average_checkpoints=3 .*select_checkpoints"):
        TrainSpec(select_checkpoints=2, average_checkpoints=3)
    with pytest.raises(ValueError, match="average_checkpoints=1"):
        TrainSpec(select_checkpoints=6, average_checkpoints=1)
    assert TrainSpec(select_checkpoints=6, average_checkpoints=3).average_checkpoints == 3


def test_cache_key_of_baselines_without_the_later_options_is_unchanged(tmp_path, tiny_model_dir, tiny_data_dir,
                                                                       isolated_cache):
    from conftest import write_tiny_spec

    from autocompress.data import load_task_data

    path = write_tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir)
    spec = load_spec(path, overrides=["baseline.select_checkpoints=3"])
    data = load_task_data(spec.data, seed=spec.seed)
    key = engine.baseline_location(spec, data)[0]
    same = load_spec(path, overrides=["baseline.select_checkpoints=3", "baseline.average_checkpoints=0",
                                      "baseline.group_by_length=false", "baseline.seed=null", "baseline.soup=[]"])
    assert engine.baseline_location(same, data)[0] == key
    for extra in ("baseline.average_checkpoints=2", "baseline.group_by_length=true", "baseline.seed=1",
                  "baseline.soup=[{seed: 1}]"):
        other = load_spec(path, overrides=["baseline.select_checkpoints=3", extra])
        assert engine.baseline_location(other, data)[0] != key, extra


def test_a_cold_cache_fine_tunes_the_same_baseline_every_time(tmp_path, tiny_model_dir, tiny_data_dir,
                                                              monkeypatch):
    """The baseline's new classification head is seeded, not drawn from wherever torch's generator stood."""
    from conftest import write_tiny_spec

    from autocompress.data import encode, load_task_data
    from autocompress.modeling import load_tokenizer

    spec = load_spec(write_tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir),
                     overrides=["baseline.max_steps=4"])
    data = load_task_data(spec.data, seed=spec.seed)
    tok = load_tokenizer(spec.model)
    train = encode(data.train, tok, max_length=spec.model.max_length, cache_dir=None)
    weights = []
    for run in range(2):
        monkeypatch.setenv("AUTOCOMPRESS_CACHE", str(tmp_path / f"cache{run}"))
        torch.rand(run * 7 + 1)  # the generator stands elsewhere in each run
        model, _, _ = engine.get_baseline(spec, data, train, tokenizer=tok, device="cpu", pad_token_id=0,
                                          log=lambda s: None)
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
