"""The README's Troubleshooting table cannot drift from the code: every message quoted there is triggered
here and must match (``...`` stands for details), and every trigger here must have its row there."""

from __future__ import annotations

import errno
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from autocompress.errors import AutocompressError
from autocompress.spec import DataSpec, load_spec

ROOT = Path(__file__).resolve().parents[1]


def readme_rows() -> list[list[str]]:
    """The quoted fragments of each row's first column in the README's Troubleshooting table."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Troubleshooting", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return [re.findall(r"`([^`]+)`", row.split(" | ")[0]) for row in rows]


def pattern(fragment: str) -> re.Pattern:
    return re.compile(".*?".join(re.escape(part) for part in fragment.split("...")), re.S)


def message(fn) -> str:
    try:
        fn()
    except AutocompressError as exc:
        return str(exc)
    raise AssertionError(f"{fn} raised nothing")


def spec(tmp_path, **changes):
    data = {"study": "s", "data": {"path": str(tmp_path / "data")}, "model": {"name": str(tmp_path / "model")},
            "techniques": {"head_pruning": {}, "quantization": {}}}
    data.update(changes)
    return load_spec(data=data)


def tsv(path: Path, text: str) -> DataSpec:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return DataSpec(path=str(path))


# One trigger per README row, keyed by the row's first fragment.

def t_unknown_key(tmp_path):
    return message(lambda: load_spec(data={"study": "s", "data": {"path": "d"}, "techniques": {"x": {}},
                                           "serach": {}}))


def t_bad_yaml(tmp_path):
    (tmp_path / "bad.yaml").write_text("study: x\ntechniques: [unclosed\n")
    return message(lambda: load_spec(tmp_path / "bad.yaml"))


def t_unknown_technique(tmp_path):
    from autocompress.registry import load_registry

    return message(lambda: load_registry(selection="builtin").get("head_prunning"))


def t_incompatible(tmp_path):
    from autocompress.registry import load_registry
    from autocompress.space import resolve_space

    (tmp_path / "clash.py").write_text(
        "from autocompress import hookimpl\nfrom autocompress.technique import Stage, Technique\n"
        "class Clash(Technique):\n    name = 'clash'\n    stage = Stage.STRUCTURE\n"
        "    incompatible_with = {'head_pruning': 'both rewrite attention'}\n"
        "@hookimpl\ndef register_techniques(register):\n    register(Clash())\n")
    reg = load_registry(selection="builtin", extra_plugins=[str(tmp_path / "clash.py")])
    s = spec(tmp_path, techniques={"head_pruning": {"enabled": True}, "clash": {"enabled": True}})
    return message(lambda: resolve_space(s, reg))


def t_no_data(tmp_path):
    from autocompress.data import load_task_data

    return message(lambda: load_task_data(DataSpec(path=str(tmp_path / "nowhere")), seed=0))


def t_no_label_column(tmp_path):
    from autocompress.data import load_task_data

    return message(lambda: load_task_data(tsv(tmp_path / "a.tsv", "sentence\tpolarity\ngood\t1\nbad\t0\n"), seed=0))


def t_wrong_delimiter(tmp_path):
    from autocompress.data import load_task_data

    return message(lambda: load_task_data(tsv(tmp_path / "a.tsv", "sentence,label\ngood,1\nbad,0\n"), seed=0))


def t_not_utf8(tmp_path):
    from autocompress.data import load_task_data

    path = tmp_path / "a.tsv"
    path.write_bytes("sentence\tlabel\ncaf\xe9\t1\n".encode("latin-1"))
    return message(lambda: load_task_data(DataSpec(path=str(path)), seed=0))


def _model_dir(tmp_path, config: dict) -> Path:
    d = tmp_path / "model"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(config))
    return d


def t_unsupported(tmp_path):
    from autocompress.guards import check_model
    from autocompress.registry import load_registry
    from autocompress.space import resolve_space

    _model_dir(tmp_path, {"model_type": "distilbert", "dim": 32, "n_layers": 1, "n_heads": 4, "hidden_dim": 64,
                          "vocab_size": 30})
    s, reg = spec(tmp_path), load_registry(selection="builtin")
    return message(lambda: check_model(s, reg, resolve_space(s, reg)))


def t_remote_code(tmp_path):
    from autocompress.guards import check_model
    from autocompress.registry import load_registry
    from autocompress.space import resolve_space

    _model_dir(tmp_path, {"model_type": "fancybert", "auto_map": {"AutoConfig": "x.FancyConfig"}})
    s, reg = spec(tmp_path), load_registry(selection="builtin")
    return message(lambda: check_model(s, reg, resolve_space(s, reg)))


def t_locked(tmp_path):
    import fcntl

    from autocompress.guards import hold_study_lock

    d = tmp_path / "study"
    d.mkdir()
    with open(d / ".search.lock", "w") as fh:
        fh.write("process 12345 on elsewhere")
        fh.flush()
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another open file: conflicts even in this process
        return message(lambda: hold_study_lock(d, spec(tmp_path)))


def t_changed_spec(tmp_path):
    from autocompress.registry import load_registry
    from autocompress.search import STATE_FILE, dump_spec, open_study, run_search

    s = spec(tmp_path)
    d = tmp_path / "results" / "s"
    d.mkdir(parents=True)
    open_study(s, d).ask()  # a started trial
    (d / STATE_FILE).write_text(json.dumps({"space_fingerprint": "something else"}))
    (d / "spec.resolved.yaml").write_text(dump_spec(spec(tmp_path, seed=7)))
    return message(lambda: run_search(s, registry=load_registry(selection="builtin"), results_dir=tmp_path / "results",
                                      command="autocompress search s.yaml", log=lambda m: None))


def t_disk_space(tmp_path, monkeypatch):
    import autocompress.guards as guards

    monkeypatch.setattr(guards, "_free_bytes", lambda path: 1_000_000)
    return message(lambda: guards.check_free_space(tmp_path, spec(tmp_path)))


def t_disk_full(tmp_path):
    from autocompress.guards import stop_if_fatal

    return message(lambda: stop_if_fatal(OSError(errno.ENOSPC, "No space left on device", "trials/3/model.safetensors")))


def t_infeasible(tmp_path):
    from autocompress.guards import infeasible_message

    s = spec(tmp_path, constraints={"max_accuracy_drop": 0.5})
    rows = [{"state": "COMPLETE", "feasible": False, "metrics": {"accuracy": 0.80}}]
    text = infeasible_message(rows, {"accuracy": 0.90}, s)
    assert text is not None and "over by 9.5" in text
    return text


def t_out_of_memory(tmp_path, monkeypatch):
    import torch

    import autocompress.engine
    from autocompress.objective import evaluate

    def run_trial(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(autocompress.engine, "run_trial", run_trial)
    outcome = evaluate(SimpleNamespace(spec=spec(tmp_path), device="cpu"), {"quantization": {}}, tmp_path / "t")
    return outcome["fail_reason"]


def t_interrupted(tmp_path):
    from autocompress.search import StudyInterrupted

    return str(StudyInterrupted(3, 10, "autocompress search spec.yaml"))


def t_unexpected(tmp_path):
    from autocompress.guards import unexpected_error

    text, code = unexpected_error(RuntimeError("boom"))
    assert code == 1
    Path(re.search(r"The traceback is in (\S+);", text).group(1)).unlink()
    return text


TRIGGERS = {
    "invalid search spec:": t_unknown_key,
    "search spec '...' is not valid YAML at line ...": t_bad_yaml,
    "unknown technique '...'. Did you mean '...'? Known techniques: ...": t_unknown_technique,
    "... are both enabled: true, but they are incompatible: ...": t_incompatible,
    "data.path '...' does not exist": t_no_data,
    "no label column in ...: looked for 'label' or 'labels'; columns found: ...": t_no_label_column,
    "... was read as tsv but its header ... looks like csv": t_wrong_delimiter,
    "... is not UTF-8 text: byte ... on line ...": t_not_utf8,
    "technique '...' does not support model.name '...'": t_unsupported,
    "model.name '...' needs its own Python code": t_remote_code,
    "study '...' is already being searched by process ...": t_locked,
    "study '...' in '...' was run with a different search spec ...; changed: ...": t_changed_spec,
    "not enough disk space: ... MB free for the ...": t_disk_space,
    "the disk is full or read-only ...; the search stopped": t_disk_full,
    "no completed trial meets all the constraints": t_infeasible,
    "out of memory on ...": t_out_of_memory,
    "Interrupted: .../... trials finished and saved. Resume with the same command": t_interrupted,
    "unexpected ...: ... The traceback is in ...": t_unexpected,
}


def test_every_readme_row_has_a_trigger_and_every_trigger_a_row():
    firsts = [fragments[0] for fragments in readme_rows()]
    assert len(firsts) == len(set(firsts))
    assert sorted(firsts) == sorted(TRIGGERS)


@pytest.mark.parametrize("fragments", readme_rows(), ids=lambda f: f[0][:40])
def test_readme_message_is_what_the_code_says(fragments, tmp_path, monkeypatch):
    trigger = TRIGGERS[fragments[0]]
    kwargs = {"monkeypatch": monkeypatch} if "monkeypatch" in trigger.__code__.co_varnames else {}
    text = trigger(tmp_path, **kwargs)
    for fragment in fragments:
        assert pattern(fragment).search(text), f"README quotes {fragment!r}, the code says:\n{text}"
    if not fragments[0].startswith("..."):  # "starts with": the message begins with it
        assert pattern(fragments[0]).match(text), text
