"""autocompress profile: parameter, byte and FLOP accounting against hand-computed values on the tiny model
(hidden 32, 4 heads of 8, FFN 64, 2 layers, vocabulary 33, 2 labels) for an unmodified, a head-pruned, a
factorised, a token-eliminated, a weight-shared and an int8 model; timing consistency; the CLI (table,
json, --compare, --plot, study references, errors) and the report's links."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from autocompress.measure import flops_per_example
from autocompress.modeling import config_snapshot, param_count, save_compressed
from autocompress.profile import (classify, count_flops, profile_model, safetensors_tensor_bytes,
                                  storage_accounting, synthetic_inputs)
from autocompress.technique import TechniqueContext
from autocompress.tiny import make_tiny_classifier, tiny_vocab

H, HEADS, DH, FFN, L = 32, 4, 8, 64, 16  # tiny model sizes; L = profiled sequence length
VOCAB = len(tiny_vocab())
# Hand-computed, one unmodified layer: weights + biases; FLOPs per example = 2 x in x out x tokens.
QKV_PARAMS = 3 * (H * H + H)
OUT_PARAMS = H * H + H
FFN_PARAMS = (H * FFN + FFN) + (FFN * H + H)
NORM_PARAMS = 2 * (2 * H)
EMB_PARAMS = (VOCAB + 64 + 2) * H  # word, position (max 64), token type (2)
HEAD_PARAMS = (H * H + H) + (H * 2 + 2)  # pooler + classifier


def qkv_flops(d: int, tokens: int) -> int:
    return 3 * 2 * H * d * tokens


def core_flops(d: int, tokens: int) -> int:
    return 4 * tokens * tokens * d  # QK^T and attention x V over d = heads x head size


def out_flops(d: int, tokens: int) -> int:
    return 2 * d * H * tokens


def ffn_flops(tokens: int, width: int = FFN) -> int:
    return 2 * 2 * H * width * tokens


def cells(profile: dict) -> dict[tuple[str, str], dict]:
    return {(r["scope"], r["component"]): r for r in profile["rows"]}


def static(model) -> dict:
    return profile_model(model, seq_len=L, timing=False, label="tiny")


def torch_flops(model) -> float:
    return flops_per_example(model, synthetic_inputs(VOCAB, L, 1))


def saved_tensor_bytes(model, tmp_path: Path) -> int:
    from safetensors.torch import save_model

    save_model(model, str(tmp_path / "m.safetensors"))
    return safetensors_tensor_bytes(str(tmp_path / "m.safetensors"))


# ---------------------------------------------------------------------------------------- accounting


def test_unmodified_layer_matches_hand_computed_values(tmp_path):
    model = make_tiny_classifier()
    p = static(model)
    c = cells(p)
    for i in range(2):
        layer = f"layer {i}"
        assert c[(layer, "qkv")]["params"] == QKV_PARAMS
        assert c[(layer, "attention_output")]["params"] == OUT_PARAMS
        assert c[(layer, "ffn")]["params"] == FFN_PARAMS
        assert c[(layer, "layer_norm")]["params"] == NORM_PARAMS
        assert c[(layer, "qkv")]["flops_per_example"] == qkv_flops(H, L)
        assert c[(layer, "attention_core")]["flops_per_example"] == core_flops(H, L)
        assert c[(layer, "attention_core")]["params"] == 0
        assert c[(layer, "attention_output")]["flops_per_example"] == out_flops(H, L)
        assert c[(layer, "ffn")]["flops_per_example"] == ffn_flops(L)
        assert c[(layer, "layer_norm")]["flops_per_example"] == 0
        assert c[(layer, "ffn")]["flops_per_token"] == ffn_flops(L) / L
    assert c[("embeddings", "embeddings")]["params"] == EMB_PARAMS
    assert c[("embeddings", "embeddings")]["flops_per_example"] == 0  # a lookup
    assert c[("embeddings", "layer_norm")]["params"] == 2 * H
    assert c[("head", "classifier")]["params"] == HEAD_PARAMS
    assert c[("head", "classifier")]["flops_per_example"] == 2 * H * H + 2 * H * 2  # [CLS] only
    total = p["totals"]["total"]
    assert total["params"] == sum(t.numel() for t in model.parameters()) == param_count(model) == p["param_count"]
    assert total["params"] == EMB_PARAMS + 2 * H + 2 * (QKV_PARAMS + OUT_PARAMS + FFN_PARAMS + NORM_PARAMS) + HEAD_PARAMS
    assert total["bytes"] == 4 * total["params"] == saved_tensor_bytes(model, tmp_path)
    assert total["flops_per_example"] == torch_flops(model)  # the study's FLOP counter agrees exactly
    shares = p["totals"]
    assert sum(shares[c]["share"]["params"] for c in shares if c != "total") == pytest.approx(1.0)
    assert [e["tokens_attention"] for e in p["layers"]] == [L, L] and [e["heads"] for e in p["layers"]] == [4, 4]


def test_head_pruned_layer_counts_only_the_kept_heads(tmp_path):
    from autocompress.surgery import prune_heads

    model = make_tiny_classifier()
    prune_heads(model, [[0, 3], [0, 1, 2, 3]])  # layer 0 keeps 2 of 4 heads
    d = 2 * DH
    c = cells(static(model))
    assert c[("layer 0", "qkv")]["params"] == 3 * (H * d + d)
    assert c[("layer 0", "attention_output")]["params"] == d * H + H
    assert c[("layer 0", "qkv")]["flops_per_example"] == qkv_flops(d, L)
    assert c[("layer 0", "attention_core")]["flops_per_example"] == core_flops(d, L)
    assert c[("layer 0", "attention_output")]["flops_per_example"] == out_flops(d, L)
    assert c[("layer 0", "ffn")]["flops_per_example"] == ffn_flops(L)  # untouched
    assert c[("layer 1", "qkv")]["params"] == QKV_PARAMS
    p = static(model)
    assert p["layers"][0]["heads"] == 2 and p["layers"][1]["heads"] == 4
    assert p["totals"]["total"]["params"] == sum(t.numel() for t in model.parameters())
    assert p["totals"]["total"]["bytes"] == saved_tensor_bytes(model, tmp_path)
    assert p["totals"]["total"]["flops_per_example"] == torch_flops(model)


def test_factorised_layer_counts_both_factors(tmp_path):
    from plugins.low_rank import LowRankFactorization

    model = make_tiny_classifier()
    record = LowRankFactorization().apply(model, params={"mode": "rank", "attention": 0.25, "ffn": 0.25,
                                                         "embedding_dim": 0}, ctx=TechniqueContext())
    assert set(record["factorized"].values()) == {8}  # rank 8 everywhere (ceil(0.25 x 32), multiple of 8)
    r = 8
    c = cells(static(model))
    # query: first (32 -> 8, no bias) + second (8 -> 32, bias); FLOPs 2 x (32 x 8 + 8 x 32) per token.
    assert c[("layer 0", "qkv")]["params"] == 3 * (H * r + r * H + H)
    assert c[("layer 0", "qkv")]["flops_per_example"] == 3 * 2 * (H * r + r * H) * L
    assert c[("layer 0", "attention_output")]["params"] == H * r + r * H + H
    assert c[("layer 0", "ffn")]["params"] == (H * r + r * FFN + FFN) + (FFN * r + r * H + H)
    assert c[("layer 0", "ffn")]["flops_per_example"] == 2 * (H * r + r * FFN + FFN * r + r * H) * L
    assert c[("layer 0", "attention_core")]["flops_per_example"] == core_flops(H, L)  # heads unchanged
    p = static(model)
    assert p["layers"][0]["modules"] == {"low-rank": 6}
    assert p["totals"]["total"]["params"] == sum(t.numel() for t in model.parameters())
    assert p["totals"]["total"]["bytes"] == saved_tensor_bytes(model, tmp_path)
    assert p["totals"]["total"]["flops_per_example"] == torch_flops(model)


def test_token_eliminated_layer_counts_the_tokens_each_part_sees():
    from plugins.token_elimination import TokenElimination

    model = make_tiny_classifier()
    record = TokenElimination().apply(model, params={**TokenElimination().defaults(), "keep_final": 0.5},
                                      ctx=TechniqueContext())
    assert record["fractions"] == [0.75, 0.5]  # kept after layer 0 and 1: ceil(0.75 x 16) = 12, ceil(0.5 x 16) = 8
    p = static(model)
    c = cells(p)
    # Layer 0: attention (and its output projection) on 16 tokens, FFN on the 12 kept; layer 1: 12, then 8.
    for layer, t_in, t_out in (("layer 0", 16, 12), ("layer 1", 12, 8)):
        assert c[(layer, "qkv")]["flops_per_example"] == qkv_flops(H, t_in)
        assert c[(layer, "attention_core")]["flops_per_example"] == core_flops(H, t_in)
        assert c[(layer, "attention_output")]["flops_per_example"] == out_flops(H, t_in)
        assert c[(layer, "ffn")]["flops_per_example"] == ffn_flops(t_out)
        assert c[(layer, "ffn")]["params"] == FFN_PARAMS  # no weight removed
    assert [(e["tokens_attention"], e["tokens_ffn"]) for e in p["layers"]] == [(16, 12), (12, 8)]
    assert p["totals"]["total"]["flops_per_example"] == torch_flops(model)


def test_shared_layers_count_bytes_once_and_flops_at_every_use(tmp_path):
    from plugins.weight_sharing import WeightSharing

    model = make_tiny_classifier()
    WeightSharing().apply(model, params={**WeightSharing().defaults(), "mode": "all", "init": "first"},
                          ctx=TechniqueContext())
    assert model.bert.encoder.layer[0] is model.bert.encoder.layer[1]
    p = static(model)
    c = cells(p)
    assert c[("layer 0", "ffn")]["params"] == FFN_PARAMS
    assert ("layer 1", "qkv") not in c or c[("layer 1", "qkv")]["params"] == 0  # stored once, at layer 0
    assert c[("layer 1", "ffn")]["flops_per_example"] == ffn_flops(L)  # but it runs twice
    assert c[("layer 1", "attention_core")]["flops_per_example"] == core_flops(H, L)
    assert p["layers"][1]["shared_with"] == 0 and p["layers"][0]["shared_with"] is None
    layer_params = QKV_PARAMS + OUT_PARAMS + FFN_PARAMS + NORM_PARAMS
    assert p["totals"]["total"]["params"] == EMB_PARAMS + 2 * H + layer_params + HEAD_PARAMS
    assert p["totals"]["total"]["params"] == sum(t.numel() for t in model.parameters()) == param_count(model)
    assert p["totals"]["total"]["bytes"] == saved_tensor_bytes(model, tmp_path)
    assert p["totals"]["total"]["flops_per_example"] == torch_flops(model)


def test_int8_bytes_are_one_per_weight_plus_scales(tmp_path):
    from plugins.quantization import Quantization

    model = make_tiny_classifier()
    Quantization().finalize(model, params={**Quantization().defaults(), "granularity": "channel",
                                           "embeddings": False}, ctx=TechniqueContext())
    p = static(model)
    c = cells(p)
    # q, k, v: int8 [32, 32] + float32 scale per output row + float32 bias, each.
    assert c[("layer 0", "qkv")]["bytes"] == 3 * (H * H * 1 + H * 4 + H * 4)
    assert c[("layer 0", "qkv")]["params"] == 3 * H * H  # int8 weights count as parameters (biases are buffers)
    assert c[("layer 0", "qkv")]["flops_per_example"] == qkv_flops(H, L)  # same work in int8 arithmetic
    assert c[("layer 0", "layer_norm")]["bytes"] == 4 * NORM_PARAMS  # stays float32
    assert p["totals"]["total"]["params"] == param_count(model)
    assert p["totals"]["total"]["bytes"] == saved_tensor_bytes(model, tmp_path)
    assert p["layers"][0]["modules"]["int8"] == 6  # q, k, v, attention output, intermediate, output


def test_classify_by_path_and_storage_without_plugins():
    assert classify("bert.encoder.layer.3.attention.self.query.first") == "qkv"
    assert classify("bert.encoder.layer.3.attention.self") == "attention_core"
    assert classify("bert.encoder.layer.3.attention.output.dense") == "attention_output"
    assert classify("bert.encoder.layer.3.attention.output.LayerNorm", norm=True) == "layer_norm"
    assert classify("bert.encoder.layer.3.intermediate.dense") == "ffn"
    assert classify("bert.encoder.layer.3.output.dense") == "ffn"
    assert classify("bert.embeddings.word_embeddings.projection") == "embeddings"
    assert classify("bert.pooler.dense") == "classifier" and classify("classifier") == "classifier"
    assert classify("dropout") == "other"
    model = make_tiny_classifier()
    storage = storage_accounting(model)
    assert sum(v["params"] for v in storage.values()) == param_count(model)
    flops, tokens = count_flops(model, {"input_ids": torch.full((2, 5), 7), "attention_mask": torch.ones(2, 5)})
    assert flops[("layer 1", "attention_core")] == core_flops(H, 5)  # per example, whatever the batch
    assert tokens == {0: {"attention": 5, "ffn": 5}, 1: {"attention": 5, "ffn": 5}}


# -------------------------------------------------------------------------------------------- timing


def test_timing_parts_add_up_and_hooks_are_removed():
    from plugins.weight_sharing import WeightSharing

    model = make_tiny_classifier()
    WeightSharing().apply(model, params={**WeightSharing().defaults(), "mode": "all", "init": "first"},
                          ctx=TechniqueContext())
    p = profile_model(model, seq_len=L, batch_sizes=(1, 4), examples=4, warmup=0, repeats=1, label="tiny")
    for bs in ("1", "4"):
        lat = p["latency"][bs]
        assert lat["whole_model_ms"] > 0 and lat["examples"] == 4 and lat["paired_ratio"] > 0
        assert sum(r["time_ms"][bs] for r in p["rows"]) == pytest.approx(lat["components_total_ms"])
        assert p["totals"]["total"]["time_ms"][bs] == pytest.approx(lat["components_total_ms"])
        assert all(r["time_ms"][bs] >= 0 for r in p["rows"])
        c = cells(p)
        # A shared layer object is timed at each position it runs at.
        assert c[("layer 0", "attention_core")]["time_ms"][bs] > 0 and c[("layer 1", "attention_core")]["time_ms"][bs] > 0
        assert c[("layer 1", "ffn")]["time_ms"][bs] > 0
    hooks = [m for m in model.modules() if m._forward_hooks or m._forward_pre_hooks]
    assert hooks == []


# ----------------------------------------------------------------------------------------------- CLI


def _saved(model, d: Path, recipe: list) -> Path:
    save_compressed(model, d, base_config=config_snapshot(make_tiny_classifier()), recipe=recipe)
    return d


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    from autocompress.surgery import prune_heads

    root = tmp_path_factory.mktemp("profile-models")
    base = _saved(make_tiny_classifier(), root / "base", [])
    pruned = make_tiny_classifier()
    keep = [[0, 1], [2]]
    prune_heads(pruned, keep)
    step = {"technique": "head_pruning", "phase": "apply", "params": {"fraction": 0.5},
            "record": {"kept_heads": keep, "heads_before": [4, 4]}}
    return base, _saved(pruned, root / "pruned", [step])


def test_cli_table_json_compare_and_plot(model_dirs, tmp_path):
    from autocompress.cli import app

    base, pruned = model_dirs
    runner = CliRunner()
    res = runner.invoke(app, ["profile", str(pruned), "--no-time", "--seq-len", str(L), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "Q/K/V projections" in res.output and "attention core" in res.output and "layer 1" in res.output
    res = runner.invoke(app, ["profile", str(pruned), "--compare", str(base), "--format", "json", "--seq-len", str(L),
                              "--device", "cpu", "--batch-sizes", "1,2", "--examples", "2", "--repeats", "1",
                              "--plot", str(tmp_path / "p.png")])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output[res.output.index("{"):])
    ratios = out["comparison"]["ratios"]
    # 3 of 8 heads kept: Q/K/V and the output projection shrink to 3/8, the FFN not at all.
    assert ratios["qkv"]["flops_per_token"] == pytest.approx(3 / 8)
    assert ratios["attention_output"]["flops_per_token"] == pytest.approx(3 / 8)
    assert ratios["ffn"]["params"] == 1.0 and ratios["embeddings"]["bytes"] == 1.0
    assert set(ratios["total"]["time_ms"]) == {"1", "2"}
    assert [e["heads"] for e in out["comparison"]["layers"]["model"]] == [2, 1]
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    res = runner.invoke(app, ["profile", str(pruned), "--compare", str(base), "--no-time", "--seq-len", str(L),
                              "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "4 → 2" in res.output and "4 → 1" in res.output  # heads per layer, reference → model


def test_cli_errors_name_the_problem(model_dirs, tmp_path):
    from autocompress.cli import app
    from autocompress.errors import AutocompressError

    base, _ = model_dirs
    runner = CliRunner()
    for args, words in ((["./no/such/model"], "is not a study reference"),
                        (["nostudy:3"], "no study 'nostudy'"),
                        ([str(base), "--plot", str(tmp_path / "p.jpg")], "ending in .png"),
                        ([str(base), "--format", "yaml"], "--format 'yaml'"),
                        ([str(base), "--batch-sizes", "0,x"], "--batch-sizes"),
                        ([str(tmp_path)], "not a model")):
        res = runner.invoke(app, ["profile", *args, "--no-time", "--results-dir", str(tmp_path)])
        assert res.exit_code != 0
        assert isinstance(res.exception, AutocompressError), (args, res.exception)
        assert words in str(res.exception), (args, str(res.exception))


def test_study_references_front_profiles_and_report_links(tmp_path, tiny_model_dir, monkeypatch):
    """A one-trial tiny study: STUDY:N, STUDY:baseline, STUDY alone (an error), --front and report links."""
    from autocompress.cli import app
    from autocompress.tiny import write_glue_tsv

    monkeypatch.setenv("AUTOCOMPRESS_CACHE", str(tmp_path / "cache"))
    data = write_glue_tsv(tmp_path / "data", train=48, dev=16)
    spec = tmp_path / "s.yaml"
    spec.write_text(
        f"study: tp\nmodel: {{name: {tiny_model_dir}, max_length: 16}}\ndata: {{path: {data}, validation_size: 12}}\n"
        "baseline: {max_steps: 2, batch_size: 16}\nrecovery: {steps: 0}\n"
        "measurement: {latency_examples: 4, repeats: 1, warmup: 0, batch_sizes: [4]}\n"
        "objectives: [accuracy, latency_bs4]\ntechniques:\n  head_pruning: {params: {fraction: 0.5, importance_batches: 1}}\n"
        "search: {trials: 1, keep_models: front, enqueue: [{head_pruning: {fraction: 0.5}}]}\n")
    results = tmp_path / "results"
    runner = CliRunner()
    res = runner.invoke(app, ["search", str(spec), "--results-dir", str(results)])
    assert res.exit_code == 0, res.output
    report = (results / "tp" / "report.md").read_text()
    assert "autocompress profile tp --front" in report and "autocompress profile tp:0 --compare tp:baseline" in report
    res = runner.invoke(app, ["profile", "tp:0", "--compare", "tp:baseline", "--no-time", "--format", "json",
                              "--results-dir", str(results)])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output[res.output.index("{"):])
    assert out["profile"]["seq_len"] == 16  # the study's model.max_length
    assert out["profile"]["source"]["kind"] == "trial" and out["reference"]["source"]["kind"] == "baseline"
    assert out["comparison"]["ratios"]["qkv"]["params"] < 1
    res = runner.invoke(app, ["profile", "tp", "--trial", "0", "--no-time", "--results-dir", str(results)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["profile", "tp", "--no-time", "--results-dir", str(results)])
    assert res.exit_code != 0 and "tp:N for trial N" in str(res.exception)
    res = runner.invoke(app, ["profile", "tp", "--front", "--batch-sizes", "1", "--examples", "2", "--repeats", "1",
                              "--device", "cpu", "--results-dir", str(results)])
    assert res.exit_code == 0, res.output
    assert (results / "tp" / "profiles" / "trial-0.png").is_file()
    saved = json.loads((results / "tp" / "profiles" / "trial-0.json").read_text())
    assert saved["comparison"]["reference"] == "tp baseline"
    report = (results / "tp" / "report.md").read_text()
    assert "[profile vs baseline](profiles/trial-0.md)" in report
