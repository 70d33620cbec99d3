from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open
from torch import nn

from autocompress.measure import flops_per_example
from autocompress.modeling import MODEL_FILE, config_snapshot, load_compressed, param_count, save_compressed
from autocompress.pipeline import run_pipeline
from autocompress.registry import load_registry
from autocompress.surgery import prune_heads
from autocompress.technique import TechniqueContext
from autocompress.testing import tiny_batch, tiny_encoded
from autocompress.tiny import make_tiny_classifier
from autocompress.train import fine_tune
from plugins.low_rank import LowRankFactorization, LowRankLinear
from plugins.weight_sharing import WeightSharing, sharing_groups, why_not_averageable

TECH = WeightSharing()
LAYERS = 4
PLUGINS = ["plugins.low_rank", "plugins.weight_sharing"]


def _params(**overrides):
    return {**TECH.defaults(), **overrides}


def _model(seed: int = 0, layers: int = LAYERS) -> nn.Module:
    return make_tiny_classifier(layers=layers, seed=seed)


def _logits(model, inputs):
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


def _layer_params(layer: nn.Module) -> int:
    return sum(p.numel() for p in layer.parameters())


def _ctx(logs: list[str] | None = None) -> TechniqueContext:
    return TechniqueContext(log=(logs.append if logs is not None else lambda m: None))


def _train(enc, steps=3):
    def train(m, hooks):
        return fine_tune(m, enc, steps=steps, batch_size=8, learning_rate=1e-3, seed=0, hooks=hooks)

    return train


def test_groups():
    assert sharing_groups(6, "none") == []
    assert sharing_groups(6, "all") == [[0, 1, 2, 3, 4, 5]]
    assert sharing_groups(6, "groups", 2) == [[0, 1], [2, 3], [4, 5]]
    assert sharing_groups(7, "groups", 3) == [[0, 1, 2], [3, 4, 5]]  # layer 6 alone keeps its weights
    assert sharing_groups(6, "sandwich") == [[1, 2, 3, 4]]
    assert sharing_groups(3, "sandwich") == []  # first and last unique: nothing left to share
    with pytest.raises(ValueError, match="unknown sharing mode"):
        sharing_groups(4, "odd")


def test_mode_none_is_identity(tiny_inputs):
    model = _model()
    before = _logits(model, tiny_inputs)
    layers = list(model.bert.encoder.layer)
    assert TECH.apply(model, params=_params(**TECH.identity_params()), ctx=_ctx()) is None
    assert list(model.bert.encoder.layer) == layers
    assert torch.equal(_logits(model, tiny_inputs), before)


def test_all_shared_is_stored_once(tmp_path):
    model = _model()
    base = copy.deepcopy(model)
    per_layer = _layer_params(model.bert.encoder.layer[0])
    params = _params(mode="all", init="first")
    record = TECH.apply(model, params=params, ctx=_ctx())
    layers = model.bert.encoder.layer
    assert all(layer is layers[0] for layer in layers)
    assert param_count(base) - param_count(model) == (LAYERS - 1) * per_layer
    assert len(list(model.parameters())) < len(list(base.parameters()))  # the optimiser sees each tensor once
    size_base = save_compressed(base, tmp_path / "b", base_config=config_snapshot(base), recipe=[])
    size = save_compressed(model, tmp_path / "s", base_config=config_snapshot(base),
                           recipe=[{"technique": "weight_sharing", "phase": "apply", "params": params,
                                    "record": record}])
    assert size_base - size > 0.9 * 4 * (LAYERS - 1) * per_layer  # fp32 bytes of the dropped copies
    with safe_open(str(tmp_path / "s" / MODEL_FILE), "pt") as f:
        stored = {k.split(".")[3] for k in f.keys() if k.startswith("bert.encoder.layer.")}
    assert stored == {"0"}


def test_flops_unchanged(tiny_inputs):
    # Honest claim: every position still runs, so the work per example is the same.
    enc = tiny_encoded()
    model = _model()
    before = flops_per_example(model, enc)
    TECH.apply(model, params=_params(mode="all"), ctx=_ctx())
    assert flops_per_example(model, enc) == before
    assert "flops" not in TECH.reduces and "latency" not in TECH.reduces


