from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from autocompress import testing
from autocompress.modeling import config_snapshot, load_compressed, save_compressed
from autocompress.pipeline import run_pipeline
from autocompress.registry import load_registry
from autocompress.technique import TechniqueContext
from autocompress.tiny import make_tiny_classifier, tiny_vocab
from plugins.head_pruning import HeadPruning
from plugins.quantization import (
    Int8DynamicLinear,
    Int8Embedding,
    Quantization,
    fake_quantize_activation,
    int8_unavailable,
    quantizable_embeddings,
    quantizable_linears,
)

pytestmark = pytest.mark.skipif(int8_unavailable("cpu") is not None,
                                reason="no x86/fbgemm int8 kernels in this torch build")

REGISTRY = load_registry(extra_plugins=["plugins.quantization"])
ENC = testing.tiny_encoded()


def _params(**overrides):
    params = Quantization().defaults()
    params.update(overrides)
    return params


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _random_inputs(n: int = 64, seq: int = 12, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, len(tiny_vocab()), (n, seq), generator=gen)
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    mask[::3, seq // 2:] = 0
    ids[::3, seq // 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _spread(model):
    # BERT's 0.02-std init makes every sublayer a tiny residual update and every logit ~0.01, so almost
    # any error would pass. Variance-preserving weights make each Linear matter, as in a trained model.
    torch.manual_seed(0)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.Linear):
                mod.weight.normal_(0, mod.in_features ** -0.5)
    return model


def _vocab_model(vocab: int = 3000, hidden: int = 64):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=2 * hidden, max_position_embeddings=64)
    return BertForSequenceClassification(config).eval()


def _save_load(model, fresh, path):
    save_file(model.state_dict(), str(path))
    fresh.load_state_dict(load_file(str(path)), strict=True)
    return fresh


def _saved(model, recipe, path, base_config=None):
    return save_compressed(model, path, base_config=base_config or config_snapshot(make_tiny_classifier()),
                           recipe=recipe)


def _relative(out, ref):
    return float((out.float() - ref.float()).norm() / ref.float().norm())


# ----------------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------------


def test_module_matches_float_linear_any_shape():
    torch.manual_seed(0)
    linear = nn.Linear(16, 8)
    for group_size, n_scales in ((1, 8), (3, 3), (8, 1), (100, 1)):
        q = Int8DynamicLinear.from_float(linear, group_size=group_size)
        assert q.weight_int8.dtype == torch.int8 and q.weight_scale.shape == (n_scales,)
        assert "weight_zero_point" not in q.state_dict()  # symmetric: no zero points stored
        x = torch.randn(2, 3, 5, 16)
        y = q(x)
        assert y.shape == (2, 3, 5, 8)
        ref = linear(x).detach()
        assert (y - ref).abs().max() < 0.05 * ref.abs().max()
        # Same kernel for 2-D input: flattening the leading dims changes nothing.
        assert torch.equal(q(x.reshape(-1, 16)).reshape(y.shape), y)
        assert q(x.to(torch.bfloat16)).dtype == torch.bfloat16
        # The kernel multiplies by exactly the dequantised weight (up to activation rounding).
        assert torch.allclose(y, x @ q.dequantized_weight().T + linear.bias.detach(), atol=0.05)
    assert Int8DynamicLinear(16, 8, per_channel=False).weight_scale.numel() == 1  # older spelling


def test_no_bias_and_dtype_casts_keep_fp32_metadata():
    linear = nn.Linear(8, 4, bias=False)
    q = Int8DynamicLinear.from_float(linear)
    assert "bias" not in q.state_dict()
    x = torch.randn(3, 8)
    before = q(x)
    q.to(torch.bfloat16)  # a model-wide dtype cast must not touch the scales
    assert q.weight_scale.dtype == torch.float32
    assert torch.equal(q(x), before)
    # Deep copies and pickles drop the packed kernel weight and rebuild it.
    assert torch.equal(copy.deepcopy(q)(x), before)
    assert torch.equal(pickle.loads(pickle.dumps(q))(x), before)


