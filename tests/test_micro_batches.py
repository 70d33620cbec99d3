"""Length-sorted micro-batches (baseline.micro_batches, recovery.micro_batches): each batch cut by length,
every part padded to its own longest example, gradients added up before the one step. Same batches and
updates as the whole batch, fewer padded tokens."""
from __future__ import annotations

import pytest
import torch

from autocompress import testing
from autocompress.data import batches
from autocompress.technique import TrainingHooks
from autocompress.train import fine_tune, split_by_length


def test_split_by_length_keeps_every_example_and_trims_padding():
    enc = testing.tiny_encoded(64)
    batch = next(batches(enc, batch_size=16, shuffle=True, seed=1, with_index=True))
    parts = split_by_length(batch, 3)
    assert [len(p["labels"]) for p, _ in parts] == [6, 5, 5]
    assert sum(s for _, s in parts) == pytest.approx(1.0)
    seen = torch.cat([p["example_index"] for p, _ in parts])
    assert sorted(seen.tolist()) == sorted(batch["example_index"].tolist())
    widths = [p["input_ids"].shape[1] for p, _ in parts]
    assert widths == sorted(widths) and widths[-1] == batch["input_ids"].shape[1]
    assert sum(w * len(p["labels"]) for w, (p, _) in zip(widths, parts)) < batch["input_ids"].numel()
    row = {int(i): r for i, r in zip(batch["example_index"], batch["input_ids"])}
    for p, _ in parts:  # each row is its whole-batch row, cut where the part's padding ends
        assert p["attention_mask"][:, -1].any()  # trimmed to the part's longest example, no further
        for i, ids in zip(p["example_index"].tolist(), p["input_ids"]):
            assert torch.equal(ids, row[i][:len(ids)]) and not row[i][len(ids):].any()
    assert split_by_length(batch, 1) == [(batch, 1.0)]
    assert len(split_by_length(batch, 99)) == 16  # at most one example per part


def _no_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def test_micro_batches_make_the_same_update():
    """With dropout off, 1 and 3 parts train to the same weights, a batch-independent hook loss included (it
    must count once per step, not once per part)."""
    enc = testing.tiny_encoded(64)

    def trained(parts):
        model = _no_dropout(testing.tiny_model())
        first = next(model.parameters())
        hook = TrainingHooks(loss=lambda batch, outputs, m: 0.5 * first.pow(2).mean())
        stats = fine_tune(model, enc, steps=4, batch_size=16, learning_rate=1e-3, hooks=[hook], micro_batches=parts)
        return model.state_dict(), stats["final_loss"]

    (whole, loss1), (split, loss3) = trained(1), trained(3)
    assert loss3 == pytest.approx(loss1, rel=1e-4)
    for k in whole:
        torch.testing.assert_close(split[k], whole[k], atol=2e-5, rtol=1e-4)
    # a wrong weighting (every part's loss at full weight) is caught
    wrong = _no_dropout(testing.tiny_model())
    original = split_by_length

    def unweighted(batch, parts):
        return [(p, 1.0) for p, _ in original(batch, parts)]

    import autocompress.train as train_mod
    train_mod.split_by_length = unweighted
    try:
        fine_tune(wrong, enc, steps=4, batch_size=16, learning_rate=1e-3, micro_batches=3)
    finally:
        train_mod.split_by_length = original
    assert any(not torch.allclose(wrong.state_dict()[k], whole[k], atol=2e-5) for k in whole)


def test_micro_batches_must_be_positive():
    with pytest.raises(ValueError, match="micro_batches=0"):
        fine_tune(testing.tiny_model(), testing.tiny_encoded(16), steps=1, batch_size=8, learning_rate=1e-3,
                  micro_batches=0)


@pytest.mark.parametrize("section", ["baseline", "recovery"])
def test_micro_batches_is_a_spec_option(tmp_path, tiny_model_dir, tiny_data_dir, section):
    from conftest import write_tiny_spec

    from autocompress.errors import AutocompressError
    from autocompress.search import space_fingerprint
    from autocompress.spec import load_spec

    path = write_tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir)
    plain = load_spec(path)
    split = load_spec(path, overrides=[f"{section}.micro_batches=3"])
    assert getattr(split, section).micro_batches == 3
    # studies fingerprinted before the option existed keep their fingerprint; using it changes it
    assert space_fingerprint(plain) == space_fingerprint(load_spec(path, overrides=[f"{section}.micro_batches=1"]))
    assert space_fingerprint(plain) != space_fingerprint(split)
    with pytest.raises(AutocompressError, match="micro_batches"):
        load_spec(path, overrides=[f"{section}.micro_batches=0"])
