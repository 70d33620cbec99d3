from __future__ import annotations

import pytest
import torch
from transformers import BertTokenizer

import plugins.token_elimination as te
from autocompress.data import Split, encode
from autocompress.measure import flops_per_example
from autocompress.modeling import config_snapshot, load_compressed, save_compressed
from autocompress.pipeline import run_pipeline
from autocompress.registry import load_registry
from autocompress.surgery import prune_heads
from autocompress.technique import TechniqueContext, TrainingHooks
from autocompress.tiny import make_tiny_classifier, tiny_sentences, tiny_vocab
from autocompress.train import fine_tune
from plugins.token_elimination import (TokenElimination, TokenEliminationEncoder, monotone, retained,
                                       retention_schedule)

LAYERS = 4
TECH = TokenElimination()


def _model(**kw):
    return make_tiny_classifier(**{"layers": LAYERS, **kw})


def _params(**overrides):
    return {**TECH.defaults(), **overrides}


def _apply(model, **overrides):
    return TECH.apply(model, params=_params(**overrides), ctx=TechniqueContext())


def _inputs(lengths=(12, 7, 10, 3), seed=1):
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(5, len(tiny_vocab()), (len(lengths), width), generator=gen)
    ids[:, 0] = 2  # [CLS]
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _logits(model, inputs):
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


def _ffn_widths(model, inputs) -> list[int]:
    """Sequence length entering each layer position's FFN."""
    seen: list[int] = []
    handles = [layer.intermediate.register_forward_hook(lambda m, a, o: seen.append(int(a[0].shape[1])))
               for layer in dict.fromkeys(model.bert.encoder.layer)]  # a shared layer is hooked once
    try:
        _logits(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return seen


def _assert_rows_match_alone(model, inputs, atol=1e-5):
    batch = _logits(model, inputs)
    for i, n in enumerate(inputs["attention_mask"].sum(-1).tolist()):
        alone = _logits(model, {k: v[i:i + 1, :n] for k, v in inputs.items()})
        torch.testing.assert_close(batch[i:i + 1], alone, atol=atol, rtol=0)


def _encoded(n=32):
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(tiny_vocab())}, do_lower_case=True)
    rows = tiny_sentences(n, seed=3)
    return encode(Split([(t,) for t, _ in rows], [y for _, y in rows]), tok, max_length=32, cache_dir=None)


# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_keep_one_is_exact_identity(attn):
    model = _model()
    model.config._attn_implementation = attn
    inputs = _inputs()
    before = _logits(model, inputs)
    keys = list(model.state_dict())
    record = _apply(model, **TECH.identity_params())
    assert record == {"fractions": [1.0] * LAYERS}
    assert isinstance(model.bert.encoder, TokenEliminationEncoder)
    assert list(model.state_dict()) == keys  # same ModuleList: state-dict keys unchanged
    assert torch.equal(_logits(model, inputs), before)
    assert _ffn_widths(model, inputs) == [12] * LAYERS


def test_extra_padding_changes_nothing():
    model = _model()
    _apply(model, keep_final=0.5)
    inputs = _inputs(lengths=(9, 5))
    before = _logits(model, inputs)
    padded = {k: torch.nn.functional.pad(v, (0, 3)) for k, v in inputs.items()}  # 3 more padding columns
    torch.testing.assert_close(_logits(model, padded), before, atol=1e-5, rtol=0)


def test_sequence_length_and_flops_fall():
    model = _model()
    enc = _encoded()
    flops_before = flops_per_example(model, enc)
    inputs = _inputs()
    record = _apply(model, **TECH.example_params())
    widths = _ffn_widths(model, inputs)
    assert record["fractions"] == [0.875, 0.75, 0.625, 0.5]
    # Widest row has 12 real tokens: ceil(12 * f) tokens reach each FFN.
    assert widths == [11, 9, 8, 6]
    assert flops_per_example(model, enc) < 0.9 * flops_before