def test_int8_embedding_gathers_and_dequantises_rows():
    torch.manual_seed(0)
    emb = nn.Embedding(50, 16, padding_idx=0)
    q = Int8Embedding.from_float(emb)
    assert q.weight_int8.dtype == torch.int8 and q.weight_scale.shape == (50,)
    ids = torch.tensor([[1, 2, 49], [0, 7, 7]])
    out = q(ids)
    assert out.shape == (2, 3, 16) and out.dtype == torch.float32
    assert torch.equal(out, q.dequantized_weight()[ids])
    assert (out - emb(ids)).abs().max() <= emb.weight.abs().amax(1).max() / 254 + 1e-6
    q.to(torch.bfloat16)  # follows a model cast for its output, keeps float32 scales
    assert q.weight_scale.dtype == torch.float32 and q(ids).dtype == torch.bfloat16
    q.to("cpu")  # a device move keeps the output dtype
    assert q(ids).dtype == torch.bfloat16
    q.float()
    assert torch.equal(q(ids), out)


# ----------------------------------------------------------------------------------------------------------
# finalize
# ----------------------------------------------------------------------------------------------------------


def test_finalize_quantizes_encoder_pooler_and_tables_not_classifier(tiny_model):
    record = Quantization().finalize(tiny_model, params=_params(), ctx=TechniqueContext())
    assert record["granularity"] == "channel" and record["dtype"] == "int8"
    names = record["quantized"]
    assert "bert.pooler.dense" in names and "classifier" not in names
    assert len(names) == 2 * 6 + 1  # q, k, v, attn out, intermediate, output per layer + pooler
    for name in names:
        mod = tiny_model.get_submodule(name)
        assert isinstance(mod, Int8DynamicLinear) and mod.weight_int8.dtype == torch.int8
    assert type(tiny_model.classifier) is nn.Linear
    assert not any(type(m) is nn.Linear for m in tiny_model.bert.modules())
    # Word and position tables int8; the 2-row token-type table stays float (saves nothing).
    assert record["embeddings"] == ["bert.embeddings.word_embeddings", "bert.embeddings.position_embeddings"]
    assert isinstance(tiny_model.bert.embeddings.word_embeddings, Int8Embedding)
    assert type(tiny_model.bert.embeddings.token_type_embeddings) is nn.Embedding

    with_head = make_tiny_classifier()
    record = Quantization().finalize(with_head, params=_params(include_classifier=True, embeddings=False),
                                     ctx=TechniqueContext())
    assert "classifier" in record["quantized"] and record["embeddings"] == []
    assert isinstance(with_head.classifier, Int8DynamicLinear)
    assert type(with_head.bert.embeddings.word_embeddings) is nn.Embedding


@pytest.mark.parametrize("granularity", ["channel", "group", "tensor"])
def test_outputs_close_to_fp32(granularity):
    model = _spread(make_tiny_classifier(hidden=64, heads=4, intermediate=128))
    inputs = _random_inputs(n=128)
    with torch.no_grad():
        ref = model(**inputs, output_hidden_states=True)
    Quantization().finalize(model, params=_params(granularity=granularity, group_size=16), ctx=TechniqueContext())
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    assert _relative(out.hidden_states[-1], ref.hidden_states[-1]) < 0.05
    margin, margin_ref = (o.logits[:, 1] - o.logits[:, 0] for o in (out, ref))
    assert torch.corrcoef(torch.stack([margin, margin_ref]))[0, 1] > 0.97
    assert (out.logits.argmax(-1) == ref.logits.argmax(-1)).float().mean() >= 0.9


