from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from autocompress import carve as carve_mod
from autocompress.carve import carve_sentences, phrase_owners
from autocompress.data import load_task_data
from autocompress.errors import DataError
from autocompress.spec import DataSpec


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOCOMPRESS_CACHE", str(tmp_path / "cache"))


def test_phrase_owners_finds_sentences_and_whole_word_containment():
    texts = ["a b c d", "b c", "c d", "x y", "b  c", "a b c d", "b c d e", "bc"]
    owners = phrase_owners(texts, where="t")
    assert owners[0] == [0]  # a sentence owns itself
    assert owners[5] == [0]  # an exact duplicate belongs to the first occurrence
    assert owners[3] == [3]
    assert sorted(owners[1]) == [0, 6] and sorted(owners[4]) == [0, 6]  # whitespace-normalised, in two sentences
    assert sorted(owners[2]) == [0, 6]
    assert owners[7] == [7]  # "bc" is not the words "b c"
    sentences = [i for i, o in enumerate(owners) if o == [i]]
    assert sentences == [0, 3, 6, 7]


def _sst_like(n_sentences: int = 40) -> tuple[list[str], list[int]]:
    texts, labels = [], []
    for s in range(n_sentences):
        label = s % 2
        mood = "great" if label else "dull"
        sentence = f"the film number {s} is {mood} and long"
        for phrase in (sentence, f"number {s} is {mood}", f"film number {s}", "the film", mood):
            texts.append(phrase)
            labels.append(label)
    return texts, labels


def test_carve_sentences_takes_whole_sentences_and_their_own_phrases_out_of_train():
    texts, labels = _sst_like()
    kept, carved, dropped, n_sentences = carve_sentences(texts, np.asarray(labels), 10, np.random.default_rng(0),
                                                         where="t")
    assert n_sentences == 40
    assert len(carved) == 10 and dropped == 20  # two phrases of its own per carved sentence
    assert all(texts[i].startswith("the film number") for i in carved)
    assert sorted(np.asarray(labels)[carved].tolist()) == [0] * 5 + [1] * 5  # stratified
    kept_texts = {texts[i] for i in kept}
    for i in carved:
        s = texts[i].split()[2]
        assert not any(f"number {s} " in t or t.endswith(f"number {s}") for t in kept_texts)
    assert "the film" in kept_texts and "great" in kept_texts  # shared with kept sentences: stays in train
    assert len(kept) + len(carved) + dropped == len(texts)
    again = carve_sentences(texts, np.asarray(labels), 10, np.random.default_rng(0), where="t")
    assert np.array_equal(again[1], carved)


def _tsv(path: Path, rows: list[tuple]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows), encoding="utf-8")
    return path


def test_load_task_data_with_sentence_carving(tmp_path):
    texts, labels = _sst_like()
    _tsv(tmp_path / "d" / "train.tsv", list(zip(texts, labels)))
    _tsv(tmp_path / "d" / "dev.tsv", [("a whole new film that is great", 1), ("a dull film", 0)])
    random = load_task_data(DataSpec(path=str(tmp_path / "d"), validation_size=8), seed=0)
    sentences = load_task_data(DataSpec(path=str(tmp_path / "d"), validation_size=8, validation_carve="sentences"),
                               seed=0)
    assert len(sentences.validation) == 8 and len(sentences.train) == len(texts) - 8 - 16
    assert all(t[0].startswith("the film number") for t in sentences.validation.texts)
    assert not {t for t in sentences.validation.texts} & {t for t in sentences.train.texts}
    assert any("whole sentences" in n and "16 phrases" in n for n in sentences.notes)
    assert sentences.fingerprint != random.fingerprint  # baselines and caches are keyed on the carve
    tenth = load_task_data(DataSpec(path=str(tmp_path / "d"), validation_size=0.1, validation_carve="sentences"),
                           seed=0)
    assert len(tenth.validation) == 4  # a fraction of the 40 sentences, not of the 200 rows
    most = load_task_data(DataSpec(path=str(tmp_path / "d"), validation_size=60, validation_carve="sentences"),
                          seed=0)
    assert len(most.validation) == 38 and any("(40 whole sentences, one per class must stay)" in n for n in most.notes)


def test_sentence_carving_refuses_pairs_and_documents(tmp_path, monkeypatch):
    rows = "".join(f"q {i}\tanswer {i}\t{i % 2}\n" for i in range(20))
    d = tmp_path / "pairs"
    d.mkdir()
    for name in ("train.tsv", "dev.tsv"):
        (d / name).write_text("question\tsentence\tlabel\n" + rows, encoding="utf-8")
    with pytest.raises(DataError, match=r"validation_carve='sentences' needs single-text.*validation_carve: random"):
        load_task_data(DataSpec(path=str(d), validation_size=4, validation_carve="sentences"), seed=0)

    texts, labels = _sst_like()
    _tsv(tmp_path / "d" / "train.tsv", list(zip(texts, labels)))
    _tsv(tmp_path / "d" / "dev.tsv", [("great", 1), ("dull", 0)])
    monkeypatch.setattr(carve_mod, "MAX_WINDOWS", 100)
    with pytest.raises(DataError, match=r"too long to be phrases.*train.tsv.*validation_carve: random"):
        load_task_data(DataSpec(path=str(tmp_path / "d"), validation_size=4, validation_carve="sentences"), seed=0)
