"""Hardening (issue 6), the base model: a missing or corrupt model folder, an architecture a technique does
not support, a model that needs its own code. Each ends in a message that names model.name and the fix,
exit code 2, before the baseline is fine-tuned; a model's own code is never run unless the spec says so."""

from __future__ import annotations

import json
import shutil

import pytest

from hardening_helpers import cli, hardening_cache, tiny_spec  # noqa: F401 - cli, hardening_cache: fixtures


@pytest.fixture
def spec_path(tmp_path, tiny_model_dir, tiny_data_dir):
    return tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir, trials=1)


def assert_model_error(res, *needles):
    assert res.code == 2, res.text
    assert "Traceback" not in res.text and "error:" in res.err
    for needle in needles:
        assert needle in res.err, (needle, res.err)
    assert "Fine-tuning" not in res.err


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_model_directory(cli, spec_path, tmp_path):
    res = cli("search", spec_path, "--set", f"model.name={tmp_path / 'no-model'}")
    assert_model_error(res, "model.name", "no-model", "no such directory", "give an existing model directory")


def test_folder_without_config(cli, spec_path, tmp_path):
    (tmp_path / "empty-model").mkdir()
    res = cli("search", spec_path, "--set", f"model.name={tmp_path / 'empty-model'}")
    assert_model_error(res, "is a path but has no config.json", "point it at a Hugging Face model directory")


def test_corrupt_config(cli, spec_path, tmp_path, tiny_model_dir):
    d = copy_model(tiny_model_dir, tmp_path / "m")
    (d / "config.json").write_text('{"model_type": "bert", ')
    res = cli("search", spec_path, "--set", f"model.name={d}")
    assert_model_error(res, f"model.name '{d}'", "is not a valid JSON file",
                       "point model.name at a complete Hugging Face model folder")


def test_corrupt_weights(cli, spec_path, tmp_path, tiny_model_dir):
    d = copy_model(tiny_model_dir, tmp_path / "m")
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a truncated download
    res = cli("search", spec_path, "--set", f"model.name={d}")
    assert_model_error(res, "could not load model weights from model.name", "invalid header length",
                       "model.safetensors, as written by save_pretrained")


@pytest.fixture(scope="module")
def tiny_distilbert_dir(tmp_path_factory):
    from transformers import DistilBertConfig, DistilBertModel, DistilBertTokenizer

    from autocompress.tiny import tiny_vocab

    d = tmp_path_factory.mktemp("tiny-distilbert")
    DistilBertTokenizer(vocab={w: i for i, w in enumerate(tiny_vocab())}, do_lower_case=True).save_pretrained(d)
    config = DistilBertConfig(vocab_size=len(tiny_vocab()), dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                              max_position_embeddings=64)
    DistilBertModel(config).save_pretrained(d)
    return d


def test_architecture_a_technique_does_not_support(cli, spec_path, tiny_distilbert_dir):
    res = cli("search", spec_path, "--set", f"model.name={tiny_distilbert_dir}")
    assert_model_error(res, "technique 'head_pruning' does not support model.name",
                       "(DistilBertForSequenceClassification)", "head pruning needs a BERT-like model",
                       "Set techniques.head_pruning.enabled: false")


def test_model_code_is_never_run_unless_trusted(cli, spec_path, tmp_path, tiny_model_dir):
    d = copy_model(tiny_model_dir, tmp_path / "custom")
    config = json.loads((d / "config.json").read_text())
    config.update(model_type="fancybert", auto_map={"AutoConfig": "configuration_fancy.FancyConfig",
                                                    "AutoModel": "modeling_fancy.FancyModel"})
    (d / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "code-ran"
    for module in ("configuration_fancy.py", "modeling_fancy.py"):
        (d / module).write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    res = cli("search", spec_path, "--set", f"model.name={d}")
    assert_model_error(res, "needs its own Python code", "model_type 'fancybert'",
                       "set model.trust_remote_code: true only if you trust the code in that folder")
    assert not marker.exists()


def test_trust_remote_code_is_off_unless_the_spec_says_so():
    from autocompress.spec import ModelSpec

    assert ModelSpec().trust_remote_code is False
    assert ModelSpec.model_fields["trust_remote_code"].default is False