def test_average_init():
    model = _model()
    originals = [dict(layer.named_parameters()) for layer in model.bert.encoder.layer]
    expected = {n: torch.stack([o[n].detach().clone() for o in originals]).mean(0) for n in originals[0]}
    record = TECH.apply(model, params=_params(mode="all", init="average"), ctx=_ctx())
    assert record["init"] == ["average"] and record["fallback"] == [None]
    shared = model.bert.encoder.layer[0]
    for name, p in shared.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], atol=1e-7, rtol=0)


@pytest.mark.parametrize("init,rep", [("first", [0, 2]), ("middle", [1, 3])])
def test_first_and_middle_init_keep_that_layers_weights(init, rep):
    model = _model()
    originals = list(model.bert.encoder.layer)
    weights = [layer.attention.self.query.weight.detach().clone() for layer in originals]
    record = TECH.apply(model, params=_params(mode="groups", group_size=2, init=init), ctx=_ctx())
    assert record["groups"] == [[0, 1], [2, 3]] and record["representatives"] == rep
    layers = model.bert.encoder.layer
    assert layers[0] is layers[1] is originals[rep[0]] and layers[2] is layers[3] is originals[rep[1]]
    assert layers[0] is not layers[2]
    assert torch.equal(layers[0].attention.self.query.weight, weights[rep[0]])


def test_sandwich_keeps_first_and_last_unique():
    model = _model()
    first, last = model.bert.encoder.layer[0], model.bert.encoder.layer[3]
    TECH.apply(model, params=_params(mode="sandwich"), ctx=_ctx())
    layers = model.bert.encoder.layer
    assert layers[0] is first and layers[3] is last and layers[1] is layers[2]
    assert len({id(x) for x in layers}) == 3


def test_save_reload_round_trip_keeps_sharing(tmp_path):
    enc = tiny_encoded()
    batch = tiny_batch(enc)
    model = _model()
    base_config = config_snapshot(model)
    recipe = run_pipeline(model, [(TECH, _params(mode="groups", group_size=3, init="average"))], ctx=_ctx(),
                          train=_train(enc)).recipe
    expected = _logits(model, batch)
    save_compressed(model, tmp_path, base_config=base_config, recipe=recipe)
    reloaded = load_compressed(tmp_path, registry=load_registry(extra_plugins=PLUGINS))
    layers = reloaded.bert.encoder.layer
    assert layers[0] is layers[1] is layers[2] and layers[3] is not layers[0]
    assert torch.equal(_logits(reloaded, batch), expected)


def test_training_updates_shared_weights_once():
    enc = tiny_encoded()
    model = _model()
    TECH.apply(model, params=_params(mode="all"), ctx=_ctx())
    shared = model.bert.encoder.layer[0]
    before = shared.intermediate.dense.weight.detach().clone()
    # The gradient of a shared weight is the sum of its contributions at every position.
    batch = tiny_batch(enc)
    loss = model(**batch).logits.square().sum()
    loss.backward()
    grad = shared.intermediate.dense.weight.grad.clone()
    per_position = []
    for i in range(LAYERS):
        probe = copy.deepcopy(model)
        layers = probe.bert.encoder.layer
        layers[i] = copy.deepcopy(layers[i])  # a private copy at position i: its grad is position i's share
        probe.zero_grad()
        probe(**batch).logits.square().sum().backward()
        per_position.append(layers[i].intermediate.dense.weight.grad)
    torch.testing.assert_close(grad, torch.stack(per_position).sum(0), atol=1e-6, rtol=1e-4)
    model.zero_grad()
    fine_tune(model, enc, steps=3, batch_size=8, learning_rate=1e-3, seed=0)
    layers = model.bert.encoder.layer
    assert all(layer is shared for layer in layers)
    assert not torch.equal(shared.intermediate.dense.weight, before)


