from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from autocompress.data import Encoded, Split, TaskData, batches, encode, infinite_batches, load_task_data
from autocompress.errors import DataError
from autocompress.spec import DataSpec


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    # Keep datasets' Arrow caches out of the home directory and separate per test.
    monkeypatch.setenv("AUTOCOMPRESS_CACHE", str(tmp_path / "cache"))


def spec(path, **kw) -> DataSpec:
    return DataSpec(path=str(path), **kw)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def tsv(path: Path, rows: list[tuple], header: str = "sentence\tlabel") -> Path:
    return write(path, "\n".join([header] + ["\t".join(map(str, r)) for r in rows]) + "\n")


# ---------------------------------------------------------------------------------------------- loading


def test_glue_dir_sizes_columns_and_carving(tiny_data_dir):
    td = load_task_data(spec(tiny_data_dir, validation_size=16), seed=0)
    assert isinstance(td, TaskData)
    assert (len(td.train), len(td.validation), len(td.evaluation)) == (80, 16, 32)
    assert td.text_columns == ["sentence"] and td.label_column == "label"
    assert td.label_names == ["0", "1"] and td.num_labels == 2
    assert all(isinstance(t, tuple) and len(t) == 1 for t in td.train.texts)
    assert "tsv" in td.source and str(tiny_data_dir) in td.source
    assert len(td.fingerprint) == 16 and int(td.fingerprint, 16) >= 0
    # both classes survive in validation (stratified) and the rows are the file's rows
    assert set(td.validation.labels) == {0, 1}
    lines = (tiny_data_dir / "train.tsv").read_text().splitlines()[1:]
    rows = [tuple(line.split("\t")) for line in lines]
    all_rows = [(t[0], str(y)) for t, y in zip(td.train.texts + td.validation.texts, td.train.labels + td.validation.labels)]
    assert sorted(all_rows) == sorted(rows)


def _positions(td: TaskData, path: Path) -> tuple[set[int], set[int]]:
    lines = path.read_text().splitlines()[1:]
    # the tiny sentences may repeat, so compare multisets of original row positions
    index: dict[str, list[int]] = {}
    for i, line in enumerate(lines):
        index.setdefault(line.split("\t")[0], []).append(i)
    def take(split: Split) -> set[int]:
        return {index[t[0]].pop(0) for t in split.texts}
    return take(td.train), take(td.validation)


def test_validation_carving_is_seeded_and_disjoint(tiny_data_dir):
    a = load_task_data(spec(tiny_data_dir, validation_size=0.25), seed=1)
    b = load_task_data(spec(tiny_data_dir, validation_size=0.25), seed=1)
    c = load_task_data(spec(tiny_data_dir, validation_size=0.25), seed=2)
    assert len(a.validation) == 24 and len(a.train) == 72
    assert a.validation.texts == b.validation.texts and a.fingerprint == b.fingerprint
    assert a.validation.texts != c.validation.texts and a.fingerprint != c.fingerprint
    train_pos, val_pos = _positions(a, tiny_data_dir / "train.tsv")
    assert not train_pos & val_pos and len(train_pos | val_pos) == 96
    # the evaluation split is the dev file, untouched by the seed
    assert a.evaluation.texts == c.evaluation.texts


def test_caps_and_oversized_validation(tiny_data_dir):
    td = load_task_data(spec(tiny_data_dir, validation_size=10, max_train_examples=20, max_eval_examples=5), seed=0)
    assert (len(td.train), len(td.validation), len(td.evaluation)) == (20, 10, 5)
    big = load_task_data(spec(tiny_data_dir), seed=0)  # default 2000 > 96: capped, train keeps one per class
    assert len(big.train) == 2 and set(big.train.labels) == {0, 1}
    assert any("validation_size" in n for n in big.notes)


def test_split_subset_is_seeded():
    s = Split([(str(i),) for i in range(50)], [i % 2 for i in range(50)])
    assert s.subset(100, seed=0) is s
    assert s.subset(10, seed=3).texts == s.subset(10, seed=3).texts
    assert s.subset(10, seed=3).texts != s.subset(10, seed=4).texts
    assert len(s.subset(10, seed=3)) == 10


