"""measurement.runtime: onnxruntime -- every trial (and the baseline) is exported and measured in ONNX
Runtime; the PyTorch figures are kept beside them."""

from __future__ import annotations

import json

import pytest

from tests.conftest import write_tiny_spec

pytest.importorskip("onnxscript", reason="needs the onnx extra: pip install 'autocompress[onnx]'")


def test_search_measured_in_onnxruntime(tmp_path, tiny_model_dir, tiny_data_dir, isolated_cache):
    from typer.testing import CliRunner

    from autocompress.cli import app

    spec = write_tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir, study="ort", trials=2,
                           extra="search: {trials: 2, sampler: random, seed: 0, enqueue: "
                                 "[{head_pruning: {fraction: 0.5}, quantization: {granularity: channel}}]}\n"
                           ).read_text()
    spec = spec.replace("search: {trials: 2, sampler: random, seed: 0}\n", "")
    spec = spec.replace("max_batches: 2}", "max_batches: 2, runtime: onnxruntime}")
    path = tmp_path / "ort.yaml"
    path.write_text(spec)
    result = CliRunner().invoke(app, ["search", str(path), "--results-dir", str(tmp_path / "results")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "results/ort/trials.json").read_text())
    base = data["baseline"]["metrics"] if "metrics" in data["baseline"] else data["baseline"]
    assert base["runtime"].startswith("onnxruntime") and "pytorch_latency_bs8" in base
    t0 = next(r for r in data["trials"] if r["number"] == 0)
    m = t0["metrics"]
    assert t0["state"] == "COMPLETE" and "DynamicQuantizeLinear" in m["runtime"]
    assert m["latency_bs8"] > 0 and m["pytorch_latency_bs8"] > 0 and m["onnx_size_mb"] > 0
    assert 0 <= m["eval_accuracy"] <= 1 and 0 <= m["pytorch_eval_accuracy"] <= 1
    assert m["onnx_export_seconds"] > 0 and m["compute_seconds"] > 0
