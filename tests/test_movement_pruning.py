from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from autocompress import testing
from autocompress.measure import flops_per_example
from autocompress.modeling import config_snapshot, load_compressed, param_count, save_compressed
from autocompress.pipeline import run_pipeline
from autocompress.registry import load_registry
from autocompress.surgery import ffn_sizes, head_counts, prune_heads
from autocompress.technique import TechniqueContext
from autocompress.testing import tiny_batch, tiny_encoded
from autocompress.tiny import make_tiny_classifier
from autocompress.train import fine_tune
from plugins.movement_pruning import (MovementPruning, SparseLinear, cubic_sparsity, global_masks, pack_bits,
                                      top_mask, unpack_bits)

TECH = MovementPruning()
PLUGINS = ["plugins.movement_pruning"]
ENC = tiny_encoded()


def _params(**overrides):
    return {**TECH.defaults(), **overrides}


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def _train(steps=6):
    def train(m, hooks):
        return fine_tune(m, ENC, steps=steps, batch_size=8, learning_rate=1e-3, seed=0, hooks=hooks)

    return train


def _run(model, params, *, steps=6, tech=TECH, before=()):
    return run_pipeline(model, [*before, (tech, params)], ctx=TechniqueContext(),
                        train=_train(steps) if steps else None)


def _roundtrip(model, recipe, base_config, tmp_path, batch):
    size = save_compressed(model, tmp_path, base_config=base_config, recipe=recipe)
    reloaded = load_compressed(tmp_path, registry=load_registry(extra_plugins=PLUGINS))
    assert torch.equal(_logits(reloaded, batch), _logits(model, batch))
    return size, reloaded


# -- schedule and masks --------------------------------------------------------------------------------------


def test_cubic_schedule():
    f = lambda step: cubic_sparsity(step, 100, 0.8, 0.1, 0.3)  # noqa: E731
    assert f(0) == 0.0 and f(9) == 0.0 and f(10) == 0.0
    assert f(40) == pytest.approx(0.8 * (1 - 0.5 ** 3))  # halfway through the ramp [10, 70)
    assert f(25) == pytest.approx(0.8 * (1 - 0.75 ** 3))
    assert f(70) == f(99) == f(100) == 0.8
    values = [f(s) for s in range(101)]
    assert values == sorted(values)  # monotone
    assert cubic_sparsity(0, 0, 0.5, 0.1, 0.3) == 0.5  # no training: straight to the target


def test_top_mask_exact_count_and_ties():
    assert top_mask(torch.tensor([3.0, 1.0, 2.0, 5.0]), 2).tolist() == [True, False, False, True]
    assert top_mask(torch.ones(6), 4).tolist() == [True] * 4 + [False] * 2  # ties: lower index wins
    masks = global_masks([torch.tensor([0.1, 0.2]), torch.tensor([5.0, 6.0, 7.0])], 0.8)
    assert [m.tolist() for m in masks] == [[False, True], [False, False, True]]  # floor: 1 per layer


def test_bit_packing_roundtrip():
    mask = torch.rand(7, 13) > 0.4
    words = pack_bits(mask)
    assert words.dtype == torch.int32 and words.numel() == (91 + 31) // 32
    assert torch.equal(unpack_bits(words, 91), mask.reshape(-1))


@pytest.mark.parametrize("density,fmt", [(0.5, "bitmask"), (0.01, "indices")])
def test_sparse_linear_picks_the_smaller_format(density, fmt):
    linear = nn.Linear(64, 48)
    mask = torch.rand(48, 64) < density
    sparse = SparseLinear.from_linear(linear, mask)
    assert sparse.index_format == fmt and sparse.values.numel() == int(mask.sum())
    x = torch.randn(3, 5, 64)
    expected = torch.nn.functional.linear(x, linear.weight * mask, linear.bias)
    assert torch.equal(sparse(x), expected)
    fresh = SparseLinear(64, 48, int(mask.sum()), index_format=fmt)
    fresh.load_state_dict(sparse.state_dict(), strict=True)
    assert torch.equal(fresh(x), expected)


def test_bad_params():
    with pytest.raises(ValueError, match="initial_warmup"):
        TECH.validate(_params(initial_warmup=0.5, final_warmup=0.6))
    with pytest.raises(ValueError, match="granularity"):
        TECH.validate(_params(granularity="rows"))
    with pytest.raises(ValueError, match="sparsity"):
        TECH.validate(_params(sparsity=0.95))
    with pytest.raises(ValueError, match="no parameter"):
        TECH.validate(_params(fraction=0.5))
    assert "BERT-like" in TECH.supports(nn.Linear(2, 2))