def test_group_granularity_one_scale_per_head_for_qkv(tmp_path):
    model = make_tiny_classifier(hidden=64, heads=4, intermediate=128)  # head size 16
    base = config_snapshot(model)
    params = _params(granularity="group", group_size=8)
    record = Quantization().finalize(model, params=params, ctx=TechniqueContext())
    layer = model.bert.encoder.layer[0]
    for proj in (layer.attention.self.query, layer.attention.self.key, layer.attention.self.value):
        assert proj.weight_scale.numel() == 4 and proj.group_size == 16  # one scale per head
        rows = proj.dequantized_weight().abs().amax(1).reshape(4, 16)
        assert torch.allclose(rows.amax(1), proj.weight_scale * 127, rtol=0.01)  # the head's max row sets it
    assert layer.attention.output.dense.weight_scale.numel() == 64 // 8
    assert layer.intermediate.dense.weight_scale.numel() == 128 // 8
    assert record["group_size"] == 8
    assert record["group_sizes"] == {f"bert.encoder.layer.{i}.attention.self.{p}": 16
                                     for i in range(2) for p in ("query", "key", "value")}
    # Only the group scales are stored: fewer scale bytes than per channel.
    channel = make_tiny_classifier(hidden=64, heads=4, intermediate=128)
    Quantization().finalize(channel, params=_params(), ctx=TechniqueContext())
    n_group = sum(b.numel() for n, b in model.state_dict().items() if n.endswith("weight_scale"))
    n_channel = sum(b.numel() for n, b in channel.state_dict().items() if n.endswith("weight_scale"))
    assert n_group < n_channel
    recipe = [{"technique": "quantization", "phase": "finalize", "params": params, "record": record}]
    _saved(model, recipe, tmp_path / "m", base)
    inputs = _random_inputs()
    assert torch.equal(_logits(load_compressed(tmp_path / "m", registry=REGISTRY), inputs), _logits(model, inputs))


@pytest.mark.parametrize("granularity", ["channel", "group", "tensor"])
def test_state_dict_round_trip_via_safetensors(tmp_path, tiny_model, tiny_inputs, granularity):
    technique = Quantization()
    params = _params(granularity=granularity, group_size=16)
    record = technique.finalize(tiny_model, params=params, ctx=TechniqueContext())
    state = tiny_model.state_dict()
    assert all(isinstance(v, torch.Tensor) and not v.is_quantized for v in state.values())
    fresh = make_tiny_classifier(seed=5)
    technique.restore(fresh, phase="apply", params=params, record=record)  # no-op for other phases
    assert type(fresh.bert.pooler.dense) is nn.Linear
    technique.restore(fresh, phase="finalize", params=params, record=record)
    _save_load(tiny_model, fresh, tmp_path / "model.safetensors")
    assert torch.equal(_logits(fresh, tiny_inputs), _logits(tiny_model, tiny_inputs))


@pytest.mark.parametrize("settings", [
    {"dtype": "int8", "granularity": "channel", "embeddings": True},
    {"dtype": "int8", "granularity": "group", "group_size": 16, "embeddings": False, "include_classifier": True},
    {"dtype": "bf16", "embeddings": True},
    {"dtype": "fp16", "embeddings": False},
    {"dtype": "int8", "granularity": "channel", "bits": 4, "embeddings": True, "embedding_bits": 3, "embedding_group": 8},
    {"dtype": "int8", "granularity": "channel", "embeddings": True, "embedding_group": 8},  # 8-bit, grouped scales
], ids=["int8-channel-emb", "int8-group-head", "bf16-emb", "fp16", "int4-emb3", "int8-emb-group"])
def test_pipeline_save_load_compressed_exact(tmp_path, settings):
    model = testing.tiny_model()
    base = config_snapshot(model)
    batch = testing.tiny_batch(ENC)  # mixed lengths: padded rows
    recipe = testing.compress(model, [(Quantization(), _params(**settings))], ENC, train_steps=0)
    assert [s["phase"] for s in recipe] == ["finalize"]
    size = _saved(model, recipe, tmp_path / "m", base)
    reloaded = load_compressed(tmp_path / "m", registry=REGISTRY)
    assert torch.equal(testing.logits(reloaded, batch), testing.logits(model, batch))
    assert {type(m) for m in reloaded.modules()} == {type(m) for m in model.modules()}
    plain = _saved(testing.tiny_model(), [], tmp_path / "plain", base)
    limit = 0.6 if settings["dtype"] != "int8" else (0.4 if settings["embeddings"] else 0.5)
    assert size < (0.3 if settings.get("bits") == 4 else limit) * plain


