"""autocompress export / predict / load: one tiny search (keep_models: all, three enqueued pipelines), then
exports through the real CLI and the library; pure unit tests for the pick and selection functions."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from autocompress.errors import StudyError
from autocompress.export import finished_trial, select_trial
from autocompress.pareto import pick_index
from autocompress.tiny import write_glue_tsv

# Trial 0: head pruning + int8 (exports to ONNX); trial 1: token elimination (exports too);
# trial 2: int8 per tensor without int8 embeddings.
SPEC = """\
study: tiny
model: {{name: {model}, max_length: 32}}
data: {{path: {data}, validation_size: 24}}
baseline: {{max_steps: 15, batch_size: 16, learning_rate: 3.0e-3}}
recovery: {{steps: 2, batch_size: 16}}
measurement: {{latency_examples: 16, repeats: 1, warmup: 0, batch_sizes: [8, 1], max_batches: 2}}
objectives: [accuracy, latency_bs8, size_mb]
techniques:
  head_pruning: {{params: {{fraction: [0.1, 0.7], importance_batches: 2}}}}
  quantization: {{}}
  token_elimination: {{enabled: search}}
search:
  trials: 3
  sampler: random
  keep_models: all
  enqueue:
    - {{head_pruning: {{fraction: 0.5}}, quantization: {{granularity: channel}}}}
    - {{token_elimination: {{keep_final: 0.5}}}}
    - {{quantization: {{granularity: tensor, embeddings: false}}}}
"""


def cli(*args: str, cwd: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "autocompress.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_model_dir):
    """(working dir, env) of a finished three-trial tiny study that kept every trial's model."""
    root = tmp_path_factory.mktemp("export-study")
    data = write_glue_tsv(root / "data")
    (root / "tiny.yaml").write_text(SPEC.format(model=tiny_model_dir, data=data))
    env = {"AUTOCOMPRESS_CACHE": str(root / "cache")}
    cli("search", "tiny.yaml", cwd=root, env=env)
    return root, env


@pytest.fixture
def cache_env(study, monkeypatch):
    root, env = study
    monkeypatch.setenv("AUTOCOMPRESS_CACHE", env["AUTOCOMPRESS_CACHE"])
    return root


def trials(root: Path) -> list[dict]:
    return json.loads((root / "results/tiny/trials.json").read_text())["trials"]


def tiny_batch():
    from autocompress.testing import tiny_batch as batch, tiny_encoded

    return batch(tiny_encoded(16), 8)


# ----------------------------------------------------------------------------------------- end to end


def test_export_by_trial_is_self_contained_and_reproduces_the_trial(study, cache_env):
    import torch

    import autocompress
    from autocompress.modeling import load_compressed

    root, env = study
    proc = cli("export", "tiny", "--trial", "0", "--out", "e0", cwd=root, env=env)
    assert "Verified" in proc.stderr
    e0 = root / "e0"
    for f in ("model.safetensors", "config.json", "recipe.json", "meta.json", "tokenizer_config.json", "README.md",
              "export.json"):
        assert (e0 / f).is_file(), f
    # no pickles anywhere: weights are safetensors, everything else is text
    assert {p.suffix for p in e0.iterdir()} <= {".safetensors", ".json", ".md", ".txt"}
    info = json.loads((e0 / "export.json").read_text())
    row = trials(root)[0]
    assert info["trial"] == 0 and info["pipeline"] == ["head_pruning", "quantization"]
    assert info["metrics"]["eval_accuracy"] == row["metrics"]["eval_accuracy"]
    assert info["verification"]["reproduced"] is True
    assert info["reloaded"]["size_bytes"] == row["metrics"]["size_bytes"]
    assert info["commands"]["search"] == "autocompress search tiny.yaml"
    assert info["commands"]["export"] == "autocompress export tiny --trial 0 --out e0"
    assert {"acc_delta", "eval_acc_delta", "speedup_bs8", "speedup_bs1", "size_reduction"} <= set(info["relative"])
    # the exported folder alone rebuilds the model, with the kept trial model's exact logits
    batch = tiny_batch()
    with torch.inference_mode():
        exported = autocompress.load(str(e0))(**batch).logits
        kept = load_compressed(root / "results/tiny/trials/0")(**batch).logits
    assert torch.equal(exported, kept)
    # ... and the bundled tokenizer + predictor reproduce the recorded held-out accuracy
    lines = (root / "data/dev.tsv").read_text().splitlines()[1:]
    texts, labels = zip(*(line.split("\t") for line in lines))
    logits = autocompress.load_predictor(str(e0)).logits(list(texts))
    accuracy = float(np.mean(logits.argmax(-1) == np.asarray(labels, dtype=int)))
    assert accuracy == pytest.approx(row["metrics"]["eval_accuracy"], abs=1e-12)
    card = (e0 / "README.md").read_text()
    for needle in ("## Metrics", "validation accuracy", "dev accuracy", "latency at batch 8", "latency at batch 1",
                   "size (MB)", "parameters", "pts", "head_pruning", "fraction=0.50", "autocompress search tiny.yaml",
                   "autocompress export tiny --trial 0 --out e0", "reproduced exactly"):
        assert needle in card, needle