def test_hidden_states_and_attentions_per_position(tiny_inputs):
    model = _model()
    model.config._attn_implementation = "eager"
    TECH.apply(model, params=_params(mode="all"), ctx=_ctx())
    with torch.no_grad():
        out = model(**tiny_inputs, output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == LAYERS + 1 and len(out.attentions) == LAYERS
    assert not torch.equal(out.hidden_states[1], out.hidden_states[2])  # same weights, different inputs


def test_padded_rows_match_unpadded(tiny_inputs):
    model = _model()
    TECH.apply(model, params=_params(mode="sandwich"), ctx=_ctx())
    full = _logits(model, tiny_inputs)
    row = {k: v[2:3, :8] for k, v in tiny_inputs.items()}
    torch.testing.assert_close(full[2:3], _logits(model, row), atol=1e-5, rtol=0)


def test_average_falls_back_after_head_pruning():
    model = _model()
    prune_heads(model, [[0, 1], [0, 1, 2], [1, 2, 3], [3]])
    logs: list[str] = []
    record = TECH.apply(model, params=_params(mode="all", init="average"), ctx=_ctx(logs))
    assert record["init"] == ["middle"] and record["requested_init"] == "average"
    assert "differ in structure" in record["fallback"][0] and any("middle" in m for m in logs)
    assert record["representatives"] == [2]
    assert model.bert.encoder.layer[0].attention.self.num_attention_heads == 3


def test_low_rank_then_sharing_composes(tmp_path):
    enc = tiny_encoded()
    batch = tiny_batch(enc)
    model = _model()
    base_config = config_snapshot(model)
    low_rank = LowRankFactorization()
    lr_params = {**low_rank.defaults(), "mode": "rank", "attention": 0.25, "ffn": 0.25}
    alone = copy.deepcopy(model)
    low_rank.apply(alone, params=lr_params, ctx=_ctx())
    steps = [(low_rank, lr_params), (TECH, _params(mode="all", init="average"))]
    recipe = run_pipeline(model, steps, ctx=_ctx(), train=_train(enc)).recipe
    record = recipe[-1]["record"]
    # Same ranks everywhere, so the shapes match, but the mean of SVD factors is meaningless: falls back.
    assert record["init"] == ["middle"] and "LowRankLinear" in record["fallback"][0]
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, LowRankLinear)
    assert param_count(model) < param_count(alone)
    expected = _logits(model, batch)
    save_compressed(model, tmp_path, base_config=base_config, recipe=recipe)
    reloaded = load_compressed(tmp_path, registry=load_registry(extra_plugins=PLUGINS))
    assert all(layer is reloaded.bert.encoder.layer[0] for layer in reloaded.bert.encoder.layer)
    assert torch.equal(_logits(reloaded, batch), expected)


def test_why_not_averageable():
    model = _model()
    assert why_not_averageable(list(model.bert.encoder.layer)) is None


def test_restore_checks_layer_count():
    model = _model()
    record = TECH.apply(model, params=_params(mode="all"), ctx=_ctx())
    with pytest.raises(ValueError, match="4-layer model"):
        TECH.restore(_model(layers=3), phase="apply", params=_params(mode="all"), record=record)
    fresh = _model(seed=5)
    TECH.restore(fresh, phase="finalize", params=_params(mode="all"), record=record)  # no-op for other phases
    assert fresh.bert.encoder.layer[0] is not fresh.bert.encoder.layer[1]


def test_bad_params_and_unsupported_models():
    with pytest.raises(ValueError, match="mode"):
        TECH.validate(_params(mode="everything"))
    with pytest.raises(ValueError, match="outside"):
        TECH.validate(_params(group_size=5))
    with pytest.raises(ValueError, match="init"):
        TECH.validate(_params(init="random"))
    with pytest.raises(ValueError, match="no parameter"):
        TECH.validate(_params(layers=2))
    assert "BERT-like" in TECH.supports(nn.Linear(2, 2))
    decoder = _model()
    decoder.config.is_decoder = True
    assert "encoders only" in TECH.supports(decoder)
    assert TECH.supports(_model()) is None


def test_registration():
    import plugins.weight_sharing as mod

    seen = []
    mod.register_techniques(seen.append)
    assert [t.name for t in seen] == ["weight_sharing"]