def test_saved_size_shrinks(tmp_path):
    # Large enough hidden size that the Linear weights dominate the embeddings, as in BERT-base.
    model = make_tiny_classifier(hidden=128, heads=4, intermediate=512)
    fp32 = tmp_path / "fp32.safetensors"
    save_file(model.state_dict(), str(fp32))
    Quantization().finalize(model, params=_params(embeddings=False), ctx=TechniqueContext())
    int8 = tmp_path / "int8.safetensors"
    save_file(model.state_dict(), str(int8))
    assert int8.stat().st_size < 0.4 * fp32.stat().st_size


def test_int8_embeddings_shrink_saved_bytes_and_stay_close(tmp_path, tiny_inputs):
    # A 3000 x 64 word table: the embeddings are most of this model, as on MiniLM (47 of 90 MB).
    sizes, outs = {}, {}
    for embeddings in (False, True):
        model = _spread(_vocab_model())
        ref = _logits(model, tiny_inputs)
        record = Quantization().finalize(model, params=_params(embeddings=embeddings), ctx=TechniqueContext())
        recipe = [{"technique": "quantization", "phase": "finalize", "params": _params(), "record": record}]
        sizes[embeddings] = _saved(model, recipe, tmp_path / str(embeddings), config_snapshot(_vocab_model()))
        outs[embeddings] = _logits(model, tiny_inputs)
    # word 3000x64 + position 64x64: fp32 -> int8 + one float32 scale per row
    rows = 3000 + 64
    expected = rows * 64 * 4 - (rows * 64 + rows * 4)
    saved = sizes[False] - sizes[True]
    assert abs(saved - expected) < 4096, (saved, expected)
    assert sizes[True] < 0.5 * sizes[False]
    assert _relative(outs[True], ref) < 0.05 and _relative(outs[True], outs[False]) < 0.05


def test_composes_with_head_pruning(tmp_path, tiny_model, tiny_inputs):
    pruning, quant = HeadPruning(), Quantization()
    p_params = dict(pruning.defaults(), fraction=0.5, importance_batches=1)
    q_params = _params(granularity="group")

    def batches(n):
        for _ in range(n):
            yield {**tiny_inputs, "labels": torch.tensor([0, 1, 1, 0])}

    p_record = pruning.apply(tiny_model, params=p_params, ctx=TechniqueContext(train_batches=batches))
    q_record = quant.finalize(tiny_model, params=q_params, ctx=TechniqueContext())
    query = tiny_model.bert.encoder.layer[0].attention.self.query
    assert isinstance(query, Int8DynamicLinear)
    assert query.out_features == len(p_record["kept_heads"][0]) * 8
    assert query.weight_scale.numel() == len(p_record["kept_heads"][0])  # one scale per kept head
    out = _logits(tiny_model, tiny_inputs)
    assert torch.isfinite(out).all()

    fresh = make_tiny_classifier(seed=9)
    pruning.restore(fresh, phase="apply", params=p_params, record=p_record)
    quant.restore(fresh, phase="finalize", params=q_params, record=q_record)
    _save_load(tiny_model, fresh, tmp_path / "model.safetensors")
    assert torch.equal(_logits(fresh, tiny_inputs), out)


