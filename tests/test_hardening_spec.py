"""Hardening (issue 6), the search spec: every mistake a new user makes ends in a message that names the key,
the value and the fix, with exit code 2 and no traceback, before any work starts. Property tests: validation
of generated specs never crashes, it only accepts or rejects with a message."""

from __future__ import annotations

import copy

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autocompress.errors import AutocompressError
from autocompress.registry import load_registry
from autocompress.space import resolve_space
from autocompress.spec import load_spec
from hardening_helpers import cli, hardening_cache, tiny_spec  # noqa: F401 - cli, hardening_cache: fixtures

CLASH_PLUGIN = """
from autocompress import hookimpl
from autocompress.technique import Stage, Technique

class Clash(Technique):
    name = "clash"
    stage = Stage.STRUCTURE
    incompatible_with = {"head_pruning": "both rewrite the attention projections"}

@hookimpl
def register_techniques(register):
    register(Clash())
"""


@pytest.fixture
def spec_path(tmp_path, tiny_model_dir, tiny_data_dir):
    return tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir, trials=2)


def edited(spec_path, old: str, new: str):
    text = spec_path.read_text()
    assert old in text
    spec_path.write_text(text.replace(old, new))
    return spec_path


def assert_user_error(res, *needles, code=2):
    assert res.code == code, res.text
    assert "Traceback" not in res.text
    assert "error:" in res.err
    for needle in needles:
        assert needle in res.err, (needle, res.err)
    assert not (res.err.count("Fine-tuning")), "failed after work had started"


def test_malformed_yaml_names_line_and_column(cli, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("study: x\ntechniques: [unclosed\n")
    assert_user_error(cli("search", bad), "is not valid YAML at line 3, column 1", "Fix the syntax there")


def test_missing_spec_file(cli, tmp_path):
    assert_user_error(cli("search", tmp_path / "nope.yaml"), "nope.yaml", "not found", "search_spaces/")


@pytest.mark.parametrize(("args", "needle"), [
    (["search", "--bogus"], "No such option: --bogus"),
    (["search"], "Missing argument 'spec_file'"),
    (["serach"], "No such command 'serach'"),
    (["plugins", "--format", "xml"], "--format 'xml': use 'table' or 'json'"),
])
def test_command_line_usage_errors(cli, args, needle):
    res = cli(*args)
    assert res.code == 2, res.text
    assert needle in res.err and "Traceback" not in res.text and "unexpected" not in res.err


def test_unknown_key_suggests_the_close_match(cli, spec_path):
    res = cli("search", edited(spec_path, "search:", "serach:"))
    assert_user_error(res, "serach: unknown key. Did you mean 'search'?", "Remove it or fix its spelling")
    res = cli("search", spec_path, "--set", "recovery.stesp=3")
    assert_user_error(res, "recovery.stesp: unknown key. Did you mean 'steps'?")


def test_unknown_technique_lists_the_known_ones(cli, spec_path):
    res = cli("search", edited(spec_path, "head_pruning:", "head_prunning:"))
    assert_user_error(res, "unknown technique 'head_prunning'. Did you mean 'head_pruning'?",
                      "Known techniques: distillation, head_pruning, low_rank, movement_pruning, quantization",
                      "autocompress plugins")


@pytest.mark.parametrize(("override", "needles"), [
    ("model.max_length=lots", ["model.max_length", "valid integer", "'lots'"]),
    ("search.sampler=cmaes", ["search.sampler", "'nsga2', 'tpe' or 'random'", "'cmaes'"]),
    ("techniques=[head_pruning]", ["techniques", "valid dictionary"]),
    ("techniques.head_pruning.params.fraction=lots", ["techniques.head_pruning.params.fraction",
                                                      "expected a number in [0.0, 0.9]", "'lots'"]),
    ("techniques.quantization.params.dtype=int4", ["techniques.quantization.params.dtype", "'int4'", "is not one of"]),
])
def test_wrong_types_name_the_key_and_the_value(cli, spec_path, override, needles):
    assert_user_error(cli("search", spec_path, "--set", override), *needles)


def test_empty_and_inverted_ranges(cli, spec_path):
    # "[low, high]" must reach the terminal verbatim (rich would swallow it as markup).
    res = cli("search", spec_path, "--set", "techniques.head_pruning.params.fraction=[]")
    assert_user_error(res, "techniques.head_pruning.params.fraction: a range is [low, high] (two numbers), got []")
    res = cli("search", spec_path, "--set", "techniques.head_pruning.params.fraction=[0.7, 0.1]")
    assert_user_error(res, "fraction: inverted range, low 0.7 > high 0.1; swap them")
    res = cli("search", spec_path, "--set", "techniques.quantization.params.granularity=[]")
    assert_user_error(res, "granularity: empty list of choices; give at least one of")


def test_zero_trials(cli, spec_path):
    for args in (["--trials", "0"], ["--set", "trials=0"]):
        assert_user_error(cli("search", spec_path, *args), "search.trials", "greater than or equal to 1", "(got 0)")


def test_objective_that_does_not_exist(cli, spec_path):
    res = cli("search", edited(spec_path, "size_mb]", "sizemb]"))
    assert_user_error(res, "objectives[2]: unknown objective 'sizemb'. Did you mean 'size_mb'?", "Known: accuracy")
    res = cli("search", spec_path, "--set", "objectives=[accuracy, latency_bs4]")
    assert_user_error(res, "unknown objective 'latency_bs4'", "latency_bsN needs N in measurement.batch_sizes")


def test_incompatible_techniques_both_forced_on(cli, spec_path, tmp_path):
    plugin = tmp_path / "clash.py"
    plugin.write_text(CLASH_PLUGIN)
    text = spec_path.read_text()
    start, end = text.index("techniques:"), text.index("search:")
    spec_path.write_text(text[:start] + "techniques:\n  head_pruning: {enabled: true}\n  clash: {enabled: true}\n"
                         + text[end:])
    res = cli("search", spec_path, "--plugin", plugin)
    assert_user_error(res, "techniques.clash and techniques.head_pruning are both enabled: true, but they are "
                      "incompatible: both rewrite the attention projections",
                      "Set one of them to enabled: search or false")


@pytest.mark.parametrize("name", ["../x", "/tmp/abs", "a/b", ".."])
def test_study_names_cannot_escape_the_results_folder(cli, spec_path, tmp_path, name):
    res = cli("search", spec_path, "--set", f"study={name}")
    assert_user_error(res, "study", "no path separators, no '..'")
    assert not (tmp_path / "x").exists() and not (tmp_path / "a").exists()


def test_reading_commands_refuse_paths_out_of_the_results_folder(cli):
    res = cli("pareto", "../../etc")
    assert_user_error(res, "would write outside the results directory", "use a plain name")


def test_yaml_is_loaded_safely(cli, tmp_path):
    evil = tmp_path / "evil.yaml"
    marker = tmp_path / "pwned"
    evil.write_text(f"study: !!python/object/apply:os.system ['touch {marker}']\n")
    assert_user_error(cli("search", evil), "is not valid YAML")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- properties

REGISTRY = load_registry(selection="builtin")
BASE = {
    "study": "s1", "model": {"name": "m", "max_length": 64},
    "data": {"path": "data", "validation_size": 10, "labels": [0, 1]},
    "baseline": {"max_steps": 3}, "recovery": {"steps": 2},
    "measurement": {"batch_sizes": [8, 1], "device": "cpu"},
    "objectives": ["accuracy", "latency_bs8", {"name": "size_mb", "direction": "minimize"}],
    "techniques": {"head_pruning": {"params": {"fraction": [0.1, 0.5]}}, "quantization": {"enabled": True},
                   "low_rank": {"enabled": "search", "params": {"rank_multiple": {"low": 4, "high": 16, "step": 4},
                                                                 "embedding_dim": [0, 32]}}},
    "search": {"trials": 3, "sampler": "random", "enqueue": [{"head_pruning": {"fraction": 0.2}, "quantization": None}]},
    "constraints": {"max_accuracy_drop": 1.0},
}
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["search", "int8", "all", "nsga2", "head_pruning", "accuracy", "-1", "1e-3", "../x", "cuda:9"]))
KEYS = st.one_of(st.text(max_size=8), st.sampled_from(["low", "high", "log", "step", "choices", "enabled", "params",
                                                        "fraction", "rank_multiple", "name", "direction", "trials"]))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(KEYS, inner, max_size=4)), max_leaves=12)


