from __future__ import annotations

import json

import pytest
import torch

import autocompress
from autocompress.errors import ModelError, PluginError
from autocompress.modeling import config_snapshot, load_compressed, param_count, save_compressed
from autocompress.registry import load_registry
from autocompress.technique import TechniqueContext


def _batches(n, *, vocab=29, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        ids = torch.randint(5, vocab, (4, 10), generator=g)
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (4,), generator=g)}


@pytest.fixture(scope="module")
def registry():
    return load_registry(selection="builtin")


def compress(model, registry, pipeline):
    ctx = TechniqueContext(train_batches=lambda n: _batches(n))
    base = config_snapshot(model)
    recipe = []
    for name, params in pipeline.items():
        rec = registry.get(name).apply(model, params=params, ctx=ctx)
        if rec is not None:
            recipe.append({"technique": name, "phase": "apply", "params": params, "record": rec})
    for name, params in pipeline.items():
        rec = registry.get(name).finalize(model, params=params, ctx=ctx)
        if rec is not None:
            recipe.append({"technique": name, "phase": "finalize", "params": params, "record": rec})
    return base, recipe


@pytest.mark.parametrize(
    "pipeline",
    [
        {},
        {"head_pruning": {"fraction": 0.5, "min_heads_per_layer": 1, "importance_batches": 2}},
        {"quantization": {"dtype": "int8", "granularity": "channel", "embeddings": False, "include_classifier": False}},
        {"head_pruning": {"fraction": 0.5, "min_heads_per_layer": 1, "importance_batches": 2},
         "quantization": {"dtype": "int8", "granularity": "tensor", "embeddings": False, "include_classifier": True}},
    ],
    ids=["plain", "pruned", "int8", "pruned+int8"],
)
def test_save_reload_gives_identical_logits(tmp_path, tiny_model, tiny_inputs, registry, pipeline):
    base, recipe = compress(tiny_model, registry, pipeline)
    size = save_compressed(tiny_model, tmp_path / "m", base_config=base, recipe=recipe)
    assert size == sum((tmp_path / "m" / f).stat().st_size for f in ("model.safetensors", "config.json", "recipe.json"))
    with torch.inference_mode():
        expected = tiny_model(**tiny_inputs).logits
    reloaded = autocompress.load(str(tmp_path / "m"))
    with torch.inference_mode():
        assert torch.equal(reloaded(**tiny_inputs).logits, expected)
    assert param_count(reloaded) == param_count(tiny_model)
    assert not list(tmp_path.glob("m/*.bin")) and not list(tmp_path.glob("m/*.pt"))  # no pickles written


def test_pruned_and_quantised_model_is_smaller_on_disk(tmp_path, registry):
    from autocompress.tiny import make_tiny_classifier

    sizes = {}
    for label, pipeline in {
        "plain": {},
        "pruned": {"head_pruning": {"fraction": 0.5, "min_heads_per_layer": 1, "importance_batches": 2}},
        "pruned+int8": {"head_pruning": {"fraction": 0.5, "min_heads_per_layer": 1, "importance_batches": 2},
                        "quantization": {"dtype": "int8", "granularity": "channel", "embeddings": False, "include_classifier": False}},
    }.items():
        model = make_tiny_classifier(hidden=64, intermediate=256)
        base, recipe = compress(model, registry, pipeline)
        sizes[label] = save_compressed(model, tmp_path / label, base_config=base, recipe=recipe)
    assert sizes["pruned"] < sizes["plain"]
    assert sizes["pruned+int8"] < 0.5 * sizes["pruned"]


def test_load_errors_are_clear(tmp_path, tiny_model, registry):
    with pytest.raises(ModelError, match="model.safetensors is missing|config.json is missing"):
        load_compressed(tmp_path)
    base, recipe = compress(tiny_model, registry, {})
    save_compressed(tiny_model, tmp_path / "m", base_config=base,
                    recipe=[{"technique": "mystery", "phase": "apply", "params": {}, "record": {}}])
    with pytest.raises(PluginError, match="technique 'mystery'"):
        load_compressed(tmp_path / "m", registry=registry)
    (tmp_path / "m" / "recipe.json").write_text("{not json")
    with pytest.raises(ModelError, match="corrupt JSON"):
        load_compressed(tmp_path / "m", registry=registry)


def test_recipe_is_plain_json(tmp_path, tiny_model, registry):
    base, recipe = compress(tiny_model, registry, {"head_pruning": {"fraction": 0.25, "min_heads_per_layer": 1, "importance_batches": 1}})
    save_compressed(tiny_model, tmp_path / "m", base_config=base, recipe=recipe)
    data = json.loads((tmp_path / "m" / "recipe.json").read_text())
    assert data[0]["technique"] == "head_pruning" and len(data[0]["record"]["kept_heads"]) == 2