def test_sentence_pair_csv_and_dev_validation_alias(tmp_path):
    rows = [f'"q {i}, really?",answer {i},{i % 3}' for i in range(30)]
    write(tmp_path / "d" / "train.csv", "question1,question2,label\n" + "\n".join(rows) + "\n")
    write(tmp_path / "d" / "validation.csv", "question1,question2,label\n" + "\n".join(rows[:9]) + "\n")
    td = load_task_data(spec(tmp_path / "d", validation_size=6), seed=0)
    assert td.text_columns == ["question1", "question2"]
    assert td.label_names == ["0", "1", "2"]
    assert (len(td.train), len(td.validation), len(td.evaluation)) == (24, 6, 9)
    assert td.evaluation.texts[0] == ("q 0, really?", "answer 0")
    assert "validation.csv" in td.source


def test_jsonl_string_labels_single_file(tmp_path):
    lines = [json.dumps({"premise": f"p{i}", "hypothesis": f"h{i}", "label": ["neutral", "entailment", "contradiction"][i % 3]})
             for i in range(60)]
    path = write(tmp_path / "nli.jsonl", "\n".join(lines) + "\n")
    td = load_task_data(spec(path, validation_size=0.1), seed=0)
    assert td.label_names == ["contradiction", "entailment", "neutral"]  # sorted
    assert td.text_columns == ["premise", "hypothesis"]
    assert len(td.evaluation) == 6 and len(td.validation) == 5 and len(td.train) == 49  # eval carved first
    assert any("single file" in n for n in td.notes)
    assert td.evaluation.texts[0][0].startswith("p")
    declared = load_task_data(spec(path, validation_size=0.1, labels=["entailment", "neutral", "contradiction"]), seed=0)
    assert declared.label_names == ["entailment", "neutral", "contradiction"]
    pairs = {t: y for s in (declared.train, declared.validation, declared.evaluation) for t, y in zip(s.texts, s.labels)}
    assert pairs[("p1", "h1")] == 0 and pairs[("p0", "h0")] == 1 and pairs[("p2", "h2")] == 2


def test_tsv_text_is_verbatim(tmp_path):
    rows = [('he said "great movie', 1), ('"quoted" start', 0), ("NA", 1), ("null", 0), ("007", 1), ("it 's ok", 0)] * 3
    tsv(tmp_path / "d" / "train.tsv", rows)
    tsv(tmp_path / "d" / "dev.tsv", rows[:4])
    td = load_task_data(spec(tmp_path / "d", validation_size=2), seed=0)
    texts = {t[0] for t in td.train.texts + td.validation.texts}
    assert texts == {r[0] for r in rows}
    assert td.evaluation.texts == [(r[0],) for r in rows[:4]]
    assert td.evaluation.labels == [1, 0, 1, 0]


def test_hub_loading_maps_dev_to_validation(monkeypatch):
    import datasets

    feats = datasets.Features({"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["negative", "positive"]),
                               "idx": datasets.Value("int32")})
    def split(n):
        return datasets.Dataset.from_dict({"sentence": [f"s{i}" for i in range(n)], "label": [i % 2 for i in range(n)],
                                           "idx": list(range(n))}, features=feats)
    dd = datasets.DatasetDict(train=split(40), validation=split(10), test=split(5))
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append(a) or dd)
    td = load_task_data(DataSpec(hub_id="nyu-mll/glue", hub_config="sst2", validation_size=8), seed=0)
    assert calls == [("nyu-mll/glue", "sst2")]
    assert td.label_names == ["negative", "positive"] and td.text_columns == ["sentence"]
    assert (len(td.train), len(td.validation), len(td.evaluation)) == (32, 8, 10)
    assert td.source == "hub nyu-mll/glue:sst2"


def test_hub_unreachable_is_a_data_error(monkeypatch):
    import datasets

    def fail(*a, **k):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (LocalEntryNotFoundError)")
    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(DataError, match="unreachable.*data.path"):
        load_task_data(DataSpec(hub_id="nyu-mll/glue", hub_config="sst2"), seed=0)


# ---------------------------------------------------------------------------------------------- errors


def _err(path, **kw) -> str:
    with pytest.raises(DataError) as info:
        load_task_data(spec(path, **kw), seed=0)
    return str(info.value)


ROWS = [("good film", 1), ("bad film", 0)] * 5


def test_missing_label_column(tmp_path):
    path = tsv(tmp_path / "a.tsv", ROWS, header="sentence\tpolarity")
    msg = _err(path)
    assert "no label column" in msg and "'polarity'" in msg and "data.label_column" in msg
    msg = _err(path, label_column="polarty")
    assert "'polarty'" in msg and "Did you mean 'polarity'" in msg
    assert load_task_data(spec(path, label_column="polarity", validation_size=2), seed=0).label_column == "polarity"