def test_predict_prints_label_and_probability_per_text(study, cache_env):
    from typer.testing import CliRunner

    from autocompress.cli import app
    from autocompress.export import export_trial

    root, env = study
    export_trial(root / "results/tiny", root / "e2", trial=2, verify=False, log=lambda s: None)
    out = cli("predict", "e2", "a good great film", "bad dull plot", cwd=root, env=env).stdout.strip().splitlines()
    assert len(out) == 2
    for line, text in zip(out, ("a good great film", "bad dull plot")):
        label, prob, shown = line.split("\t")
        assert label in ("0", "1") and 0.5 <= float(prob) <= 1.0 and shown == text
    result = CliRunner().invoke(app, ["predict", str(root / "e2"), "fun", "--format", "json"])  # in-process: quicker
    doc = json.loads(result.stdout)
    assert doc[0]["text"] == "fun" and doc[0]["label"] in ("0", "1") and 0.5 <= doc[0]["probability"] <= 1.0


def test_pick_knee_best_and_fastest_follow_the_front(study, cache_env):
    from autocompress.export import export_trial

    root, _ = study
    d = root / "results/tiny"
    pareto = json.loads((d / "pareto.json").read_text())
    front = pareto["front"]
    knee = export_trial(d, root / "k", pick="knee", max_drop=100.0, verify=False, log=lambda s: None)
    assert knee["trial"] == pareto["knee"]  # no binding constraint: the report's knee
    assert knee["selection"]["how"] == "knee" and knee["selection"]["constraints"] == {"max_drop": 100.0}
    assert "--pick knee" in (root / "k/README.md").read_text()
    best = export_trial(d, root / "b", pick="best-accuracy", verify=False, log=lambda s: None)
    assert best["metrics"]["accuracy"] == max(r["metrics"]["accuracy"] for r in front)
    fast = export_trial(d, root / "f", pick="fastest", verify=False, log=lambda s: None)
    assert fast["metrics"]["latency_bs8"] == min(r["metrics"]["latency_bs8"] for r in front)
    with pytest.raises(StudyError, match=r"no front point meets.*--max-drop -1000.*best on the front is"):
        export_trial(d, root / "x", pick="knee", max_drop=-1000.0, log=lambda s: None)
    assert not (root / "x").exists()


def test_onnx_export_of_an_int8_pipeline_matches_pytorch(study, cache_env):
    pytest.importorskip("onnxscript", reason="--onnx needs onnxscript: pip install 'autocompress[onnx]'")
    import onnxruntime as ort
    import torch

    import autocompress

    root, env = study
    cli("export", "tiny", "--trial", "0", "--out", "o0", "--onnx", cwd=root, env=env)
    info = json.loads((root / "o0/export.json").read_text())["onnx"]
    assert info["parity"]["agreement"] >= 0.995 and info["parity"]["examples"] == 32
    assert info["int8"]["matmul_nodes"] >= info["int8"]["linears"] > 0
    for runtime in ("onnxruntime", "pytorch"):
        assert {"latency_bs8", "latency_bs1"} <= set(info["latency_ms_per_example"][runtime])
    assert "ONNX Runtime (ms/example)" in (root / "o0/README.md").read_text()
    session = ort.InferenceSession(str(root / "o0/model.onnx"), providers=["CPUExecutionProvider"])
    kinds = {n.op_type for n in __import__("onnx").load(str(root / "o0/model.onnx")).graph.node}
    assert "MatMulInteger" in kinds  # int8 kernels, not a float copy
    batch = tiny_batch()
    got = session.run(None, {i.name: batch[i.name].numpy() for i in session.get_inputs()})[0]
    with torch.inference_mode():
        want = autocompress.load(str(root / "o0"))(**batch).logits.numpy()
    assert np.array_equal(got.argmax(-1), want.argmax(-1)) and np.abs(got - want).max() < 1e-2


