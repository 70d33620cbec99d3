"""Hardening (issue 6), task data: each mistake in the data ends in a message naming the file, what is wrong
and the fix (exit code 2, no traceback, before the baseline is fine-tuned); long texts are truncated, counted
and reported; a corrected command then runs (a run that failed on its data leaves nothing in the way)."""

from __future__ import annotations

import pytest

from autocompress.tiny import tiny_sentences, write_glue_tsv
from hardening_helpers import cli, hardening_cache, read_trials, tiny_spec  # noqa: F401 - cli, hardening_cache: fixtures


@pytest.fixture
def spec_path(tmp_path, tiny_model_dir, tiny_data_dir):
    return tiny_spec(tmp_path, tiny_model_dir, tiny_data_dir, trials=1)


def glue_dir(path, *, train=None, dev=None, header="sentence\tlabel"):
    """A GLUE-style directory; ``train``/``dev`` are raw text or None for the tiny generated rows."""
    path.mkdir(parents=True, exist_ok=True)
    for name, text in (("train", train), ("dev", dev)):
        rows = [f"{t}\t{y}" for t, y in tiny_sentences(96 if name == "train" else 32, seed=len(name))]
        (path / f"{name}.tsv").write_text(text if text is not None else "\n".join([header, *rows]) + "\n")
    return path


def assert_data_error(res, *needles):
    assert res.code == 2, res.text
    assert "Traceback" not in res.text and "error:" in res.err
    for needle in needles:
        assert needle in res.err, (needle, res.err)
    assert "Fine-tuning" not in res.err  # refused before any work


def test_missing_data_directory_then_the_fixed_command_runs(cli, spec_path, tmp_path, tiny_data_dir):
    res = cli("search", spec_path, "--data", tmp_path / "no-such-data")
    assert_data_error(res, "data.path", "no-such-data", "does not exist", "train.tsv and dev.tsv")
    # The failed run created the study but started nothing: the corrected data path is not a "changed spec".
    res = cli("search", spec_path, "--data", tiny_data_dir)
    assert res.code == 0, res.text
    assert "starting it afresh" in res.err
    assert [t["state"] for t in read_trials(tmp_path / "results" / "tiny")].count("COMPLETE") == 1


def test_missing_split_file_lists_what_was_looked_for(cli, spec_path, tmp_path):
    d = glue_dir(tmp_path / "d")
    (d / "dev.tsv").unlink()
    assert_data_error(cli("search", spec_path, "--data", d), "no 'dev' split file", "dev.tsv", "validation.tsv",
                      "found train.tsv", "data.eval_split")


def test_empty_file(cli, spec_path, tmp_path):
    d = glue_dir(tmp_path / "d", train="")
    assert_data_error(cli("search", spec_path, "--data", d), f"{d / 'train.tsv'} is empty", "data.path")


def test_wrong_delimiter(cli, spec_path, tmp_path):
    d = glue_dir(tmp_path / "d", train="sentence,label\ngood film,1\nbad film,0\n")
    assert_data_error(cli("search", spec_path, "--data", d), "train.tsv was read as tsv",
                      "it looks like csv. Set data.format: csv")


def test_missing_label_column_lists_the_columns_found(cli, spec_path, tmp_path):
    d = glue_dir(tmp_path / "d", header="sentence\tpolarity")
    res = cli("search", spec_path, "--data", d)
    assert_data_error(res, "no label column", "columns found: 'sentence', 'polarity'", "data.label_column")
    res = cli("search", spec_path, "--data", d, "--set", "data.label_column=polarty")
    assert_data_error(res, "column 'polarty' (data.label_column)", "Did you mean 'polarity'?")


def test_missing_text_column_lists_the_columns_found(cli, spec_path, tmp_path):
    d = glue_dir(tmp_path / "d", header="review\tlabel")
    assert_data_error(cli("search", spec_path, "--data", d), "no text column", "columns found: 'review', 'label'",
                      "Set data.text_columns")


def test_labels_not_in_the_declared_set(cli, spec_path):
    assert_data_error(cli("search", spec_path, "--set", "data.labels=[0, 2]"), "labels ['1'] in column 'label'",
                      "are not in data.labels [0, 2]", "add them to data.labels")


def test_non_utf8_bytes(cli, spec_path, tmp_path):
    d = glue_dir(tmp_path / "d")
    with (d / "train.tsv").open("ab") as fh:
        fh.write("caf\xe9 film\t1\n".encode("latin-1"))
    assert_data_error(cli("search", spec_path, "--data", d), "is not UTF-8 text: byte 0xe9 on line 98",
                      "re-encode the file as UTF-8")


def test_a_train_split_with_one_class(cli, spec_path, tmp_path):
    d = glue_dir(tmp_path / "d", train="sentence\tlabel\n" + "good film\t1\n" * 20)
    assert_data_error(cli("search", spec_path, "--data", d), "has only one class ('1')", "data.label_column")


def test_long_texts_are_truncated_counted_and_reported(cli, spec_path, tmp_path):
    d = write_glue_tsv(tmp_path / "d")
    with (d / "train.tsv").open("a") as fh:
        fh.write(" ".join(["good film"] * 1000) + "\t1\n")  # 2000 words, max_length 32
    # ... and a held-out split with one class only: reported too (F1 and MCC say nothing there)
    (d / "dev.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t1\n" for t, y in tiny_sentences(40) if y)[:2000])
    res = cli("search", spec_path, "--data", d, "--set", "baseline.max_steps=4")  # its own baseline: keep it short
    assert res.code == 0, res.text
    note = next(line for line in res.err.splitlines() if "were truncated" in line)
    assert note.startswith("Note: ") and "examples were truncated to model.max_length=32 tokens" in note
    assert "raise model.max_length" in note
    assert "has only one class ('1')" in res.err and "F1 and MCC are degenerate" in res.err
    report = (tmp_path / "results" / "tiny" / "report.md").read_text()
    assert "truncated to model.max_length=32" in report and "only one class" in report