def test_composes_with_low_rank_factors_and_factorised_embedding(tmp_path, tiny_inputs):
    from plugins.low_rank import FactorizedEmbedding, LowRankFactorization, LowRankLinear

    reg = load_registry(extra_plugins=["plugins.quantization", "plugins.low_rank"])
    model = _vocab_model()
    base = config_snapshot(model)
    low = LowRankFactorization()
    steps = [(low, {**low.defaults(), "mode": "rank", "attention": 0.25, "ffn": 0.25, "embedding_dim": 32}),
             (Quantization(), _params(granularity="group", group_size=8))]
    logs = []
    result = run_pipeline(model, steps, ctx=TechniqueContext(log=logs.append))
    assert not any("left in float" in line for line in logs)  # factors are converted, not skipped
    query = model.bert.encoder.layer[0].attention.self.query
    assert isinstance(query, LowRankLinear)
    assert isinstance(query.first, Int8DynamicLinear) and isinstance(query.second, Int8DynamicLinear)
    assert query.second.weight_scale.numel() == 4  # the output factor's rows are the heads' rows
    words = model.bert.embeddings.word_embeddings
    assert isinstance(words, FactorizedEmbedding) and isinstance(words.embedding, Int8Embedding)
    assert isinstance(words.projection, Int8DynamicLinear)
    _saved(model, result.recipe, tmp_path / "m", base)
    reloaded = load_compressed(tmp_path / "m", registry=reg)
    assert torch.equal(_logits(reloaded, tiny_inputs), _logits(model, tiny_inputs))


def test_shared_layers_quantised_once_and_saved_once(tmp_path, tiny_inputs):
    shared = make_tiny_classifier()
    layers = shared.bert.encoder.layer
    layers[1] = layers[0]
    record = Quantization().finalize(shared, params=_params(), ctx=TechniqueContext())
    assert not any(".layer.1." in n for n in record["quantized"])
    assert len(record["quantized"]) == 6 + 1
    assert layers[1] is layers[0] and isinstance(layers[1].attention.self.query, Int8DynamicLinear)
    separate = make_tiny_classifier()
    Quantization().finalize(separate, params=_params(), ctx=TechniqueContext())
    recipe = [{"technique": "quantization", "phase": "finalize", "params": _params(), "record": record}]
    size_shared = _saved(shared, recipe, tmp_path / "shared")
    size_separate = _saved(separate, [], tmp_path / "separate")
    one_layer = sum(t.numel() * t.element_size() for t in separate.bert.encoder.layer[1].state_dict().values())
    assert size_separate - size_shared > 0.9 * one_layer

    # A Linear shared by two different parents is replaced in both.
    model = make_tiny_classifier()
    model.bert.encoder.layer[1].attention.self.query = model.bert.encoder.layer[0].attention.self.query
    Quantization().finalize(model, params=_params(), ctx=TechniqueContext())
    q0, q1 = (model.bert.encoder.layer[i].attention.self.query for i in (0, 1))
    assert q0 is q1 and isinstance(q0, Int8DynamicLinear)


def test_composes_with_weight_sharing_reload(tmp_path):
    from plugins.weight_sharing import WeightSharing

    reg = load_registry(extra_plugins=["plugins.quantization", "plugins.weight_sharing"])
    model = testing.tiny_model()
    base = config_snapshot(model)
    sharing = WeightSharing()
    recipe = testing.compress(model, [(sharing, {**sharing.defaults(), "mode": "all"}),
                                      (Quantization(), _params(qat=True))], ENC, train_steps=2)
    layers = model.bert.encoder.layer
    assert all(layer is layers[0] for layer in layers)
    assert isinstance(layers[3].output.dense, Int8DynamicLinear)
    _saved(model, recipe, tmp_path / "m", base)
    reloaded = load_compressed(tmp_path / "m", registry=reg)
    assert all(layer is reloaded.bert.encoder.layer[0] for layer in reloaded.bert.encoder.layer)
    batch = testing.tiny_batch(ENC)
    assert torch.equal(testing.logits(reloaded, batch), testing.logits(model, batch))


