"""The fine-tuned baseline's cache key names the base model by content, not by where it is installed."""
from __future__ import annotations

import shutil

from conftest import write_tiny_spec

from autocompress import baseline as baseline_mod
from autocompress import engine
from autocompress.data import load_task_data
from autocompress.modeling import model_fingerprint, resolve_model_path
from autocompress.spec import load_spec, without_later_defaults


def _location(tmp_path, model_dir, data_dir):
    spec = load_spec(write_tiny_spec(tmp_path, model_dir, data_dir))
    return engine.baseline_location(spec, load_task_data(spec.data, seed=spec.seed))


def test_the_same_model_in_another_place_has_the_same_key(tmp_path, tiny_model_dir, tiny_data_dir, isolated_cache):
    copy = shutil.copytree(tiny_model_dir, tmp_path / "elsewhere" / "model")  # a fresh clone's virtualenv, a Ray node
    assert model_fingerprint(str(copy)) == model_fingerprint(str(tiny_model_dir))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert _location(tmp_path / "a", copy, tiny_data_dir)[0] == _location(tmp_path / "b", tiny_model_dir, tiny_data_dir)[0]


def test_other_weights_have_another_key(tmp_path, tiny_model_dir):
    copy = shutil.copytree(tiny_model_dir, tmp_path / "changed")
    weights = next(p for p in copy.iterdir() if p.suffix in (".safetensors", ".bin"))
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF  # one byte of the weights
    weights.write_bytes(bytes(blob))
    assert model_fingerprint(str(copy)) != model_fingerprint(str(tiny_model_dir))
    assert model_fingerprint("some-org/some-model") == "some-org/some-model"  # a hub id: by name


def test_a_baseline_cached_under_the_path_key_is_adopted(tmp_path, tiny_model_dir, tiny_data_dir, isolated_cache):
    """Baselines cached before the key named the model by content are found, not fine-tuned again."""
    spec = load_spec(write_tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir))
    data = load_task_data(spec.data, seed=spec.seed)
    baseline = without_later_defaults({"baseline": spec.baseline.model_dump(mode="json")})["baseline"]
    if not baseline["select_checkpoints"]:
        del baseline["select_checkpoints"]  # as the key has always left it out at 0
    legacy_key = baseline_mod._hash({"model": spec.model.model_dump(mode="json"), "data": data.fingerprint,
                               "baseline": baseline, "seed": spec.seed, "v": 1,
                               "model_path": resolve_model_path(spec.model.name)})
    legacy = isolated_cache / "baselines" / legacy_key / "model"
    legacy.mkdir(parents=True)
    (legacy / "config.json").write_text("{}")
    key, bdir = engine.baseline_location(spec, data)
    assert key != legacy_key
    assert (bdir / "model" / "config.json").read_text() == "{}"
    assert not legacy.exists()
    assert engine.baseline_location(spec, data) == (key, bdir)  # stable afterwards