def test_onnx_export_of_token_elimination_drops_tokens_in_the_graph(study, cache_env):
    pytest.importorskip("onnxscript", reason="--onnx needs onnxscript: pip install 'autocompress[onnx]'")
    import onnx

    root, env = study
    cli("export", "tiny", "--trial", "1", "--out", "o1", "--onnx", cwd=root, env=env)
    info = json.loads((root / "o1/export.json").read_text())["onnx"]
    assert info["parity"]["agreement"] >= 0.995 and info["int8"] is None
    graph = onnx.load(str(root / "o1/model.onnx")).graph
    # The tokens are gathered away inside the graph (no stable sort needed: ranks are counted comparisons).
    assert any(n.op_type == "GatherElements" for n in graph.node)


def test_onnx_refuses_a_declared_refusal_by_technique_name():
    from autocompress.errors import ModelError
    from autocompress.onnx_export import preflight
    from autocompress.registry import load_registry

    recipe = [{"technique": "quantization", "phase": "finalize", "params": {"dtype": "bf16"}}]
    with pytest.raises(ModelError, match="technique 'quantization': dtype bf16"):
        preflight(recipe, load_registry())


def test_export_errors_name_the_problem_and_the_fix(study, cache_env, tmp_path):
    from autocompress.export import export_trial

    root, env = study
    proc = cli("export", "nothing-here", "--trial", "0", "--out", "z", cwd=root, env=env, check=False)
    assert proc.returncode == 2 and "no study 'nothing-here'" in proc.stderr
    # a trial whose model folder is gone: say how to get it back, do not retrain silently
    copy = tmp_path / "results"
    shutil.copytree(root / "results/tiny", copy / "tiny", ignore=shutil.ignore_patterns("0", "1"))
    shutil.rmtree(copy / "tiny/trials/2")
    with pytest.raises(StudyError) as err:
        export_trial(copy / "tiny", tmp_path / "out", trial=2, log=lambda s: None)
    msg = str(err.value)
    assert "trial 2's model folder" in msg and "search.keep_models=all" in msg and "autocompress search" in msg
    assert '"quantization": {' in msg and "--trial 0" in msg
    # an existing, non-empty --out is not overwritten without --force
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy/file").write_text("x")
    with pytest.raises(StudyError, match="--force"):
        export_trial(root / "results/tiny", tmp_path / "busy", trial=2, log=lambda s: None)
    with pytest.raises(StudyError, match="not a previous export"):  # --force never wipes a folder that is not ours
        export_trial(root / "results/tiny", tmp_path / "busy", trial=2, force=True, log=lambda s: None)
    assert (tmp_path / "busy/file").read_text() == "x"


# --------------------------------------------------------------------------------------- pure functions

OBJ = [("accuracy", "maximize"), ("latency_bs8", "minimize"), ("size_mb", "minimize")]


def row(n, acc, lat, size, *, state="COMPLETE", **extra):
    return {"number": n, "state": state, "pipeline": ["quantization"], "params": {}, "feasible": True,
            "metrics": {"accuracy": acc, "latency_bs8": lat, "size_mb": size, **extra}}


BASE = {"accuracy": 0.90, "latency_bs8": 4.0, "size_mb": 90.0}
FRONT = [row(1, 0.90, 3.0, 60.0), row(2, 0.89, 2.0, 58.0), row(3, 0.85, 1.0, 20.0)]