# ----------------------------------------------------------------------------------------------------------
# fp16 / bf16
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_half_cast_on_cpu_keeps_logits_close(dtype, torch_dtype):
    model = _spread(make_tiny_classifier(hidden=64, heads=4, intermediate=128))
    inputs = _random_inputs(n=64)
    ref = _logits(model, inputs)
    logs = []
    record = Quantization().finalize(model, params=_params(dtype=dtype), ctx=TechniqueContext(log=logs.append))
    assert record["dtype"] == dtype and record["quantized"] == []
    assert {p.dtype for p in model.parameters()} == {torch_dtype}
    assert model.bert.embeddings.word_embeddings(inputs["input_ids"]).dtype == torch_dtype  # int8 table
    out = _logits(model, inputs)
    assert out.dtype == torch_dtype
    assert _relative(out, ref) < 0.05
    assert any("latency" in line for line in logs)  # an honest note on the CPU's half kernels


# ----------------------------------------------------------------------------------------------------------
# QAT
# ----------------------------------------------------------------------------------------------------------


def test_qat_fake_quantises_forward_and_is_removed(tiny_inputs):
    model = _spread(make_tiny_classifier(hidden=64, heads=4, intermediate=128))
    keys = list(model.state_dict())
    ref = _logits(model, tiny_inputs)
    tech, params = Quantization(), _params(qat=True, granularity="group", group_size=16)
    hooks = tech.training_hooks(model, params=params, ctx=TechniqueContext())
    query = model.bert.encoder.layer[0].attention.self.query
    assert type(query) is nn.Linear and list(model.state_dict()) == keys  # nothing structural changed
    during = _logits(model, tiny_inputs)
    assert not torch.equal(during, ref)
    # The fake-quantised forward is what the int8 model computes (the same rounding, modulo kernel details).
    expected = copy.deepcopy(model)
    tech.finalize(expected, params=params, ctx=TechniqueContext())
    int8 = _logits(expected, tiny_inputs)
    assert _relative(during, int8) < 0.1 * _relative(ref, int8)
    # Straight-through: gradients reach the float weights.
    x = torch.randn(5, 64)
    query(x).sum().backward()
    assert query.weight.grad is not None and query.weight.grad.abs().sum() > 0
    hooks.after_step(0, 2)  # not the last step: still on
    assert not torch.equal(_logits(model, tiny_inputs), ref)
    hooks.after_step(1, 2)  # last step: removed
    assert torch.equal(_logits(model, tiny_inputs), ref)
    tech.training_hooks(model, params=params, ctx=TechniqueContext())
    tech.finalize(model, params=params, ctx=TechniqueContext())  # removes them too, then converts
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert torch.equal(_logits(model, tiny_inputs), _logits(expected, tiny_inputs))


def test_qat_activation_rounding_matches_kernel():
    torch.manual_seed(0)
    linear = nn.Linear(32, 16)
    q = Int8DynamicLinear.from_float(linear)
    x = torch.randn(20, 32) * 3 + 1
    kernel = q(x)
    simulated = fake_quantize_activation(x) @ q.dequantized_weight().T + linear.bias.detach()
    assert (kernel - simulated).abs().max() < 0.02 * kernel.abs().max()


def test_qat_trains_through_the_pipeline():
    model = testing.tiny_model()
    recipe = testing.compress(model, [(Quantization(), _params(qat=True))], ENC, train_steps=3)
    assert recipe[0]["record"]["qat"] is True
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert torch.isfinite(testing.logits(model, testing.tiny_batch(ENC))).all()


