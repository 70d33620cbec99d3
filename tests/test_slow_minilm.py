"""Slow checks on the real packaged all-MiniLM-L6-v2 (no timing assertions: benchmarks live in results/)."""

from __future__ import annotations

import pytest
import torch

from autocompress.modeling import config_snapshot, load_base_classifier, load_compressed, param_count, save_compressed
from autocompress.registry import load_registry
from autocompress.spec import ModelSpec
from autocompress.technique import TechniqueContext

pytestmark = pytest.mark.slow


def test_minilm_prune_quantise_save_reload(tmp_path):
    from autocompress.modeling import load_tokenizer

    spec = ModelSpec()
    model = load_base_classifier(spec, label_names=["negative", "positive"]).eval()
    tok = load_tokenizer(spec)
    batch = dict(tok(["a gripping, funny film", "dull and far too long"], padding=True, return_tensors="pt"))
    reg = load_registry(selection="builtin")
    before = param_count(model)

    def batches(n):
        for _ in range(n):
            yield {**batch, "labels": torch.tensor([1, 0])}

    ctx = TechniqueContext(train_batches=batches)
    base = config_snapshot(model)
    hp = {"fraction": 0.5, "min_heads_per_layer": 1, "importance_batches": 2}
    q = {"dtype": "int8", "granularity": "channel", "embeddings": False, "include_classifier": False}
    recipe = [{"technique": "head_pruning", "phase": "apply", "params": hp,
               "record": reg.get("head_pruning").apply(model, params=hp, ctx=ctx)}]
    after_pruning = param_count(model)
    assert after_pruning < before - 0.5 * 6 * 4 * 384 * 384 * 0.9  # ~half of the attention weights gone
    recipe.append({"technique": "quantization", "phase": "finalize", "params": q,
                   "record": reg.get("quantization").finalize(model, params=q, ctx=ctx)})
    size = save_compressed(model, tmp_path / "m", base_config=base, recipe=recipe)
    # Embeddings stay fp32 (embeddings=False); the pruned encoder Linears are int8 (1 byte per weight plus
    # per-channel scales), so the file is the fp32 embeddings plus about a quarter of the rest in fp32.
    emb = sum(p.numel() for p in model.bert.embeddings.parameters())
    assert 4 * emb < size < 4 * emb + 0.4 * 4 * (after_pruning - emb)
    with torch.inference_mode():
        expected = model(**batch).logits
        assert torch.equal(load_compressed(tmp_path / "m", registry=reg)(**batch).logits, expected)
