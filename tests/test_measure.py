from __future__ import annotations

import numpy as np
import pytest

from autocompress.measure import classification_metrics


def test_metrics_binary_hand_computed():
    labels = np.array([1, 1, 0, 0, 1])
    logits = np.array([[0, 1], [1, 0], [1, 0], [0, 1], [0, 1]], dtype=float)  # tp=2 fn=1 tn=1 fp=1
    m = classification_metrics(logits, labels)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["f1"] == pytest.approx(2 * (2 / 3) * (2 / 3) / (4 / 3))
    assert m["mcc"] == pytest.approx((2 * 1 - 1 * 1) / np.sqrt(3 * 3 * 2 * 2))


def test_metrics_perfect_and_constant():
    labels = np.array([0, 1, 2, 1])
    perfect = np.eye(3)[labels]
    assert classification_metrics(perfect, labels) == {"accuracy": 1.0, "f1": 1.0, "mcc": pytest.approx(1.0)}
    constant = np.tile([1.0, 0, 0], (4, 1))
    assert classification_metrics(constant, labels)["mcc"] == 0.0


def test_flops_count_attention_and_drop_with_pruning(tiny_model):
    """FLOPs are counted with the attention core included, and fall when heads are removed."""
    from autocompress.data import Encoded
    from autocompress.measure import flops_per_example

    enc = Encoded(input_ids=[np.arange(2, 14, dtype=np.int32)] * 4, token_type_ids=None, labels=np.zeros(4, dtype=np.int64), truncated=0)
    h, inter, layers, t = 32, 64, 2, 12
    linear = 2 * t * (4 * h * h + 2 * h * inter) * layers  # Q,K,V,O and the FFN, per example
    attention = 2 * 2 * t * t * h * layers  # QK^T and AV
    pooler_and_head = 2 * (h * h + h * 2)
    assert flops_per_example(tiny_model, enc) == pytest.approx(linear + attention + pooler_and_head)
    assert tiny_model.config._attn_implementation == "sdpa"  # restored after counting
    from plugins.head_pruning import prune_heads

    prune_heads(tiny_model, [[0, 1], [0, 1]])  # half the heads in each layer: Q/K/V/O and the core halve
    pruned = 2 * t * (2 * h * h + 2 * h * inter) * layers + 2 * 2 * t * t * (h // 2) * layers + pooler_and_head
    assert flops_per_example(tiny_model, enc) == pytest.approx(pruned)


def test_the_baseline_is_timed_with_more_passes_than_a_trial(tmp_path, tiny_model_dir, tiny_data_dir, isolated_cache,
                                                              monkeypatch):
    """Every latency ratio of a study divides by the baseline's one timing, so it takes BASELINE_REPEATS_FACTOR
    times the passes of a trial's (a noisy 5-pass baseline read 18% slow in session 18)."""
    import autocompress.measure as measure_mod
    from autocompress.engine import BASELINE_REPEATS_FACTOR, latency_metrics, measure_baseline, prepare
    from autocompress.registry import load_registry
    from autocompress.spec import load_spec
    from conftest import write_tiny_spec

    prep = prepare(load_spec(write_tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir)), load_registry())
    seen: list[int] = []
    real = measure_mod.latency_ms_per_example

    def spy(*args, repeats, **kwargs):
        seen.append(repeats)
        return real(*args, repeats=repeats, **kwargs)

    monkeypatch.setattr(measure_mod, "latency_ms_per_example", spy)
    n = prep.spec.measurement.repeats
    out = measure_baseline(prep)
    assert BASELINE_REPEATS_FACTOR > 1
    assert seen == [BASELINE_REPEATS_FACTOR * n] * len(prep.latency_sets)
    assert all(out[f"latency_bs{bs}"] > 0 for bs in prep.latency_sets)
    seen.clear()
    latency_metrics(prep.baseline, prep, device=prep.device)   # a trial's timing keeps the spec's passes
    assert seen == [n] * len(prep.latency_sets)