def _paths(node, prefix=()):
    out = [prefix] if prefix else []
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in children:
        out += _paths(child, prefix + (key,))
    return out


PATHS = _paths(BASE)


@st.composite
def mutated_specs(draw):
    """The valid BASE with 1-4 keys replaced, deleted or added (any JSON-like value)."""
    spec = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(PATHS))
        node = spec
        try:
            for key in path[:-1]:
                node = node[key]
            op = draw(st.sampled_from(["set", "delete", "add"]))
            if op == "set":
                node[path[-1]] = draw(VALUES)
            elif isinstance(node, dict) and op == "delete":
                node.pop(path[-1], None)
            elif isinstance(node, dict):
                node[draw(st.text(min_size=1, max_size=10))] = draw(VALUES)
        except (KeyError, IndexError, TypeError):
            pass  # an earlier mutation replaced a parent
    return spec


def accepts_or_rejects_with_a_message(load) -> None:
    try:
        resolve_space(load(), REGISTRY)
    except AutocompressError as exc:  # anything else (TypeError, KeyError, ...) fails the property
        assert str(exc).strip()
        assert "Traceback" not in str(exc)


PROPERTY = settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))


def test_base_spec_of_the_properties_is_valid():
    resolve_space(load_spec(data=BASE), REGISTRY)


@PROPERTY
@given(mutated_specs())
def test_property_generated_spec_dicts(spec):
    accepts_or_rejects_with_a_message(lambda: load_spec(data=spec))


@PROPERTY
@given(mutated_specs())
def test_property_generated_yaml_files(tmp_path_factory, spec):
    path = tmp_path_factory.mktemp("spec") / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    accepts_or_rejects_with_a_message(lambda: load_spec(path))


@PROPERTY
@given(st.binary(max_size=200))
def test_property_arbitrary_bytes_as_a_spec_file(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("spec") / "spec.yaml"
    path.write_bytes(blob)
    accepts_or_rejects_with_a_message(lambda: load_spec(path))


@PROPERTY
@given(st.lists(st.tuples(st.sampled_from(["trials", "seed", "sampler", "study", "search.trials", "model", "a.b",
                                           "techniques.head_pruning.params.fraction", "techniques", "",
                                           "techniques.quantization.enabled", "measurement.batch_sizes", "x..y"]),
                          st.text(max_size=15)), max_size=3))
def test_property_generated_overrides(items):
    accepts_or_rejects_with_a_message(lambda: load_spec(data=BASE, overrides=[f"{k}={v}" for k, v in items]))