def test_cls_kept_in_order_and_padding_never_kept(monkeypatch):
    model = _model()
    _apply(model, keep_final=0.1, power=0.5)
    chosen = []
    original = te.select

    def recording(rank, keep, **kwargs):
        index, valid = original(rank, keep, **kwargs)
        chosen.append((rank, keep, index, valid))
        return index, valid

    monkeypatch.setattr(te, "select", recording)
    inputs = _inputs()
    _logits(model, inputs)
    assert len(chosen) == LAYERS
    lengths = inputs["attention_mask"].sum(-1)
    for rank, keep, index, valid in chosen:
        assert (index[:, 0] == 0).all()  # [CLS] kept, at position 0
        for row in range(index.shape[0]):
            kept = index[row, : int(keep[row])]
            assert torch.equal(kept, kept.sort().values)  # original order
            assert valid[row].sum() == keep[row]
    first_rank, first_keep, first_index, _ = chosen[0]
    for row, n in enumerate(lengths.tolist()):
        assert (first_index[row, : int(first_keep[row])] < n).all()  # only real tokens


def test_significance_forces_cls_and_excludes_padding():
    probs = torch.zeros(1, 2, 4, 4)
    probs[..., 2] = 1.0  # every query attends to token 2 only
    valid = torch.tensor([[True, True, True, False]])
    sig = te.significance(probs, valid)
    assert sig[0, 0] == float("inf") and sig[0, 3] == float("-inf")
    assert sig[0, 2] == 2 * 3  # 2 heads x 3 valid queries (the padded query does not count)
    index, new_valid = te.select(te.ranks(sig), torch.tensor([2]))
    assert index.tolist() == [[0, 2]] and new_valid.all()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_padded_batch_matches_each_example_alone(attn):
    model = _model()
    model.config._attn_implementation = attn
    _apply(model, keep_final=0.3, start_layer=0.25)
    _assert_rows_match_alone(model, _inputs())


def test_retention_counts_are_per_example():
    lengths = torch.tensor([10, 7, 3, 1])
    assert retained(0.3, lengths).tolist() == [3, 3, 1, 1]  # ceil, exact at 0.3 * 10, at least [CLS]
    assert retained(1.0, lengths).tolist() == [10, 7, 3, 1]


@pytest.mark.parametrize("keep_final", [0.1, 0.37, 0.9, 1.0])
@pytest.mark.parametrize("start_layer", [0.0, 0.3, 0.9])
@pytest.mark.parametrize("power", [0.25, 1.0, 4.0])
def test_schedule_is_monotone(keep_final, start_layer, power):
    for n in (1, 2, 6, 12):
        f = retention_schedule(n, keep_final, start_layer, power)
        assert len(f) == n and all(a >= b for a, b in zip(f, f[1:]))
        assert f[-1] == pytest.approx(keep_final)
        first = min(n - 1, int(start_layer * n))
        assert f[:first] == [1.0] * first
    assert monotone([1.0, 0.6, 0.8, 0.5]) == [1.0, 0.6, 0.6, 0.5]


def test_kept_width_never_grows():
    model = _model(layers=6)
    TECH.apply(model, params=_params(keep_final=0.2, power=2.0), ctx=TechniqueContext())
    widths = _ffn_widths(model, _inputs(lengths=(12, 12)))
    assert all(a >= b for a, b in zip(widths, widths[1:])) and widths[-1] == 3


def test_save_load_round_trip_is_exact(tmp_path):
    model = _model()
    base_config = config_snapshot(model)
    params = _params(keep_final=0.4, start_layer=0.25)
    result = run_pipeline(model, [(TECH, params)], ctx=TechniqueContext())
    assert result.recipe[0]["record"]["fractions"] == retention_schedule(LAYERS, 0.4, 0.25)
    inputs = _inputs()
    expected = _logits(model, inputs)
    save_compressed(model, tmp_path / "m", base_config=base_config, recipe=result.recipe)
    reloaded = load_compressed(tmp_path / "m", registry=load_registry(extra_plugins=["plugins.token_elimination"]))
    assert isinstance(reloaded.bert.encoder, TokenEliminationEncoder)
    assert reloaded.bert.encoder.fractions == model.bert.encoder.fractions
    assert torch.equal(_logits(reloaded, inputs), expected)


