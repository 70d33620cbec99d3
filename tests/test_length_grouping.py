"""Length-grouped training batches (baseline.group_by_length, recovery.group_by_length) and evaluation in
length order: the same examples, far fewer padded tokens, the same predictions."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from autocompress import testing
from autocompress.data import Encoded, batches, infinite_batches, length_grouped
from autocompress.measure import predict
from autocompress.tiny import make_tiny_classifier


def _encoded(lengths) -> Encoded:
    ids = [np.arange(1, n + 1, dtype=np.int32) for n in lengths]
    return Encoded(ids, None, np.arange(len(lengths), dtype=np.int64) % 2, 0)


def _padded_tokens(chunks, lengths) -> int:
    return int(sum(lengths[c].max() * len(c) for c in chunks))


def test_grouped_batches_cover_every_example_once_and_pad_less():
    rng = np.random.default_rng(0)
    lengths = np.minimum(rng.geometric(1 / 13, size=5000) + 2, 64)  # short texts, a long tail: SST-2-like
    order = rng.permutation(len(lengths))
    grouped = length_grouped(order, lengths, batch_size=32, seed=0)
    flat = np.concatenate(grouped)
    assert sorted(flat.tolist()) == list(range(len(lengths)))  # one epoch: every example exactly once
    assert sum(len(c) < 32 for c in grouped) <= 1  # only the epoch's last window may leave a short batch
    plain = [order[i:i + 32] for i in range(0, len(order), 32)]
    assert _padded_tokens(grouped, lengths) < 0.6 * _padded_tokens(plain, lengths)
    # the batch order is shuffled (not longest first), and reproducible from the seed
    firsts = [lengths[c].max() for c in grouped]
    assert firsts != sorted(firsts, reverse=True) and firsts != sorted(firsts)
    again = length_grouped(order, lengths, batch_size=32, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(grouped, again))
    other = length_grouped(order, lengths, batch_size=32, seed=1)
    assert not all(np.array_equal(a, b) for a, b in zip(grouped, other))


def test_batches_group_by_length_only_when_shuffling():
    enc = _encoded([3, 30, 4, 29, 5, 28, 6, 27] * 8)
    plain = list(batches(enc, batch_size=8, shuffle=False, group_by_length=True, with_index=True))
    assert [b["example_index"].tolist() for b in plain] == [list(range(i, i + 8)) for i in range(0, 64, 8)]
    grouped = list(batches(enc, batch_size=8, shuffle=True, seed=3, group_by_length=True, with_index=True))
    assert sorted(i for b in grouped for i in b["example_index"].tolist()) == list(range(64))
    widths = [b["input_ids"].shape[1] for b in grouped]
    assert sorted(widths) == [3, 4, 5, 6, 27, 28, 29, 30]  # one length per batch; in random batches most pad to 30
    for b in grouped:  # padding is where the mask is 0, and each row holds its own example
        lens = b["attention_mask"].sum(1)
        assert torch.equal(lens, torch.tensor([len(enc.input_ids[i]) for i in b["example_index"].tolist()]))


def test_drop_last_drops_only_short_batches_when_grouped():
    enc = _encoded(list(range(1, 51)))
    got = list(batches(enc, batch_size=8, shuffle=True, group_by_length=True, drop_last=True))
    assert len(got) == 6 and all(len(b["labels"]) == 8 for b in got)


def test_infinite_batches_passes_grouping_on():
    enc = _encoded([3, 30] * 32)
    it = infinite_batches(enc, batch_size=8, seed=0, group_by_length=True)
    widths = {next(it)["input_ids"].shape[1] for _ in range(16)}  # two epochs
    assert widths == {3, 30}


def test_predict_in_length_order_returns_logits_in_dataset_order():
    torch.manual_seed(0)
    model = make_tiny_classifier().eval()
    enc = testing.tiny_encoded(40)
    assert len(set(enc.lengths().tolist())) > 3  # mixed lengths, so the order changes
    got = predict(model, enc, batch_size=16)
    with torch.inference_mode():  # each example alone: no padding at all
        want = np.concatenate([model(**{k: v for k, v in b.items() if k != "labels"}).logits.numpy()
                               for b in batches(enc, batch_size=1)])
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_fine_tune_with_grouping_trains(monkeypatch):
    from autocompress.train import fine_tune

    model = make_tiny_classifier()
    stats = fine_tune(model, testing.tiny_encoded(64), steps=8, batch_size=8, learning_rate=1e-3,
                      group_by_length=True)
    assert stats["steps"] == 8 and np.isfinite(stats["final_loss"])


@pytest.mark.parametrize("section", ["baseline", "recovery"])
def test_group_by_length_is_a_spec_option(tmp_path, tiny_model_dir, tiny_data_dir, section):
    from conftest import write_tiny_spec

    from autocompress.search import space_fingerprint
    from autocompress.spec import load_spec

    path = write_tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir)
    plain = load_spec(path)
    grouped = load_spec(path, overrides=[f"{section}.group_by_length=true"])
    assert getattr(grouped, section).group_by_length is True
    # studies fingerprinted before the option existed keep their fingerprint; turning it on changes it
    assert space_fingerprint(plain) == space_fingerprint(load_spec(path, overrides=[f"{section}.group_by_length=false"]))
    assert space_fingerprint(plain) != space_fingerprint(grouped)