# ----------------------------------------------------------------------------------------------------------
# Backward compatibility, validation, support
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_channel", [True, False])
def test_old_records_and_state_dicts_still_load(tmp_path, tiny_inputs, per_channel):
    model = make_tiny_classifier()
    tech = Quantization()
    new = tech.finalize(model, params={"dtype": "int8", "per_channel": per_channel, "include_classifier": False,
                                       "embeddings": False}, ctx=TechniqueContext())
    assert new["granularity"] == ("channel" if per_channel else "tensor")  # direct callers' old key is read
    old_record = {"quantized": new["quantized"], "per_channel": per_channel, "dtype": "int8"}
    state = model.state_dict()
    for name in new["quantized"]:  # older files stored all-zero int64 zero points
        state[f"{name}.weight_zero_point"] = torch.zeros(state[f"{name}.weight_scale"].numel(), dtype=torch.int64)
    save_file(state, str(tmp_path / "old.safetensors"))
    fresh = make_tiny_classifier(seed=4)
    tech.restore(fresh, phase="finalize", params={"dtype": "int8", "per_channel": per_channel}, record=old_record)
    fresh.load_state_dict(load_file(str(tmp_path / "old.safetensors")), strict=True)
    assert torch.equal(_logits(fresh, tiny_inputs), _logits(model, tiny_inputs))


def test_bad_params():
    tech = Quantization()
    tech.validate(_params())
    with pytest.raises(ValueError, match="replaced by granularity"):
        tech.validate({"per_channel": True})
    with pytest.raises(ValueError, match="quantization.granularity"):
        tech.validate(_params(granularity="row"))
    with pytest.raises(ValueError, match="quantization.dtype"):
        tech.validate(_params(dtype="int4"))
    with pytest.raises(ValueError, match="qat"):
        tech.validate(_params(dtype="bf16", qat=True))
    with pytest.raises(ValueError, match="no parameter"):
        tech.validate({"nbits": 8})
    with pytest.raises(ValueError, match="quantization.bits"):
        tech.validate(_params(bits=2))
    with pytest.raises(ValueError, match="quantization.embedding_bits"):
        tech.validate(_params(embedding_bits=5))
    assert tech.identity_params() is None


def test_supports_and_device_checks(tiny_model):
    technique = Quantization()
    assert technique.supports(tiny_model, device="cpu") is None
    assert technique.supports(tiny_model, device="cuda") is None  # fp16/bf16 run on CUDA
    assert "CPU" in int8_unavailable("cuda") and "bf16" in int8_unavailable("cuda:0")
    meta = make_tiny_classifier().to("meta")  # stands in for a non-CPU device
    with pytest.raises(RuntimeError, match="CPU kernels only"):
        technique.apply(meta, params=_params(), ctx=TechniqueContext())
    assert technique.apply(meta, params=_params(dtype="bf16"), ctx=TechniqueContext()) is None
    assert quantizable_linears(tiny_model, include_classifier=True)[-1] == "classifier"
    assert quantizable_embeddings(tiny_model) == ["bert.embeddings.word_embeddings",
                                                  "bert.embeddings.position_embeddings"]
    assert "no nn.Linear" in technique.supports(nn.ReLU())
    import plugins.quantization as mod

    seen = []
    mod.register_techniques(seen.append)
    assert [t.name for t in seen] == ["quantization"]


def test_other_linear_like_modules_are_skipped_and_logged(tiny_inputs):
    class Opaque(nn.Module):  # stands in for e.g. movement pruning's SparseLinear
        def __init__(self, linear):
            super().__init__()
            self.in_features, self.out_features = linear.in_features, linear.out_features
            self.w = nn.Parameter(linear.weight.detach().clone())
            self.b = nn.Parameter(linear.bias.detach().clone())

        def forward(self, x):
            return nn.functional.linear(x, self.w, self.b)

    model = make_tiny_classifier()
    model.bert.encoder.layer[0].output.dense = Opaque(model.bert.encoder.layer[0].output.dense)
    logs = []
    record = Quantization().finalize(model, params=_params(), ctx=TechniqueContext(log=logs.append))
    assert "bert.encoder.layer.0.output.dense" not in record["quantized"] and len(record["quantized"]) == 12
    assert "Opaque" in logs[-1]
    assert torch.isfinite(_logits(model, tiny_inputs)).all()


