from __future__ import annotations

import copy

import pytest
import torch

from autocompress.technique import TechniqueContext
from autocompress.tiny import make_tiny_classifier, tiny_vocab
from plugins.head_pruning import HeadPruning, choose_heads, head_counts, head_importance, prune_heads

HIDDEN, HEADS, LAYERS = 32, 4, 2
HEAD_SIZE = HIDDEN // HEADS


def _batches(n: int, *, batch_size: int = 4, seq: int = 10):
    gen = torch.Generator().manual_seed(123)
    for _ in range(n):
        ids = torch.randint(5, len(tiny_vocab()), (batch_size, seq), generator=gen)
        ids[:, 0] = 2
        mask = torch.ones_like(ids)
        mask[0, seq // 2:] = 0
        ids[0, seq // 2:] = 0
        yield {"input_ids": ids, "attention_mask": mask,
               "labels": torch.randint(0, 2, (batch_size,), generator=gen)}


def _ctx(calls: list[str] | None = None) -> TechniqueContext:
    memo: dict[str, dict[str, torch.Tensor]] = {}

    def cache(key, compute):
        if key not in memo:
            if calls is not None:
                calls.append(key)
            memo[key] = compute()
        return memo[key]

    return TechniqueContext(train_batches=_batches, cache=cache)


def _params(**overrides):
    params = HeadPruning().defaults()
    params.update(importance_batches=2, **overrides)
    return params


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_fraction_zero_is_identity(tiny_model, tiny_inputs):
    before = _logits(tiny_model, tiny_inputs)
    n = _n_params(tiny_model)
    record = HeadPruning().apply(tiny_model, params=_params(fraction=0.0), ctx=TechniqueContext())
    assert record["kept_heads"] == [list(range(HEADS))] * LAYERS
    assert record["heads_before"] == [HEADS] * LAYERS
    assert torch.equal(_logits(tiny_model, tiny_inputs), before)
    assert _n_params(tiny_model) == n


def test_prunes_heads_physically(tiny_model, tiny_inputs):
    n_before = _n_params(tiny_model)
    record = HeadPruning().apply(tiny_model, params=_params(fraction=0.5), ctx=_ctx())
    kept = record["kept_heads"]
    assert sum(map(len, kept)) == LAYERS * HEADS // 2
    assert all(k == sorted(k) for k in kept)
    for layer, k in zip(tiny_model.bert.encoder.layer, kept):
        attn = layer.attention.self
        assert attn.num_attention_heads == len(k)
        assert attn.all_head_size == len(k) * HEAD_SIZE
        for lin in (attn.query, attn.key, attn.value):
            assert lin.weight.shape == (len(k) * HEAD_SIZE, HIDDEN)
            assert lin.bias.shape == (len(k) * HEAD_SIZE,)
        assert layer.attention.output.dense.weight.shape == (HIDDEN, len(k) * HEAD_SIZE)
    # Per removed head: Q, K, V rows (weight + bias) and the output projection's columns.
    removed = LAYERS * HEADS - sum(map(len, kept))
    assert n_before - _n_params(tiny_model) == removed * (4 * HIDDEN * HEAD_SIZE + 3 * HEAD_SIZE)
    assert head_counts(tiny_model) == [len(k) for k in kept]
    out = _logits(tiny_model, tiny_inputs)
    assert out.shape == (4, 2) and torch.isfinite(out).all()


def test_min_heads_per_layer_honoured(tiny_model):
    record = HeadPruning().apply(tiny_model, params=_params(fraction=0.9, min_heads_per_layer=3), ctx=_ctx())
    assert [len(k) for k in record["kept_heads"]] == [3, 3]


def test_never_leaves_a_layer_empty():
    scores = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    keep = choose_heads(scores, [2, 2], n_prune=3, min_heads=1)
    assert keep == [[1], [1]]  # 3 asked: layer 0 capped at 1 head, then layer 1 head 0 (ties by index)
    with pytest.raises(ValueError):
        prune_heads(make_tiny_classifier(), [[], [0, 1, 2, 3]])


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_pruned_equals_zeroed_heads(attn, tiny_inputs):
    model = make_tiny_classifier()
    model.config._attn_implementation = attn
    keep = [[0, 2], [1, 2, 3]]
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for layer, k in zip(reference.bert.encoder.layer, keep):
            value = layer.attention.self.value
            for h in set(range(HEADS)) - set(k):
                # A head whose values are zero contributes nothing to the attention output.
                value.weight[h * HEAD_SIZE:(h + 1) * HEAD_SIZE] = 0
                value.bias[h * HEAD_SIZE:(h + 1) * HEAD_SIZE] = 0
    prune_heads(model, keep)
    torch.testing.assert_close(_logits(model, tiny_inputs), _logits(reference, tiny_inputs), atol=1e-5, rtol=0)


def test_eager_and_sdpa_agree_after_pruning(tiny_inputs):
    outs = []
    for attn in ("eager", "sdpa"):
        model = make_tiny_classifier()
        model.config._attn_implementation = attn
        prune_heads(model, [[3], [0, 1]])
        outs.append(_logits(model, tiny_inputs))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)


def test_importance_is_cached_and_leaves_model_clean(tiny_model):
    calls: list[str] = []
    ctx = _ctx(calls)
    tiny_model.train()
    grad_flags = [p.requires_grad for p in tiny_model.parameters()]
    technique = HeadPruning()
    first = technique.importance(tiny_model, 2, ctx)
    assert first.shape == (LAYERS, HEADS)
    torch.testing.assert_close(first.norm(dim=-1), torch.ones(LAYERS))  # L2-normalised per layer
    assert tiny_model.training and all(m.training for m in tiny_model.modules())
    assert [p.requires_grad for p in tiny_model.parameters()] == grad_flags
    assert all(p.grad is None for p in tiny_model.parameters())

    a, b = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    rec_a = technique.apply(a, params=_params(fraction=0.25), ctx=ctx)
    rec_b = technique.apply(b, params=_params(fraction=0.5), ctx=ctx)
    assert len(calls) == 1  # one scoring for this baseline and batch count, reused across trials
    assert rec_a["kept_heads"] != rec_b["kept_heads"]
    technique.importance(tiny_model, 3, ctx)
    assert len(calls) == 2  # a different batch count is a different key


def test_importance_is_deterministic_in_eval_mode(tiny_model):
    with torch.no_grad():  # the engine may call apply() under no_grad; scoring must still get gradients
        s1 = head_importance(tiny_model, _batches(2))
    tiny_model.train()  # dropout must not leak into the scores
    s2 = head_importance(tiny_model, _batches(2))
    assert torch.equal(s1, s2)


def test_padded_inputs_after_pruning(tiny_model, tiny_inputs):
    prune_heads(tiny_model, [[1, 3], [2]])
    full = _logits(tiny_model, tiny_inputs)
    # The padded row must give the same result as the unpadded prefix alone.
    row = {k: v[2:3, :8] for k, v in tiny_inputs.items()}
    torch.testing.assert_close(full[2:3], _logits(tiny_model, row), atol=1e-5, rtol=0)


def test_restore_then_load_state_dict(tiny_model, tiny_inputs):
    technique = HeadPruning()
    params = _params(fraction=0.4)
    record = technique.apply(tiny_model, params=params, ctx=_ctx())
    fresh = make_tiny_classifier(seed=7)
    technique.restore(fresh, phase="apply", params=params, record=record)
    fresh.load_state_dict(tiny_model.state_dict(), strict=True)
    assert torch.equal(_logits(fresh, tiny_inputs), _logits(tiny_model, tiny_inputs))
    technique.restore(fresh, phase="finalize", params=params, record=record)  # no-op for other phases
    with pytest.raises(ValueError):  # the record no longer matches the (already pruned) model
        technique.restore(fresh, phase="apply", params=params, record=record)


def test_supports_and_registration(tiny_model):
    technique = HeadPruning()
    assert technique.supports(tiny_model) is None
    assert "BERT-like" in technique.supports(torch.nn.Linear(2, 2))
    import plugins.head_pruning as mod

    seen = []
    mod.register_techniques(seen.append)
    assert [t.name for t in seen] == ["head_pruning"]