def test_missing_text_column(tmp_path):
    path = tsv(tmp_path / "a.tsv", ROWS, header="review\tlabel")
    msg = _err(path)
    assert "no text column" in msg and "'review'" in msg and "data.text_columns" in msg
    assert "'sentnce'" in _err(path, text_columns=["sentnce"])


def test_missing_files(tmp_path):
    msg = _err(tmp_path / "nowhere")
    assert "does not exist" in msg and "data.path" in msg
    tsv(tmp_path / "d" / "train.tsv", ROWS)
    msg = _err(tmp_path / "d")
    assert "'dev'" in msg and "dev.tsv" in msg and "validation.tsv" in msg and "train.tsv" in msg
    assert "data.eval_split" in msg
    msg = _err(tmp_path / "d", train_split="training")
    assert "training.tsv" in msg and "data.train_split" in msg


def test_empty_and_header_only_files(tmp_path):
    assert "is empty" in _err(write(tmp_path / "e.tsv", ""))
    assert "no rows" in _err(write(tmp_path / "h.tsv", "sentence\tlabel\n"))
    assert "is empty" in _err(write(tmp_path / "e.jsonl", ""))


def test_wrong_delimiter(tmp_path):
    path = write(tmp_path / "a.tsv", "sentence,label\n" + "\n".join(f"{t},{y}" for t, y in ROWS) + "\n")
    msg = _err(path)
    assert "csv" in msg and "data.format" in msg and str(path) in msg
    td = load_task_data(spec(path, format="csv", validation_size=2), seed=0)
    assert len(td.train) + len(td.validation) + len(td.evaluation) == 10


def test_stray_tab(tmp_path):
    path = write(tmp_path / "a.tsv", "sentence\tlabel\ngood\t1\nbad\tfilm\t0\n")
    msg = _err(path)
    assert "line 3" in msg and "3 tab-separated fields" in msg


def test_non_utf8(tmp_path):
    path = tmp_path / "a.tsv"
    path.write_bytes("sentence\tlabel\ncaf\xe9 film\t1\n".encode("latin-1"))
    msg = _err(path)
    assert str(path) in msg and "UTF-8" in msg and "line 2" in msg and "re-encode" in msg


def test_single_class_train(tmp_path):
    path = tsv(tmp_path / "a.tsv", [("good", 1)] * 10)
    msg = _err(path)
    assert "only one class" in msg and "'1'" in msg and "'label'" in msg


def test_labels_not_declared(tmp_path):
    path = tsv(tmp_path / "a.tsv", ROWS + [("meh", 2), ("so so", "neutral")])
    msg = _err(path, labels=[0, 1])
    assert "'2'" in msg and "'neutral'" in msg and "data.labels" in msg


def test_unlabelled_eval_split(tmp_path):
    tsv(tmp_path / "d" / "train.tsv", ROWS)
    tsv(tmp_path / "d" / "test.tsv", [("a film", -1), ("another", -1)])
    msg = _err(tmp_path / "d", eval_split="test", validation_size=2)
    assert "no labels" in msg and "'label'" in msg and "data.eval_split" in msg


def test_train_too_small(tmp_path):
    path = tsv(tmp_path / "d" / "train.tsv", [("good", 1), ("bad", 0)])
    tsv(tmp_path / "d" / "dev.tsv", [("good", 1), ("bad", 0)])
    msg = _err(path.parent, validation_size=1)
    assert "too small" in msg and str(path) in msg


def test_regression_labels_rejected(tmp_path):
    path = write(tmp_path / "a.jsonl", "\n".join(json.dumps({"text": f"t{i}", "label": i / 3}) for i in range(1, 9)))
    assert "regression" in _err(path)


def test_no_cache_written_into_data_dir(tiny_data_dir):
    before = sorted(p.name for p in tiny_data_dir.iterdir())
    load_task_data(spec(tiny_data_dir, validation_size=8), seed=0)
    assert sorted(p.name for p in tiny_data_dir.iterdir()) == before