def test_restore_then_strict_load():
    model = _model()
    params = _params(keep_final=0.5)
    record = _apply(model, keep_final=0.5)
    fresh = _model(seed=5)
    TECH.restore(fresh, phase="apply", params=params, record=record)
    fresh.load_state_dict(model.state_dict(), strict=True)
    inputs = _inputs()
    assert torch.equal(_logits(fresh, inputs), _logits(model, inputs))
    TECH.restore(fresh, phase="finalize", params=params, record=None)  # nothing recorded: no-op


@pytest.mark.parametrize("share_before", [True, False])
def test_shared_layer(share_before):
    model = _model()
    if share_before:
        model.bert.encoder.layer[1] = model.bert.encoder.layer[0]
    _apply(model, keep_final=0.5)
    if not share_before:  # weight sharing runs after token elimination in the pipeline
        model.bert.encoder.layer[1] = model.bert.encoder.layer[0]
    inputs = _inputs()
    widths = _ffn_widths(model, inputs)
    assert widths == [11, 9, 8, 6]  # the shared layer runs at two positions with two widths
    _assert_rows_match_alone(model, inputs)


def test_fewer_heads_and_self_attention_hooks_fire():
    model = _model()
    prune_heads(model, [[0, 2], [1], [0, 1, 2, 3], [3]])
    _apply(model, keep_final=0.3)
    inputs = _inputs()
    _assert_rows_match_alone(model, inputs)
    before = _logits(model, inputs)
    calls = []

    def silence_head0(module, args, output):  # what a movement-pruning or gating hook does
        calls.append(output[0].shape)
        ctx = output[0].clone()
        ctx[..., : module.attention_head_size] = 0
        return (ctx,) + tuple(output[1:])

    handles = [layer.attention.self.register_forward_hook(silence_head0) for layer in model.bert.encoder.layer]
    after = _logits(model, inputs)
    for h in handles:
        h.remove()
    assert len(calls) == LAYERS
    assert not torch.allclose(before, after)


def test_fine_tune_through_elimination_with_hidden_states_and_attentions():
    model = _model()
    _apply(model, keep_final=0.4)
    enc = _encoded(24)
    seen = {}

    def loss(batch, outputs, model):
        # What distillation asks for: hidden states and attentions; lengths shrink layer by layer.
        seen["hidden"] = [h.shape[1] for h in outputs.hidden_states]
        seen["attn"] = [a.shape[-1] for a in outputs.attentions]
        return outputs.hidden_states[-1][:, 0].pow(2).mean() * 1e-3

    hooks = TrainingHooks(loss=loss, output_hidden_states=True, output_attentions=True)
    layer0 = model.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    last_ffn = model.bert.encoder.layer[-1].output.dense.weight.detach().clone()
    stats = fine_tune(model, enc, steps=3, batch_size=8, learning_rate=1e-3, hooks=[hooks])
    assert stats["steps"] == 3 and stats["final_loss"] == stats["final_loss"]
    assert not torch.equal(layer0, model.bert.encoder.layer[0].attention.self.query.weight)
    assert not torch.equal(last_ffn, model.bert.encoder.layer[-1].output.dense.weight)
    assert len(seen["hidden"]) == LAYERS + 1 and len(seen["attn"]) == LAYERS
    assert all(a >= b for a, b in zip(seen["hidden"], seen["hidden"][1:]))
    assert seen["hidden"][-1] < seen["hidden"][0]
    assert model.config._attn_implementation == "sdpa"  # the kernel switch is undone