def test_contract():
    tech = Quantization()
    testing.check_declaration(tech)
    testing.check_effect(tech)
    testing.check_save_reload(tech, REGISTRY)
    assert math.isclose(tech.param("group_size").default, 128)


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_low_bit_packing_round_trips_and_is_dense(bits):
    from plugins.int8_modules import levels, pack_bits, unpack_bits

    lo, hi = levels(bits)
    q = torch.randint(lo, hi + 1, (37, 11), dtype=torch.int8)
    packed = pack_bits(q, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (37 * 11 if bits == 8 else -(-37 * 11 // 8) * bits)
    assert torch.equal(unpack_bits(packed, bits, (37, 11)), q)
    if bits < 8:
        with pytest.raises(ValueError, match=f"{bits}-bit range"):
            pack_bits(torch.full((3,), hi + 1, dtype=torch.int8), bits)


def test_low_bit_weights_save_size_not_time_and_stay_close(tmp_path, tiny_inputs):
    # 4-bit Linears + 3-bit embeddings (a scale per 16 columns) against int8: the file shrinks by what the
    # packing saves, the model runs the same int8 modules, and the logits stay close to float.
    sizes, outs = {}, {}
    ref = _logits(_spread(_vocab_model()), tiny_inputs)
    for name, extra in (("int8", {}), ("low", {"bits": 4, "embedding_bits": 3, "embedding_group": 16})):
        model = _spread(_vocab_model())
        params = _params(**extra)
        record = Quantization().finalize(model, params=params, ctx=TechniqueContext())
        recipe = [{"technique": "quantization", "phase": "finalize", "params": params, "record": record}]
        sizes[name] = _saved(model, recipe, tmp_path / name, config_snapshot(_vocab_model()))
        outs[name] = _logits(model, tiny_inputs)
        reloaded = load_compressed(tmp_path / name, registry=REGISTRY)
        assert torch.equal(_logits(reloaded, tiny_inputs), outs[name])
        kinds = {type(m) for m in model.modules()}
        assert Int8DynamicLinear in kinds and Int8Embedding in kinds
    emb_rows, dim = 3000 + 64, 64
    linear_weights = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, Int8DynamicLinear))
    # embeddings: 5 of 8 bits saved per weight, minus 3 extra float32 scales per row; Linears: 4 of 8 bits
    expected = emb_rows * dim * 5 // 8 - emb_rows * 3 * 4 + linear_weights // 2
    assert abs((sizes["int8"] - sizes["low"]) - expected) < 4096, (sizes, expected)
    assert 0 < _relative(outs["low"], ref) < 0.5  # random weights: harsher than a trained model


def test_qat_at_low_bits_rounds_as_the_saved_model(tiny_inputs):
    model = _spread(make_tiny_classifier(hidden=64, heads=4, intermediate=128))
    tech, params = Quantization(), _params(qat=True, bits=4, embedding_bits=4, embedding_group=16)
    tech.training_hooks(model, params=params, ctx=TechniqueContext())
    during = _logits(model, tiny_inputs)
    at8 = copy.deepcopy(model)
    tech.finalize(model, params=params, ctx=TechniqueContext())
    tech.finalize(at8, params=_params(), ctx=TechniqueContext())
    low, eight = _logits(model, tiny_inputs), _logits(at8, tiny_inputs)
    assert _relative(during, low) < 0.2 * _relative(eight, low)


def test_record_without_embedding_group_reloads_from_params(tmp_path):
    """Records written before the fix left out embedding_group for 8-bit tables; the recipe's params carry it."""
    model = testing.tiny_model()
    base = config_snapshot(model)
    batch = testing.tiny_batch(ENC)
    recipe = testing.compress(model, [(Quantization(), _params(embeddings=True, embedding_group=8))], ENC,
                              train_steps=0)
    recipe[0]["record"].pop("embedding_group")
    recipe[0]["record"].pop("embedding_bits", None)
    _saved(model, recipe, tmp_path / "m", base)
    reloaded = load_compressed(tmp_path / "m", registry=REGISTRY)
    assert torch.equal(testing.logits(reloaded, batch), testing.logits(model, batch))