# ---------------------------------------------------------------------------------------------- tokenisation


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_encode_and_cache_round_trip(tokenizer, tmp_path, monkeypatch):
    split = Split([("good movie",), ("the film was very bad and dull and grim and sad",), ("fun",)], [1, 0, 1])
    enc = encode(split, tokenizer, max_length=8, cache_dir=tmp_path / "enc")
    assert len(enc) == 3 and enc.labels.dtype == np.int64 and enc.input_ids[0].dtype == np.int32
    assert list(enc.lengths()) == [4, 8, 3] and enc.truncated == 1
    assert enc.input_ids[1][0] == tokenizer.cls_token_id and enc.input_ids[1][-1] == tokenizer.sep_token_id
    files = list((tmp_path / "enc").glob("*.npz"))
    assert len(files) == 1

    def boom(*a, **k):
        raise AssertionError("tokenizer called despite the cache")
    monkeypatch.setattr(type(tokenizer), "__call__", boom)
    again = encode(split, tokenizer, max_length=8, cache_dir=tmp_path / "enc")
    assert all((a == b).all() for a, b in zip(enc.input_ids, again.input_ids))
    assert all((a == b).all() for a, b in zip(enc.token_type_ids, again.token_type_ids))
    assert again.truncated == 1 and list(again.labels) == [1, 0, 1]
    with pytest.raises(AssertionError):  # other settings miss the cache
        encode(split, tokenizer, max_length=9, cache_dir=tmp_path / "enc")


def test_encode_pairs(tokenizer):
    enc = encode(Split([("good", "bad film")], [0]), tokenizer, max_length=32, cache_dir=None)
    assert list(enc.token_type_ids[0]) == [0, 0, 0, 1, 1, 1]


def _enc(lengths: list[int]) -> Encoded:
    ids = [np.arange(1, n + 1, dtype=np.int32) for n in lengths]
    return Encoded(ids, [np.zeros(n, dtype=np.int8) for n in lengths], np.arange(len(lengths)) % 2, 0)


def test_batches_pad_per_batch():
    enc = _enc([3, 5, 2, 7, 4])
    out = list(batches(enc, batch_size=2))
    assert [tuple(b["input_ids"].shape) for b in out] == [(2, 5), (2, 7), (1, 4)]
    first = out[0]
    assert first["input_ids"].dtype == torch.int64 and first["labels"].dtype == torch.int64
    assert first["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert first["input_ids"][0].tolist() == [1, 2, 3, 0, 0]
    assert set(first) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert len(list(batches(enc, batch_size=2, drop_last=True))) == 2
    sub = list(batches(enc, batch_size=8, indices=[3, 1], pad_token_id=9))
    assert sub[0]["input_ids"][1].tolist() == [1, 2, 3, 4, 5, 9, 9]


def test_shuffle_is_seeded():
    enc = _enc(list(range(1, 41)))  # example i has length i + 1, so lengths identify examples

    def order(seed):
        return [int(n) for b in batches(enc, batch_size=8, shuffle=True, seed=seed) for n in b["attention_mask"].sum(1)]
    assert order(0) == order(0) and order(0) != order(1) and sorted(order(0)) == list(range(1, 41))
    assert [int(n) for b in batches(enc, batch_size=8) for n in b["attention_mask"].sum(1)] == list(range(1, 41))

    it = infinite_batches(enc, batch_size=16, device="cpu", seed=5)
    epochs = [[int(n) for _ in range(3) for n in next(it)["attention_mask"].sum(1)] for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(1, 41))  # 16 + 16 + 8: whole epochs
    assert epochs[0] == order(5) and epochs[1] == order(6) and epochs[0] != epochs[1]


# ---------------------------------------------------------------------------------------------- real data


@pytest.mark.sst2
def test_real_sst2(sst2_dir):
    td = load_task_data(DataSpec(path=str(sst2_dir), validation_size=2000), seed=0)
    assert len(td.train) + len(td.validation) == 67349 and len(td.validation) == 2000
    assert len(td.evaluation) == 872 and td.label_names == ["0", "1"]
    assert td.text_columns == ["sentence"]


def test_minus_one_is_a_class_when_train_uses_it(tmp_path):
    rows = [("good", 1), ("bad", -1)] * 5
    tsv(tmp_path / "d" / "train.tsv", rows)
    tsv(tmp_path / "d" / "dev.tsv", rows[:4])
    td = load_task_data(spec(tmp_path / "d", validation_size=2), seed=0)
    assert td.label_names == ["-1", "1"] and td.evaluation.labels == [1, 0, 1, 0]
    assert any("sorted order" in n for n in td.notes)
