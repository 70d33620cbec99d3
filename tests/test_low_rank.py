from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from autocompress.measure import flops_per_example
from autocompress.modeling import config_snapshot, load_compressed, param_count, save_compressed
from autocompress.pipeline import run_pipeline
from autocompress.registry import load_registry
from autocompress.surgery import prune_ffn_neurons, prune_heads
from autocompress.technique import TechniqueContext
from autocompress.testing import tiny_batch, tiny_encoded
from autocompress.tiny import make_tiny_classifier
from autocompress.train import fine_tune
from plugins.low_rank import (
    FactorizedEmbedding,
    LowRankFactorization,
    LowRankLinear,
    choose_rank,
    worth_factorising,
)

HIDDEN, FFN, LAYERS = 32, 64, 2
TECH = LowRankFactorization()
ATTN = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")
FFN_PATHS = ("intermediate.dense", "output.dense")


def _params(**overrides):
    return {**TECH.defaults(), **overrides}


def _logits(model, inputs):
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


def _unit_variance(model: nn.Module, seed: int = 0) -> nn.Module:
    """BERT's 0.02-std init makes every logit ~0.01, so almost any error passes; variance-preserving weights
    make each Linear matter, as in a trained model."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.Linear):
                mod.weight.normal_(0, mod.in_features ** -0.5)
            elif isinstance(mod, nn.Embedding):
                mod.weight.normal_(0, 1.0)
    return model


def _big_vocab_model(seed: int = 0) -> nn.Module:
    """Tiny encoder with a 500-word vocabulary, where a factorised embedding pays off (33 words never do)."""
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64, num_labels=2)
    return BertForSequenceClassification(config).eval()


def _ctx() -> TechniqueContext:
    return TechniqueContext(log=lambda m: None)


def test_identity_is_exact(tiny_model, tiny_inputs):
    before = _logits(tiny_model, tiny_inputs)
    modules = [m for m in tiny_model.modules()]
    assert TECH.apply(tiny_model, params=_params(**TECH.identity_params()), ctx=_ctx()) is None  # no recipe step
    assert [m for m in tiny_model.modules()] == modules  # not even replaced by equal copies
    assert torch.equal(_logits(tiny_model, tiny_inputs), before)


def test_full_rank_factors_reproduce_the_model(tiny_inputs):
    model = _unit_variance(make_tiny_classifier())
    before = _logits(model, tiny_inputs)
    for layer in model.bert.encoder.layer:
        for path in ATTN + FFN_PATHS:
            linear = layer.get_submodule(path)
            full = min(linear.in_features, linear.out_features)
            factorised = LowRankLinear.from_linear(linear, full)
            torch.testing.assert_close(factorised.dense_weight(), linear.weight, atol=1e-5, rtol=0)
            parent, _, child = path.rpartition(".")
            setattr(layer.get_submodule(parent), child, factorised)
    torch.testing.assert_close(_logits(model, tiny_inputs), before, atol=1e-4, rtol=0)


def test_truncation_is_the_best_rank_r_approximation():
    torch.manual_seed(0)
    linear = nn.Linear(24, 40)
    s = torch.linalg.svdvals(linear.weight.detach().double())
    low = LowRankLinear.from_linear(linear, 5)
    assert (low.first.weight.shape, low.second.weight.shape) == ((5, 24), (40, 5))
    assert low.first.bias is None and torch.equal(low.second.bias, linear.bias)
    err = (low.dense_weight() - linear.weight).double().norm()
    # Eckart-Young: the Frobenius error of the best rank-5 approximation is the norm of the dropped tail.
    torch.testing.assert_close(err, s[5:].norm(), atol=1e-5, rtol=1e-5)
    x = torch.randn(3, 7, 24)
    torch.testing.assert_close(low(x), x @ low.dense_weight().T + linear.bias, atol=1e-5, rtol=0)


def test_low_rank_physically_reduces_params_flops_and_size(tmp_path, tiny_model):
    enc = tiny_encoded()
    flops_before = flops_per_example(tiny_model, enc)
    base = copy.deepcopy(tiny_model)
    n_before = param_count(tiny_model)
    params = _params(**TECH.example_params())
    record = TECH.apply(tiny_model, params=params, ctx=_ctx())
    r = 8  # 0.25 of rank 32, already a multiple of 8
    assert len(record["factorized"]) == LAYERS * 6 and set(record["factorized"].values()) == {r}
    saved = 0
    for layer in tiny_model.bert.encoder.layer:
        for path in ATTN + FFN_PATHS:
            mod = layer.get_submodule(path)
            assert isinstance(mod, LowRankLinear) and mod.rank == r
            assert type(mod.first) is nn.Linear and type(mod.second) is nn.Linear
            saved += mod.in_features * mod.out_features - r * (mod.in_features + mod.out_features)
    assert n_before - param_count(tiny_model) == saved
    assert flops_per_example(tiny_model, enc) < flops_before
    size_base = save_compressed(base, tmp_path / "base", base_config=config_snapshot(base), recipe=[])
    size_low = save_compressed(tiny_model, tmp_path / "low", base_config=config_snapshot(base),
                               recipe=[{"technique": "low_rank", "phase": "apply", "params": params,
                                        "record": record}])
    assert size_low < size_base - 4 * saved * 0.9


def test_shared_layers_are_factorised_once(tiny_inputs):
    model = make_tiny_classifier()
    layers = model.bert.encoder.layer
    layers[1] = layers[0]  # as cross-layer weight sharing leaves it
    record = TECH.apply(model, params=_params(**TECH.example_params()), ctx=_ctx())
    assert len(record["factorized"]) == 6 and all(".layer.0." in n for n in record["factorized"])
    assert layers[1] is layers[0] and isinstance(layers[1].attention.self.query, LowRankLinear)
    assert torch.isfinite(_logits(model, tiny_inputs)).all()


def test_choose_rank_modes():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])  # energies 16, 4, 1, 1 of 22
    assert choose_rank(s, mode="energy", value=0.7) == 1
    assert choose_rank(s, mode="energy", value=0.8) == 2
    assert choose_rank(s, mode="energy", value=21 / 22) == 3
    assert choose_rank(s, mode="rank", value=0.5) == 2
    assert choose_rank(s, mode="rank", value=0.05) == 1
    assert choose_rank(torch.ones(32), mode="rank", value=0.1, multiple=8) == 8
    assert choose_rank(torch.ones(30), mode="rank", value=0.9, multiple=8) == 30  # capped at full rank
    with pytest.raises(ValueError, match="unknown rank mode"):
        choose_rank(s, mode="bogus", value=0.5)


def test_energy_mode_gives_each_matrix_its_own_rank(tiny_model):
    with torch.no_grad():  # make one query matrix exactly rank 2
        q = tiny_model.bert.encoder.layer[0].attention.self.query
        q.weight.copy_(torch.randn(HIDDEN, 2) @ torch.randn(2, HIDDEN))
    record = TECH.apply(tiny_model, params=_params(mode="energy", attention=0.999, ffn=1.0, rank_multiple=1),
                        ctx=_ctx())
    assert record["factorized"]["bert.encoder.layer.0.attention.self.query"] == 2
    assert all(".attention." in n for n in record["factorized"])  # ffn=1.0 leaves the FFN alone


def test_skip_rule_leaves_layers_that_would_not_shrink(tiny_model):
    # rank ceil(0.6 * 32) = 20: 20 * (32 + 32) >= 32 * 32 for attention; 20 * (32 + 64) < 32 * 64 for the FFN.
    assert not worth_factorising(32, 32, 20) and worth_factorising(32, 64, 20)
    assert not worth_factorising(32, 32, 16)  # exactly break-even is not worth it
    record = TECH.apply(tiny_model, params=_params(mode="rank", attention=0.6, ffn=0.6, rank_multiple=1), ctx=_ctx())
    layer = tiny_model.bert.encoder.layer[0]
    assert all(type(layer.get_submodule(p)) is nn.Linear for p in ATTN)
    assert all(isinstance(layer.get_submodule(p), LowRankLinear) for p in FFN_PATHS)
    assert len(record["skipped"]) == LAYERS * 4 and "break-even" in next(iter(record["skipped"].values()))
    assert set(record["factorized"].values()) == {20}
    # Nothing worth factorising at all (full rank): no recipe step.
    full = _params(mode="rank", attention=0.99, ffn=0.99, rank_multiple=1)
    assert TECH.apply(make_tiny_classifier(), params=full, ctx=_ctx()) is None


def test_factorized_embedding_svd_init():
    torch.manual_seed(0)
    emb = nn.Embedding(50, 16, padding_idx=0)
    full = FactorizedEmbedding.from_embedding(emb, 16)
    torch.testing.assert_close(full.dense_weight(), emb.weight.detach(), atol=1e-5, rtol=0)
    ids = torch.randint(0, 50, (3, 9))
    torch.testing.assert_close(full(ids), emb(ids).detach(), atol=1e-5, rtol=0)
    assert (full.num_embeddings, full.embedding_dim, full.padding_idx) == (50, 16, 0)
    assert not hasattr(full, "weight")  # no stale dense matrix for anything to tie to
    low = FactorizedEmbedding.from_embedding(emb, 4)
    assert low.embedding.weight.shape == (50, 4) and low.projection.weight.shape == (16, 4)
    s = torch.linalg.svdvals(emb.weight.detach().double())
    err = (low.dense_weight() - emb.weight).double().norm()
    torch.testing.assert_close(err, s[4:].norm(), atol=1e-5, rtol=1e-5)


def test_embedding_factorisation_skipped_when_it_saves_nothing(tiny_model):
    logs: list[str] = []
    assert TECH.apply(tiny_model, params=_params(embedding_dim=32), ctx=TechniqueContext(log=logs.append)) is None
    assert any("word_embeddings" in m and "saves nothing" in m for m in logs)
    assert type(tiny_model.bert.embeddings.word_embeddings) is nn.Embedding


def _compress(model, params, enc, steps=3):
    def train(m, hooks):
        return fine_tune(m, enc, steps=steps, batch_size=8, learning_rate=1e-3, seed=0, hooks=hooks)

    return run_pipeline(model, [(TECH, params)], ctx=_ctx(), train=train).recipe


def test_save_reload_round_trip_with_factorised_embedding(tmp_path):
    enc = tiny_encoded()
    batch = tiny_batch(enc)
    model = _big_vocab_model()
    base = copy.deepcopy(model)
    params = _params(mode="rank", attention=0.25, ffn=0.5, embedding_dim=32)
    recipe = _compress(model, params, enc)
    emb = model.get_input_embeddings()
    assert isinstance(emb, FactorizedEmbedding) and emb.factor_dim == 32
    model.tie_weights()  # what transformers calls on load/save: a classifier ties nothing, so this is a no-op
    assert model.get_input_embeddings() is emb and model.num_parameters() == param_count(model)
    assert param_count(base) - param_count(model) > 500 * 64 - (500 * 32 + 32 * 64)
    expected = _logits(model, batch)
    size = save_compressed(model, tmp_path / "m", base_config=config_snapshot(base), recipe=recipe)
    assert size < save_compressed(base, tmp_path / "b", base_config=config_snapshot(base), recipe=[]) * 0.7
    reloaded = load_compressed(tmp_path / "m", registry=load_registry(extra_plugins=["plugins.low_rank"]))
    assert isinstance(reloaded.bert.embeddings.word_embeddings, FactorizedEmbedding)
    assert isinstance(reloaded.bert.encoder.layer[1].output.dense, LowRankLinear)
    assert torch.equal(_logits(reloaded, batch), expected)


def test_training_updates_factors_but_not_the_pad_row():
    enc = tiny_encoded()
    model = _big_vocab_model()
    params = _params(mode="rank", attention=0.25, ffn=0.25, embedding_dim=32)
    TECH.apply(model, params=params, ctx=_ctx())
    emb = model.bert.embeddings.word_embeddings
    q = model.bert.encoder.layer[0].attention.self.query
    before = {n: t.detach().clone() for n, t in (("pad", emb.embedding.weight[0]), ("proj", emb.projection.weight),
                                                 ("first", q.first.weight), ("second", q.second.weight))}
    fine_tune(model, enc, steps=2, batch_size=8, learning_rate=1e-2, weight_decay=0.0, seed=0)
    assert torch.equal(emb.embedding.weight[0], before["pad"])  # padding_idx kept from the original embedding
    for name, mod in (("proj", emb.projection), ("first", q.first), ("second", q.second)):
        assert not torch.equal(mod.weight, before[name]), name


def test_padded_rows_match_unpadded(tiny_model, tiny_inputs):
    TECH.apply(tiny_model, params=_params(**TECH.example_params()), ctx=_ctx())
    full = _logits(tiny_model, tiny_inputs)
    row = {k: v[2:3, :8] for k, v in tiny_inputs.items()}
    torch.testing.assert_close(full[2:3], _logits(tiny_model, row), atol=1e-5, rtol=0)


def _densified(model: nn.Module) -> nn.Module:
    """A copy where every LowRankLinear is an nn.Linear with the same (product) weight."""
    dense = copy.deepcopy(model)
    for name, mod in list(dense.named_modules()):
        if isinstance(mod, LowRankLinear):
            lin = nn.Linear(mod.in_features, mod.out_features)
            with torch.no_grad():
                lin.weight.copy_(mod.dense_weight())
                lin.bias.copy_(mod.bias)
            parent, _, child = name.rpartition(".")
            setattr(dense.get_submodule(parent), child, lin)
    return dense


def test_head_and_ffn_pruning_work_on_a_factorised_model(tiny_inputs):
    model = _unit_variance(make_tiny_classifier())
    TECH.apply(model, params=_params(**TECH.example_params()), ctx=_ctx())
    dense = _densified(model)
    heads, neurons = [[0, 2], [1, 2, 3]], [list(range(0, FFN, 2)), list(range(10, 40))]
    for m in (model, dense):
        prune_heads(m, heads)
        prune_ffn_neurons(m, neurons)
    layer = model.bert.encoder.layer[0]
    assert isinstance(layer.attention.self.query, LowRankLinear)
    assert layer.attention.self.query.second.weight.shape == (16, 8)  # 2 heads x 8 rows, rank 8
    assert layer.attention.output.dense.first.weight.shape == (8, 16)
    assert layer.intermediate.dense.out_features == FFN // 2 and layer.output.dense.in_features == FFN // 2
    torch.testing.assert_close(_logits(model, tiny_inputs), _logits(dense, tiny_inputs), atol=1e-5, rtol=0)


def test_restore_rebuilds_structure_and_checks_the_model(tiny_model, tiny_inputs):
    params = _params(**TECH.example_params())
    record = TECH.apply(tiny_model, params=params, ctx=_ctx())
    fresh = make_tiny_classifier(seed=3)
    TECH.restore(fresh, phase="finalize", params=params, record=record)  # no-op for other phases
    assert type(fresh.bert.encoder.layer[0].attention.self.query) is nn.Linear
    TECH.restore(fresh, phase="apply", params=params, record=record)
    fresh.load_state_dict(tiny_model.state_dict(), strict=True)
    assert torch.equal(_logits(fresh, tiny_inputs), _logits(tiny_model, tiny_inputs))
    with pytest.raises(ValueError, match="LowRankLinear here"):  # already factorised
        TECH.restore(fresh, phase="apply", params=params, record=record)


def test_bad_params_and_unsupported_models():
    with pytest.raises(ValueError, match="mode"):
        TECH.validate(_params(mode="svd"))
    with pytest.raises(ValueError, match="outside"):
        TECH.validate(_params(attention=1.5))
    with pytest.raises(ValueError, match="embedding_dim"):
        TECH.validate(_params(embedding_dim=48))
    with pytest.raises(ValueError, match="no parameter"):
        TECH.validate(_params(rank=4))
    assert "BERT-like" in TECH.supports(nn.Linear(2, 2))
    assert TECH.supports(make_tiny_classifier()) is None


def test_registration():
    import plugins.low_rank as mod

    seen = []
    mod.register_techniques(seen.append)
    assert [t.name for t in seen] == ["low_rank"]
    reg = load_registry(extra_plugins=["plugins.low_rank"])
    assert "low_rank" in reg.names()
