from __future__ import annotations

import copy
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from autocompress.technique import TechniqueContext
from autocompress.tiny import make_tiny_classifier, tiny_vocab
from plugins.head_pruning import HeadPruning
from plugins.quantization import Int8DynamicLinear, Quantization, quantizable_linears

pytestmark = pytest.mark.skipif(Quantization().supports(nn.Linear(2, 2)) is not None,
                                reason="no x86/fbgemm int8 kernels in this torch build")


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


def _save_load(model, fresh, path):
    save_file(model.state_dict(), str(path))
    fresh.load_state_dict(load_file(str(path)), strict=True)
    return fresh


def test_module_matches_float_linear_any_shape():
    torch.manual_seed(0)
    linear = nn.Linear(16, 8)
    for per_channel in (True, False):
        q = Int8DynamicLinear.from_float(linear, per_channel=per_channel)
        assert q.weight_int8.dtype == torch.int8 and q.weight_zero_point.dtype == torch.int64
        assert q.weight_scale.shape == ((8,) if per_channel else (1,))
        x = torch.randn(2, 3, 5, 16)
        y = q(x)
        assert y.shape == (2, 3, 5, 8)
        ref = linear(x).detach()
        assert (y - ref).abs().max() < 0.05 * ref.abs().max()
        # Same kernel for 2-D input: flattening the leading dims changes nothing.
        assert torch.equal(q(x.reshape(-1, 16)).reshape(y.shape), y)
        assert q(x.to(torch.bfloat16)).dtype == torch.bfloat16


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


def test_finalize_quantizes_encoder_and_pooler_not_classifier(tiny_model):
    record = Quantization().finalize(tiny_model, params=_params(), ctx=TechniqueContext())
    assert record["per_channel"] is True and record["dtype"] == "int8"
    names = record["quantized"]
    assert "bert.pooler.dense" in names and "classifier" not in names
    assert len(names) == 2 * 6 + 1  # q, k, v, attn out, intermediate, output per layer + pooler
    for name in names:
        mod = tiny_model.get_submodule(name)
        assert isinstance(mod, Int8DynamicLinear) and mod.weight_int8.dtype == torch.int8
    assert type(tiny_model.classifier) is nn.Linear
    assert not any(type(m) is nn.Linear for m in tiny_model.bert.modules())

    with_head = make_tiny_classifier()
    record = Quantization().finalize(with_head, params=_params(include_classifier=True), ctx=TechniqueContext())
    assert "classifier" in record["quantized"]
    assert isinstance(with_head.classifier, Int8DynamicLinear)


@pytest.mark.parametrize("per_channel", [True, False])
def test_outputs_close_to_fp32(per_channel):
    model = make_tiny_classifier(hidden=64, heads=4, intermediate=128)
    # BERT's 0.02-std init makes every sublayer a tiny residual update and every logit ~0.01, so almost
    # any error would pass. Variance-preserving weights make each Linear matter, as in a trained model.
    torch.manual_seed(0)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.Linear):
                mod.weight.normal_(0, mod.in_features ** -0.5)
    inputs = _random_inputs(n=128)
    with torch.no_grad():
        ref = model(**inputs, output_hidden_states=True)
    Quantization().finalize(model, params=_params(per_channel=per_channel), ctx=TechniqueContext())
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    h, h_ref = out.hidden_states[-1], ref.hidden_states[-1]
    assert (h - h_ref).norm() / h_ref.norm() < 0.05
    margin, margin_ref = (o.logits[:, 1] - o.logits[:, 0] for o in (out, ref))
    assert torch.corrcoef(torch.stack([margin, margin_ref]))[0, 1] > 0.97
    assert (out.logits.argmax(-1) == ref.logits.argmax(-1)).float().mean() >= 0.9


def test_state_dict_round_trip_via_safetensors(tmp_path, tiny_model, tiny_inputs):
    technique = Quantization()
    params = _params()
    record = technique.finalize(tiny_model, params=params, ctx=TechniqueContext())
    state = tiny_model.state_dict()
    assert all(isinstance(v, torch.Tensor) and not v.is_quantized for v in state.values())
    fresh = make_tiny_classifier(seed=5)
    technique.restore(fresh, phase="apply", params=params, record=record)  # no-op for other phases
    assert type(fresh.bert.pooler.dense) is nn.Linear
    technique.restore(fresh, phase="finalize", params=params, record=record)
    _save_load(tiny_model, fresh, tmp_path / "model.safetensors")
    assert torch.equal(_logits(fresh, tiny_inputs), _logits(tiny_model, tiny_inputs))


def test_per_tensor_round_trip(tmp_path, tiny_model, tiny_inputs):
    technique = Quantization()
    params = _params(per_channel=False)
    record = technique.finalize(tiny_model, params=params, ctx=TechniqueContext())
    fresh = make_tiny_classifier(seed=5)
    technique.restore(fresh, phase="finalize", params=params, record=record)
    _save_load(tiny_model, fresh, tmp_path / "model.safetensors")
    assert torch.equal(_logits(fresh, tiny_inputs), _logits(tiny_model, tiny_inputs))


def test_composes_with_head_pruning(tmp_path, tiny_model, tiny_inputs):
    pruning, quant = HeadPruning(), Quantization()
    p_params = dict(pruning.defaults(), fraction=0.5, importance_batches=1)
    q_params = _params()

    def batches(n):
        for _ in range(n):
            yield {**tiny_inputs, "labels": torch.tensor([0, 1, 1, 0])}

    p_record = pruning.apply(tiny_model, params=p_params, ctx=TechniqueContext(train_batches=batches))
    q_record = quant.finalize(tiny_model, params=q_params, ctx=TechniqueContext())
    query = tiny_model.bert.encoder.layer[0].attention.self.query
    assert isinstance(query, Int8DynamicLinear)
    assert query.out_features == len(p_record["kept_heads"][0]) * 8
    out = _logits(tiny_model, tiny_inputs)
    assert torch.isfinite(out).all()

    fresh = make_tiny_classifier(seed=9)
    pruning.restore(fresh, phase="apply", params=p_params, record=p_record)
    quant.restore(fresh, phase="finalize", params=q_params, record=q_record)
    _save_load(tiny_model, fresh, tmp_path / "model.safetensors")
    assert torch.equal(_logits(fresh, tiny_inputs), out)


def test_saved_size_shrinks(tmp_path):
    # Large enough hidden size that the Linear weights dominate the embeddings, as in BERT-base.
    model = make_tiny_classifier(hidden=128, heads=4, intermediate=512)
    fp32 = tmp_path / "fp32.safetensors"
    save_file(model.state_dict(), str(fp32))
    Quantization().finalize(model, params=_params(), ctx=TechniqueContext())
    int8 = tmp_path / "int8.safetensors"
    save_file(model.state_dict(), str(int8))
    assert int8.stat().st_size < 0.4 * fp32.stat().st_size


def test_supports(tiny_model):
    technique = Quantization()
    assert technique.supports(tiny_model, device="cpu") is None
    assert "CPU" in technique.supports(tiny_model, device="cuda")
    assert "CPU" in technique.supports(tiny_model, device="cuda:0")
    assert quantizable_linears(tiny_model, include_classifier=True)[-1] == "classifier"
    import plugins.quantization as mod

    seen = []
    mod.register_techniques(seen.append)
    assert [t.name for t in seen] == ["quantization"]