def test_gradients_reach_every_layer():
    model = _model()
    _apply(model, keep_final=0.2)
    model.train()
    inputs = _inputs()
    model(**inputs, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
    for layer in model.bert.encoder.layer:
        for lin in (layer.attention.self.query, layer.intermediate.dense):
            assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


def test_learned_retention_round_trip(tmp_path):
    model = _model()
    base_config = config_snapshot(model)
    enc = _encoded(24)
    params = _params(learn=True, mass_lambda=1.0, retention_lr=0.1)

    def train(m, hooks):
        assert m.bert.encoder.soft is not None
        return fine_tune(m, enc, steps=6, batch_size=8, learning_rate=1e-3, hooks=hooks)

    result = run_pipeline(model, [(TECH, params)], ctx=TechniqueContext(), train=train)
    encoder = model.bert.encoder
    assert encoder.soft is None  # switched to hard extraction after training
    phases = [(s["phase"], s["record"]["fractions"]) for s in result.recipe]
    assert phases[0] == ("apply", [1.0] * LAYERS)
    learned = phases[1][1]
    assert phases[1][0] == "finalize" and learned == encoder.fractions
    assert all(a >= b for a, b in zip(learned, learned[1:])) and learned[-1] < 0.9  # mass pushed down
    inputs = _inputs()
    assert _ffn_widths(model, inputs)[-1] < 12
    expected = _logits(model, inputs)
    save_compressed(model, tmp_path / "m", base_config=base_config, recipe=result.recipe)
    reloaded = load_compressed(tmp_path / "m", registry=load_registry(extra_plugins=["plugins.token_elimination"]))
    assert reloaded.bert.encoder.fractions == learned
    assert torch.equal(_logits(reloaded, inputs), expected)


def test_soft_multiplier_integrates_to_mean():
    r = torch.rand(te.SOFT_BINS)
    n = 4096
    rank = torch.arange(1, n + 1)[None]  # skip rank 0 ([CLS] is never scaled)
    mult = te.soft_multiplier(r, rank - 1, torch.tensor([n]))
    assert mult[0, 0] == 1
    assert float(mult[0, 1:].mean()) == pytest.approx(float(r.mean()), abs=1e-3)


@pytest.mark.parametrize("bad", [{"keep_final": 0.05}, {"keep_final": 1.5}, {"start_layer": 1.0},
                                 {"power": 0.0}, {"learn": "yes"}, {"nonsense": 1}])
def test_bad_params(bad):
    with pytest.raises(ValueError, match="token_elimination"):
        TECH.validate(_params(**bad))


def test_declaration_supports_and_registration():
    assert TECH.reduces == {"flops", "latency", "tokens"}  # no weights removed: not size/params
    TECH.validate(_params(**TECH.example_params()))
    assert TECH.supports(_model()) is None
    assert "BERT-like" in TECH.supports(torch.nn.Linear(2, 2))
    seen = []
    te.register_techniques(seen.append)
    assert [t.name for t in seen] == ["token_elimination"]
    assert "token_elimination" in load_registry(extra_plugins=["plugins.token_elimination"]).techniques


def test_depth_change_after_apply_is_reported():
    model = _model()
    _apply(model, keep_final=0.5)
    del model.bert.encoder.layer[-1]
    with pytest.raises(RuntimeError, match="depth"):
        _logits(model, _inputs())


def test_ranks_are_a_stable_descending_sort_with_ties_and_infinities():
    import plugins.token_elimination as te

    g = torch.Generator().manual_seed(0)
    sig = torch.randint(0, 5, (6, 23), generator=g).float()  # many ties
    sig[:, 0] = float("inf")
    sig[:, -4:] = float("-inf")  # padding
    order = torch.argsort(sig, dim=-1, descending=True, stable=True)
    want = torch.empty_like(order).scatter_(1, order, torch.arange(23).expand_as(order))
    assert torch.equal(te.ranks(sig), want)
    assert torch.equal(te.ranks_by_counting(sig), want)  # what the ONNX graph computes