def test_pick_index_knee_best_and_allowed():
    v = np.array([[0.0, 1.0], [0.2, 0.2], [1.0, 0.0], [0.6, 0.6]])  # a convex front with its knee at row 1
    dirs = ["minimize", "minimize"]
    assert pick_index(v, dirs, "knee") == 1
    assert pick_index(v, dirs, "knee", allowed=[True, False, True, True]) == 3  # re-normalised without row 1
    assert pick_index(v, dirs, "best", column=0) == 0
    assert pick_index(v, dirs, "best", column=1) == 2
    assert pick_index(v, dirs, "best", column=1, allowed=[True, True, False, True]) == 1
    assert pick_index(v, dirs, "knee", allowed=[False] * 4) is None


def test_pick_index_breaks_ties_on_later_columns_and_skips_nan():
    v = np.array([[0.9, 3.0], [0.9, 2.0], [np.nan, 0.1], [0.8, 1.0]])
    assert pick_index(v, ["maximize", "minimize"], "best", column=0) == 1
    assert pick_index(v, ["maximize", "minimize"], "best", column=1) == 3
    with pytest.raises(ValueError, match="how must be one of"):
        pick_index(v, ["maximize", "minimize"], "median")
    with pytest.raises(ValueError, match="column 5"):
        pick_index(v, ["maximize", "minimize"], "best", column=5)


def select(**kw):
    return select_trial(FRONT, FRONT, BASE, OBJ, batch_sizes=[8, 1], **kw)


def test_select_trial_picks_and_constraints():
    assert select(pick="best-accuracy").row["number"] == 1
    assert select(pick="fastest").row["number"] == 3
    assert select(pick="fastest", max_drop=1.0).row["number"] == 2  # trial 3 drops 5 points
    assert select(pick="knee", max_drop=1.0).candidates == [1, 2]
    assert select(pick="knee", max_size_mb=59).row["number"] in (2, 3)
    assert select(pick="fastest", max_latency_ms=2.5, max_drop=1.0).row["number"] == 2
    assert select(trial=3).how == "trial"


def test_select_trial_errors():
    with pytest.raises(StudyError, match="best on the front is 0 \\(trial 1\\)"):
        select(pick="knee", max_drop=-1.0)
    with pytest.raises(StudyError, match="exactly one of --trial N or --pick"):
        select()
    with pytest.raises(StudyError, match="exactly one of"):
        select(trial=1, pick="knee")
    with pytest.raises(StudyError, match="Did you mean 'fastest'"):
        select(pick="fastst")
    with pytest.raises(StudyError, match="--max-drop.*with --pick"):
        select(trial=1, max_drop=1.0)
    with pytest.raises(StudyError, match="--max-size-mb 0: must be > 0"):
        select(pick="knee", max_size_mb=0)
    with pytest.raises(StudyError, match="no Pareto front yet"):
        select_trial(FRONT, [], BASE, OBJ, batch_sizes=[8], pick="knee")


def test_finished_trial_says_why_a_trial_cannot_be_exported():
    rows = [row(0, 0.9, 1, 1), {"number": 1, "state": "FAIL", "fail_reason": "boom"},
            {"number": 2, "state": "PRUNED"}, {"number": 3, "state": "RUNNING"}]
    assert finished_trial(rows, 0)["number"] == 0
    with pytest.raises(StudyError, match="trial 1 failed \\(boom\\).*finished trials: 0"):
        finished_trial(rows, 1)
    with pytest.raises(StudyError, match="skipped"):
        finished_trial(rows, 2)
    with pytest.raises(StudyError, match="RUNNING"):
        finished_trial(rows, 3)
    with pytest.raises(StudyError, match="no trial 9"):
        finished_trial(rows, 9)


def test_onnx_support_defaults_and_built_in_refusals():
    from autocompress.registry import load_registry
    from autocompress.technique import Technique

    assert Technique().onnx_support({}) is None and Technique().onnx_prepare(None, params={}, record=None) is None
    reg = load_registry()
    assert "bf16" in reg.get("quantization").onnx_support({"dtype": "bf16"})
    assert reg.get("quantization").onnx_support({"dtype": "int8"}) is None
    for name in ("head_pruning", "low_rank", "weight_sharing", "distillation", "movement_pruning", "token_elimination"):
        assert reg.get(name).onnx_support(reg.get(name).defaults()) is None, name
