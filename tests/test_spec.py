from __future__ import annotations

import pytest

from autocompress.errors import SpecError
from autocompress.registry import load_registry
from autocompress.space import FloatRange, Fixed, resolve_space
from autocompress.spec import load_spec

GOOD = {
    "study": "s1",
    "data": {"path": "data"},
    "techniques": {"head_pruning": {"params": {"fraction": [0.1, 0.5]}}, "quantization": {"enabled": True}},
}


def spec_with(**changes):
    import copy

    d = copy.deepcopy(GOOD)
    for path, value in changes.items():
        node = d
        keys = path.split("__")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return d


@pytest.fixture(scope="module")
def registry():
    return load_registry(selection="builtin")


def test_good_spec_resolves(registry):
    spec = load_spec(data=GOOD)
    space = resolve_space(spec, registry)
    names = [t.technique.name for t in space.techniques]
    assert names == ["head_pruning", "quantization"]  # stage order: structure before post-training
    hp = space.techniques[0].domains
    assert hp["fraction"] == FloatRange(0.1, 0.5)
    assert hp["importance_batches"] == Fixed(32)  # not searched unless the spec asks
    assert spec.objective_list() == [("accuracy", "maximize"), ("latency_bs32", "minimize"), ("size_mb", "minimize")]


def test_overrides_and_shortcuts():
    spec = load_spec(data=GOOD, overrides=["trials=7", "recovery.steps=3", "sampler=tpe"])
    assert spec.search.trials == 7 and spec.recovery.steps == 3 and spec.search.sampler == "tpe"


@pytest.mark.parametrize(
    ("data", "needles"),
    [
        (spec_with(serach={"trials": 3}), ["serach", "unknown key", "search"]),
        (spec_with(search__trails=3), ["search.trails", "trials"]),
        (spec_with(search__trials=0), ["search.trials", "greater than or equal to 1", "0"]),
        (spec_with(search__trials="many"), ["search.trials", "many"]),
        (spec_with(search__sampler="cmaes"), ["search.sampler", "cmaes"]),
        (spec_with(study="../escape"), ["study", "../escape"]),
        ({"study": "x", "techniques": {"quantization": {}}}, ["data", "missing"]),
        (spec_with(data={}), ["data.path", "--data"]),
        (spec_with(objectives=["acuracy"]), ["acuracy", "accuracy"]),
        (spec_with(objectives=["latency_bs4"]), ["latency_bs4", "measurement.batch_sizes"]),
    ],
)
def test_bad_spec_structure(data, needles):
    with pytest.raises(SpecError) as exc:
        load_spec(data=data)
    for needle in needles:
        assert needle in str(exc.value)


@pytest.mark.parametrize(
    ("techniques", "needles"),
    [
        ({"head_prunning": {}}, ["head_prunning", "head_pruning", "Known techniques"]),
        ({"head_pruning": {"params": {"fractoin": 0.3}}}, ["fractoin", "fraction"]),
        ({"head_pruning": {"params": {"fraction": [0.6, 0.2]}}}, ["inverted", "0.6", "0.2"]),
        ({"head_pruning": {"params": {"fraction": [0.1, 2.0]}}}, ["fraction", "2.0", "[0.0, 0.9]"]),
        ({"head_pruning": {"params": {"fraction": "lots"}}}, ["fraction", "lots"]),
        ({"quantization": {"params": {"granularity": "yes"}}}, ["granularity", "yes"]),
        ({"quantization": {"params": {"granularity": []}}}, ["granularity", "empty"]),
        ({"head_pruning": {"enabled": False}}, ["enable at least one"]),
    ],
)
def test_bad_technique_sections(registry, techniques, needles):
    spec = load_spec(data={**GOOD, "techniques": techniques})
    with pytest.raises(SpecError) as exc:
        resolve_space(spec, registry)
    for needle in needles:
        assert needle in str(exc.value)


def test_incompatible_techniques_both_forced_on(tmp_path):
    plugin = tmp_path / "clash.py"
    plugin.write_text(
        "from autocompress import hookimpl\n"
        "from autocompress.technique import Technique, Stage\n"
        "class Clash(Technique):\n"
        "    name = 'clash'\n"
        "    stage = Stage.STRUCTURE\n"
        "    incompatible_with = {'head_pruning': 'both rewrite the attention projections'}\n"
        "@hookimpl\n"
        "def register_techniques(register):\n"
        "    register(Clash())\n"
    )
    reg = load_registry(selection="builtin", extra_plugins=[str(plugin)])
    spec = load_spec(data={**GOOD, "techniques": {"head_pruning": {"enabled": True}, "clash": {"enabled": True}}})
    with pytest.raises(SpecError, match="incompatible: both rewrite the attention projections"):
        resolve_space(spec, reg)
    # with one of them searched, the space resolves and sampling never combines them
    spec = load_spec(data={**GOOD, "techniques": {"head_pruning": {"enabled": True}, "clash": {"enabled": "search"}}})
    from autocompress.space import sample

    class AlwaysOn:
        def categorical(self, name, choices):
            return choices[0]

        def float(self, name, low, high, *, log=False):
            return low

        def int(self, name, low, high, *, step=1):
            return low

    assert list(sample(resolve_space(spec, reg), AlwaysOn())) == ["head_pruning"]


def test_malformed_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("study: x\ntechniques: [unclosed\n")
    with pytest.raises(SpecError, match=r"not valid YAML at line \d+"):
        load_spec(p)


def test_missing_and_empty_spec_file(tmp_path):
    with pytest.raises(SpecError, match="not found"):
        load_spec(tmp_path / "nope.yaml")
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(SpecError, match="empty"):
        load_spec(tmp_path / "empty.yaml")


def test_yaml_cannot_construct_python_objects(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("study: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(p)


def test_shipped_specs_are_valid(registry):
    from pathlib import Path

    for path in sorted(Path(__file__).parents[1].joinpath("search_spaces").glob("*.yaml")):
        resolve_space(load_spec(path), registry)