# -- behaviour -----------------------------------------------------------------------------------------------


def test_sparsity_zero_is_identity():
    model, batch = make_tiny_classifier(), tiny_batch(ENC)
    before, n = _logits(model, batch), param_count(model)
    ctx = TechniqueContext()
    assert TECH.training_hooks(model, params=_params(sparsity=0.0), ctx=ctx) is None
    assert TECH.finalize(model, params=_params(sparsity=0.0), ctx=ctx) is None
    assert run_pipeline(model, [(TECH, _params(sparsity=0.0))], ctx=ctx).recipe == []
    assert torch.equal(_logits(model, batch), before) and param_count(model) == n
    assert not any("parametrizations" in k for k in model.state_dict())


@pytest.mark.parametrize("granularity", ["unstructured", "hybrid"])
def test_masks_reach_target_during_training(granularity):
    model = make_tiny_classifier()
    params = _params(granularity=granularity, sparsity=0.5)
    hooks = TECH.training_hooks(model, params=params, ctx=TechniqueContext())
    scores0 = [s.detach().clone() for s in hooks.parameters]
    seen = []
    hooks.on = hooks.before_step
    hooks.before_step = lambda step, total: (hooks.on(step, total), seen.append(TECH.current(model)["sparsity"]))
    fine_tune(model, ENC, steps=10, batch_size=8, learning_rate=1e-3, hooks=[hooks])
    assert seen[0] == 0.0 and seen == sorted(seen) and 0 < seen[-1] <= 0.5  # cubic ramp
    live = TECH.current(model)
    assert live["sparsity"] == 0.5
    for kind, masks in live["masks"].items():
        kept = sum(int(m.sum()) for m in masks)
        total = sum(m.numel() for m in masks)
        assert kept == total // 2, kind
    assert any(not torch.equal(a, b.detach()) for a, b in zip(scores0, hooks.parameters))  # scores learned
    if granularity == "unstructured":
        query = model.bert.encoder.layer[0].attention.self.query
        assert float((query.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)  # masked forward


def test_structured_finalize_shrinks_shapes_params_flops(tmp_path):
    model, batch = make_tiny_classifier(), tiny_batch(ENC)
    base_config = config_snapshot(model)
    n0, flops0 = param_count(model), flops_per_example(model, ENC)
    result = _run(model, _params(granularity="hybrid", sparsity=0.5))
    record = result.recipe[0]["record"]
    assert sum(head_counts(model)) == 4 and sum(ffn_sizes(model)) == 64  # of 8 heads and 128 neurons
    assert head_counts(model) == [len(k) for k in record["heads"]["kept"]]
    assert ffn_sizes(model) == record["neurons"]["widths"]
    for layer in model.bert.encoder.layer:
        assert layer.attention.self.query.weight.shape[0] == 8 * layer.attention.self.num_attention_heads
        assert layer.output.dense.weight.shape[1] == layer.intermediate.dense.out_features
        assert not layer.attention.self._forward_hooks and not layer.intermediate._forward_hooks
    assert param_count(model) < n0 and flops_per_example(model, ENC) < 0.75 * flops0
    _roundtrip(model, result.recipe, base_config, tmp_path, batch)


def test_unstructured_finalize_saves_bytes_and_keeps_outputs(tmp_path):
    model, batch = make_tiny_classifier(), tiny_batch(ENC)
    base_config = config_snapshot(model)
    dense_size = save_compressed(model, tmp_path / "dense", base_config=base_config, recipe=[])
    params = _params(granularity="unstructured", sparsity=0.7)
    hooks = TECH.training_hooks(model, params=params, ctx=TechniqueContext())
    fine_tune(model, ENC, steps=5, batch_size=8, learning_rate=1e-3, hooks=[hooks])
    masked = _logits(model, batch)
    record = TECH.finalize(model, params=params, ctx=TechniqueContext())
    assert torch.equal(_logits(model, batch), masked)  # SparseLinear computes exactly the masked weights
    sparse = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert len(sparse) == 2 * 6 == len(record["sparse"])
    assert all(type(m) is not nn.Linear or "encoder" not in n for n, m in model.named_modules())
    assert not any("parametrizations" in k for k in model.state_dict())
    q = model.bert.encoder.layer[0].attention.self.query
    assert q.values.numel() == round(0.3 * 32 * 32) and q.index_format == "bitmask"
    recipe = [{"technique": TECH.name, "phase": "finalize", "params": params, "record": record}]
    size, _ = _roundtrip(model, recipe, base_config, tmp_path / "sparse", batch)
    assert size < 0.75 * dense_size


def test_no_training_steps_prunes_by_initial_scores(tmp_path):
    model, batch = make_tiny_classifier(), tiny_batch(ENC)
    base_config = config_snapshot(model)
    result = _run(model, _params(granularity="heads", sparsity=0.5), steps=0)
    assert sum(head_counts(model)) == 4
    _roundtrip(model, result.recipe, base_config, tmp_path, batch)


def test_shared_layers():
    model, batch = make_tiny_classifier(), tiny_batch(ENC)
    model.bert.encoder.layer[1] = model.bert.encoder.layer[0]
    for granularity in ("hybrid", "unstructured"):
        m = copy.deepcopy(model)
        params = _params(granularity=granularity, sparsity=0.5)
        hooks = TECH.training_hooks(m, params=params, ctx=TechniqueContext())
        assert len(hooks.parameters) == (2 if granularity == "hybrid" else 6)  # one score tensor per object
        fine_tune(m, ENC, steps=4, batch_size=8, learning_rate=1e-3, hooks=[hooks])
        record = TECH.finalize(m, params=params, ctx=TechniqueContext())
        layers = m.bert.encoder.layer
        assert layers[0] is layers[1]
        if granularity == "hybrid":
            assert record["heads"]["kept"][0] == record["heads"]["kept"][1]
            assert head_counts(m)[0] == 2 and ffn_sizes(m)[0] == 32  # global over distinct objects
        else:
            assert isinstance(layers[1].output.dense, SparseLinear)
        fresh = make_tiny_classifier(seed=3)
        fresh.bert.encoder.layer[1] = fresh.bert.encoder.layer[0]
        TECH.restore(fresh, phase="finalize", params=params, record=record)
        fresh.load_state_dict(m.state_dict(), strict=True)
        assert torch.equal(_logits(fresh, batch), _logits(m, batch))


def test_padded_batches():
    model = make_tiny_classifier()
    _run(model, _params(granularity="hybrid", sparsity=0.5), steps=3)
    batch = tiny_batch(ENC)
    lengths = batch["attention_mask"].sum(1)
    assert lengths.min() < lengths.max()  # the batch really mixes lengths
    full = _logits(model, batch)
    for i in range(len(lengths)):
        n = int(lengths[i])
        alone = {k: v[i:i + 1, :n] for k, v in batch.items()}
        torch.testing.assert_close(full[i:i + 1], _logits(model, alone), atol=1e-5, rtol=0)


def test_composes_with_head_pruning_low_rank_and_quantization(tmp_path):
    reg = load_registry(extra_plugins=PLUGINS)
    assert "low_rank" in reg.names(), reg.load_errors  # a built-in: its absence is a failure, not a skip
    batch = tiny_batch(ENC)
    for granularity in ("hybrid", "unstructured"):
        model = make_tiny_classifier()
        base_config = config_snapshot(model)
        prune_heads_first = (reg.get("head_pruning"), {**reg.get("head_pruning").defaults(), "fraction": 0.25,
                                                         "importance_batches": 1})
        low_rank = reg.get("low_rank")
        steps = [prune_heads_first, (low_rank, {**low_rank.defaults(), **low_rank.example_params()}),
                 (TECH, _params(granularity=granularity, sparsity=0.5)),
                 (reg.get("quantization"), reg.get("quantization").defaults())]
        ctx = testing.tiny_context(model, ENC)
        result = run_pipeline(model, steps, ctx=ctx, train=_train(3))
        assert torch.isfinite(_logits(model, batch)).all()
        if granularity == "unstructured":
            assert any(isinstance(m, SparseLinear) for m in model.modules())
        save_compressed(model, tmp_path / granularity, base_config=base_config, recipe=result.recipe)
        reloaded = load_compressed(tmp_path / granularity, registry=reg)
        assert torch.equal(_logits(reloaded, batch), _logits(model, batch))


def test_after_head_pruning_by_hand():
    model = make_tiny_classifier()
    prune_heads(model, [[0, 2], [1, 2, 3]])
    _run(model, _params(granularity="heads", sparsity=0.4), steps=3)
    assert sum(head_counts(model)) == 3 and min(head_counts(model)) >= 1


def test_registration():
    import plugins.movement_pruning as mod

    seen = []
    mod.register_techniques(seen.append)
    assert [t.name for t in seen] == ["movement_pruning"]
