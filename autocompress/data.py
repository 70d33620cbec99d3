"""Task data: load a labelled text-classification dataset, carve a seeded validation split, tokenise, batch.

Files (a GLUE-style directory or one file) and hub datasets are read through ``datasets``; after loading all is
plain Python/numpy. Tokenised splits are cached as flat ``.npz`` arrays (no pickle) keyed by tokenizer and texts.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from .carve import carve, carve_size, carve_sentences
from .errors import DataError, close_matches

if TYPE_CHECKING:
    import torch

    from .spec import DataSpec

EXTENSIONS = ("tsv", "csv", "jsonl", "json")
SPLIT_ALIASES = {"dev": "validation", "validation": "dev"}  # GLUE files say 'dev', the hub says 'validation'
PAIR_LAYOUTS = [("sentence1", "sentence2"), ("question", "sentence"), ("question1", "question2"),
                ("premise", "hypothesis"), ("text_a", "text_b")]
SINGLE_LAYOUTS = ["sentence", "text", "text_a"]
LABEL_COLUMNS = ("label", "labels")
_ENCODE_VERSION = "1"  # bump when the cached encoding layout changes
_INT = re.compile(r"-?\d+")


def cache_root() -> Path:
    """The autocompress cache (``$AUTOCOMPRESS_CACHE`` or ``~/.cache/autocompress``)."""
    return Path(os.environ.get("AUTOCOMPRESS_CACHE") or Path.home() / ".cache" / "autocompress").expanduser()


def _rng(seed: int, stream: int = 0) -> np.random.Generator:
    # Separate streams per purpose so capping train never changes which examples were carved for validation.
    return np.random.default_rng([seed % 2**32, stream])


@dataclass
class Split:
    texts: list[tuple[str, ...]]  # 1-tuples for single sentences, 2-tuples for sentence pairs
    labels: list[int]  # class indices

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, indices: Sequence[int] | np.ndarray) -> Split:
        return Split([self.texts[i] for i in indices], [self.labels[i] for i in indices])

    def subset(self, n: int, *, seed: int) -> Split:
        """A seeded random subset of ``n`` examples in their original order (``self`` if ``n >= len``)."""
        if n >= len(self):
            return self
        return self.take(np.sort(_rng(seed).choice(len(self), size=n, replace=False)))


@dataclass
class TaskData:
    train: Split  # train minus the carved validation
    validation: Split  # carved from train; the search selects on it
    evaluation: Split  # held-out split (GLUE dev) the report evaluates on
    label_names: list[str]
    text_columns: list[str]
    label_column: str
    source: str
    fingerprint: str  # 16 hex chars of sha256 over the loaded content and carving settings: a cache key
    notes: list[str] = field(default_factory=list)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


@dataclass
class _Table:
    columns: dict[str, list[Any]]
    where: str  # names the file or hub split in messages
    class_names: dict[str, list[str]] = field(default_factory=dict)  # hub ClassLabel names, by column


# ---------------------------------------------------------------------------------------------- loading


def load_task_data(data: DataSpec, *, seed: int) -> TaskData:
    """Load, validate and carve the task data described by ``data`` (seeded by ``seed``)."""
    notes: list[str] = []
    train_tab, eval_tab, source = _load_local(data) if data.path is not None else _load_hub(data)
    text_cols, label_col = _detect_columns(list(train_tab.columns), data, train_tab.where)
    if eval_tab is not None:
        lacking = [c for c in [*text_cols, label_col] if c not in eval_tab.columns]
        if lacking:
            raise DataError(f"{eval_tab.where} lacks column(s) {lacking} that the train split uses; columns found: "
                            f"{list(eval_tab.columns)}. Make the splits' headers match, or set data.text_columns / "
                            "data.label_column to columns both have.")

    train_raw = _raw_labels(train_tab, label_col, train_values=None)
    eval_raw = _raw_labels(eval_tab, label_col, train_values=set(train_raw)) if eval_tab is not None else []
    mapping, label_names = _label_mapping(train_raw, eval_raw, data, train_tab, label_col, notes)
    full = Split(_texts(train_tab, text_cols), [mapping[str(v)] for v in train_raw])
    if len(set(full.labels)) < 2:
        raise DataError(f"the train split ({train_tab.where}) has only one class ({label_names[full.labels[0]]!r}) in "
                        f"label column {label_col!r}; a classifier needs two or more. Check data.label_column.")

    if eval_tab is None:  # one file: no held-out split, so carve one (seeded) before carving validation
        n_eval = min(carve_size(data.validation_size, len(full)), max(1, len(full) // 5))
        keep, carved = carve(np.asarray(full.labels), n_eval, _rng(seed, 1), what="evaluation", where=train_tab.where)
        evaluation, full = full.take(carved), full.take(keep)
        notes.append(f"data.path is a single file with no held-out split: {len(evaluation)} examples were carved "
                     f"(seed {seed}) as the evaluation split; point data.path at a directory with "
                     f"{data.train_split} and {data.eval_split} files to evaluate on a real held-out split.")
    else:
        evaluation = Split(_texts(eval_tab, text_cols), [mapping[str(v)] for v in eval_raw])
        if len(set(evaluation.labels)) == 1 and len(label_names) > 1:
            notes.append(f"the evaluation split ({eval_tab.where}) has only one class "
                         f"({label_names[evaluation.labels[0]]!r}): its accuracy is reported, but F1 and MCC are "
                         "degenerate there. Use a held-out split with every class for meaningful figures.")

    n_val = carve_size(data.validation_size, len(full))
    pool = f"({len(full)} examples, one per class must stay)"
    if data.validation_carve == "sentences":
        if len(text_cols) != 1:
            raise DataError(f"data.validation_carve='sentences' needs single-text examples (phrases of sentences, as "
                            f"in SST); {train_tab.where} has text pairs {text_cols}. Set data.validation_carve: random.")
        keep, carved, dropped, n_sentences = carve_sentences([t[0] for t in full.texts], np.asarray(full.labels),
                                                             data.validation_size, _rng(seed, 2), where=train_tab.where)
        n_val = carve_size(data.validation_size, n_sentences)
        pool = f"({n_sentences} whole sentences, one per class must stay)"
        notes.append(f"validation: {len(carved)} whole sentences carved from {train_tab.where} "
                     f"(data.validation_carve=sentences); {dropped} phrases found only inside them left train")
    else:
        keep, carved = carve(np.asarray(full.labels), n_val, _rng(seed, 2), what="validation", where=train_tab.where)
    train, validation = full.take(keep), full.take(carved)
    if len(carved) < n_val:
        notes.append(f"data.validation_size={data.validation_size:g} asks for more than the train split can spare "
                     f"{pool}; carved {len(carved)}. Set "
                     "data.validation_size to a fraction such as 0.1.")
    if data.max_train_examples is not None and data.max_train_examples < len(train):
        notes.append(f"training on {data.max_train_examples} of {len(train)} examples (data.max_train_examples)")
        train = train.subset(data.max_train_examples, seed=seed + 3)
    if data.max_eval_examples is not None and data.max_eval_examples < len(evaluation):
        notes.append(f"evaluating on {data.max_eval_examples} of {len(evaluation)} examples (data.max_eval_examples)")
        evaluation = evaluation.subset(data.max_eval_examples, seed=seed + 4)

    settings = [1, seed, text_cols, label_col, label_names, data.validation_size, data.max_train_examples,
                data.max_eval_examples] + ([data.validation_carve] if data.validation_carve != "random" else [])
    content = [settings] + [[s.texts, s.labels] for s in (train, validation, evaluation)]
    fingerprint = hashlib.sha256(json.dumps(content, ensure_ascii=False).encode()).hexdigest()[:16]
    return TaskData(train=train, validation=validation, evaluation=evaluation, label_names=label_names,
                    text_columns=text_cols, label_column=label_col, source=source, fingerprint=fingerprint, notes=notes)


def _load_local(data: DataSpec) -> tuple[_Table, _Table | None, str]:
    p = Path(data.path).expanduser().resolve()  # type: ignore[arg-type]
    if not p.exists():
        raise DataError(f"data.path {data.path!r} does not exist (resolved to {p}); point it at a directory with "
                        f"{data.train_split}.tsv and {data.eval_split}.tsv (GLUE layout) or at one data file.")
    if p.is_file():
        fmt = _file_format(p, data.format)
        return _read_file(p, fmt), None, f"{p} ({fmt})"
    files = [_find_split_file(p, data.train_split, data.format, key="train_split"),
             _find_split_file(p, data.eval_split, data.format, key="eval_split")]
    fmts = [_file_format(f, data.format) for f in files]
    train, evaluation = (_read_file(f, fmt) for f, fmt in zip(files, fmts))
    return train, evaluation, f"{p} ({fmts[0]}: {files[0].name}, {files[1].name})"


def _find_split_file(directory: Path, split: str, fmt: str, *, key: str) -> Path:
    # An explicit format is tried first by its own extension, then on any known extension (a CSV named .tsv).
    exts = EXTENSIONS if fmt == "auto" else (fmt,) + tuple(e for e in EXTENSIONS if e != fmt)
    looked: list[str] = []
    for name in _with_alias(split):
        looked += [f"{name}.{e}" for e in exts]
        found = [directory / f"{name}.{e}" for e in exts if (directory / f"{name}.{e}").is_file()]
        if len(found) > 1 and fmt == "auto":
            raise DataError(f"{directory} has several {name!r} files ({', '.join(f.name for f in found)}); "
                            "keep one, or set data.format to pick one")
        if found:
            return found[0]
    present = sorted(f.name for f in directory.iterdir())[:12]
    raise DataError(f"no {split!r} split file in {directory}: looked for {', '.join(looked)}; found "
                    f"{', '.join(present) or 'nothing'}. Set data.{key} to the file's name without extension, or "
                    "point data.path at a single file.")


def _with_alias(split: str) -> list[str]:
    return [split] + ([SPLIT_ALIASES[split]] if split in SPLIT_ALIASES else [])


def _file_format(path: Path, fmt: str) -> str:
    if fmt == "auto" and path.suffix.lower().lstrip(".") not in EXTENSIONS:
        raise DataError(f"cannot tell the format of {path} from its extension {path.suffix!r}; "
                        "set data.format to tsv, csv, json or jsonl")
    return path.suffix.lower().lstrip(".") if fmt == "auto" else fmt


def _scan(path: Path, fmt: str) -> list[str] | None:
    """Check encoding, emptiness and (for TSV/CSV) the header and field counts; return the header fields."""
    header: list[str] | None = None
    rows = 0
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:  # UTF-8 never puts a newline byte inside a multi-byte character, so per-line decoding is exact
                line = raw.decode("utf-8").lstrip("\ufeff") if lineno == 1 else raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path} is not UTF-8 text: byte {raw[exc.start]:#04x} on line {lineno} cannot be "
                                "decoded; re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
            text = line.rstrip("\r\n")
            if not text:  # pandas skips blank lines too
                continue
            if fmt not in ("tsv", "csv"):
                rows += 1
            elif header is None:
                header = text.split("\t") if fmt == "tsv" else next(csv.reader([text]))
                other, other_fmt = (",", "csv") if fmt == "tsv" else ("\t", "tsv")
                if len(header) == 1 and other in text:
                    raise DataError(f"{path} was read as {fmt} but its header {text[:80]!r} has one column and "
                                    f"contains {other!r}: it looks like {other_fmt}. Set data.format: {other_fmt}")
                if len(set(header)) != len(header):
                    raise DataError(f"{path} has duplicate column names in its header {header}; rename them")
            else:
                rows += 1
                if fmt == "tsv" and text.count("\t") + 1 != len(header):
                    raise DataError(f"{path} line {lineno} has {text.count(chr(9)) + 1} tab-separated fields but the "
                                    f"header has {len(header)} ({header}); remove stray tabs from that line")
    if rows == 0:
        what = "has a header but no rows" if header else "is empty"
        raise DataError(f"{path} {what}; point data.path at a file with labelled examples")
    return header


def _load_dataset(*args: Any, **kwargs: Any) -> Any:
    import datasets

    was_off = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # a bar per file is noise in a search log
    try:  # Arrow caches go under our cache, never next to the data (its directory may be read-only)
        return datasets.load_dataset(*args, cache_dir=str(cache_root() / "datasets"), **kwargs)
    finally:
        if not was_off:
            datasets.enable_progress_bars()


def _read_file(path: Path, fmt: str) -> _Table:
    header = _scan(path, fmt)
    import datasets

    kwargs: dict[str, Any] = {}
    if fmt in ("tsv", "csv"):
        # Every column as text: labels are parsed below, and text such as "007" or "NA" must stay verbatim.
        kwargs = dict(features=datasets.Features({c: datasets.Value("string") for c in header or []}),
                      keep_default_na=False, index_col=False)
        if fmt == "tsv":  # GLUE TSV has no quoting: a '"' inside a sentence is just a character
            kwargs.update(delimiter="\t", quoting=csv.QUOTE_NONE)
    try:
        ds = _load_dataset("csv" if fmt in ("tsv", "csv") else "json", data_files={"train": str(path)},
                           split="train", **kwargs)
    except Exception as exc:
        cause = exc.__cause__ or exc
        raise DataError(f"could not read {path} as {fmt}: {type(cause).__name__}: {str(cause)[:300]}. "
                        f"Check the file is valid {fmt}, or set data.format") from None
    if len(ds) == 0:
        raise DataError(f"{path} has no rows; point data.path at a file with labelled examples")
    return _Table(ds.to_dict(), str(path))


def _load_hub(data: DataSpec) -> tuple[_Table, _Table, str]:
    import datasets

    name = f"{data.hub_id}:{data.hub_config}" if data.hub_config else str(data.hub_id)
    try:
        dd = _load_dataset(data.hub_id, data.hub_config)
    except datasets.exceptions.DatasetNotFoundError as exc:
        raise DataError(f"data.hub_id {data.hub_id!r} was not found on the hub ({exc}); check the id, or use "
                        "data.path with local files") from None
    except (ConnectionError, TimeoutError, OSError) as exc:
        raise DataError(f"the datasets hub is unreachable while loading {name!r} ({type(exc).__name__}: {exc}); "
                        "download the data once and use data.path with local files (e.g. GLUE TSVs)") from None
    except ValueError as exc:
        raise DataError(f"could not load hub dataset {name!r}: {exc}. Check data.hub_config") from None
    splits = list(dd.keys())

    tables = []
    for split, key in ((data.train_split, "train_split"), (data.eval_split, "eval_split")):
        found = next((s for s in _with_alias(split) if s in splits), None)
        if found is None:
            raise DataError(f"hub dataset {name!r} has no split {split!r} (data.{key}); it has {splits}."
                            f"{close_matches(split, splits)} Set data.{key} to one of them.")
        names = {c: list(f.names) for c, f in dd[found].features.items() if isinstance(f, datasets.ClassLabel)}
        tables.append(_Table(dd[found].to_dict(), f"hub {name} split {found!r}", names))
    return tables[0], tables[1], f"hub {name}"


# ---------------------------------------------------------------------------------------------- columns, labels


def _detect_columns(columns: list[str], data: DataSpec, where: str) -> tuple[list[str], str]:
    shown = ", ".join(repr(c) for c in columns)
    for key, wanted in (("label_column", [data.label_column]), ("text_columns", data.text_columns or [])):
        for col in wanted:
            if col is not None and col not in columns:
                raise DataError(f"column {col!r} (data.{key}) is not in {where}; columns found: {shown}."
                                f"{close_matches(col, columns)} Set data.{key} to one of them.")
    label = data.label_column or next((c for c in LABEL_COLUMNS if c in columns), None)
    if label is None:
        raise DataError(f"no label column in {where}: looked for 'label' or 'labels'; columns found: {shown}. "
                        "Set data.label_column to the column that holds the class.")
    layouts = [list(p) for p in PAIR_LAYOUTS] + [[s] for s in SINGLE_LAYOUTS]
    texts = data.text_columns or next((lay for lay in layouts if all(c in columns for c in lay)), None)
    if texts is None:
        raise DataError(f"no text column in {where}: columns found: {shown}; known layouts are sentence, text, "
                        "sentence1/sentence2, question/sentence, question1/question2, premise/hypothesis, "
                        "text_a/text_b. Set data.text_columns to one or two column names.")
    if label in texts:
        raise DataError(f"column {label!r} is both a text column and the label column in {where}; "
                        "set data.text_columns and data.label_column to different columns")
    return texts, label


def _texts(tab: _Table, cols: list[str]) -> list[tuple[str, ...]]:
    values = [tab.columns[c] for c in cols]
    for col, vals in zip(cols, values):
        bad = [i for i, v in enumerate(vals) if v is None]
        if bad:
            raise DataError(f"{tab.where}: {len(bad)} rows have no text in column {col!r} (first: row {bad[0]}); "
                            "fill or drop them")
    # JSON may hold numbers in a text column; the tokenizer wants strings.
    return [tuple(v if isinstance(v, str) else str(v) for v in row) for row in zip(*values)]


def _normalise_label(v: Any) -> Any:
    """int for integer-looking labels, stripped str otherwise, None when missing."""
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return int(v)
    if isinstance(v, float):
        if v != v or v.is_integer():  # NaN is missing
            return None if v != v else int(v)
        raise DataError(f"label value {v!r} is not a class: autocompress compresses classifiers, not regression "
                        "models (e.g. STS-B); set data.label_column to a column of classes")
    s = None if v is None else str(v).strip()
    return None if not s else int(s) if _INT.fullmatch(s) else s


def _raw_labels(tab: _Table, col: str, *, train_values: set[Any] | None) -> list[Any]:
    """Normalised labels; ``train_values`` is given for the evaluation split, whose -1 may mean 'unlabelled'."""
    raw = tab.columns[col]
    values = [_normalise_label(v) for v in raw]
    # GLUE test files mark unlabelled rows with -1; -1 only means "missing" when train never uses it.
    no_label = {None} if train_values is None or -1 in train_values else {None, -1}
    missing = [i for i, v in enumerate(values) if v in no_label]
    if train_values is not None and len(missing) == len(values):
        raise DataError(f"the evaluation split ({tab.where}) has no labels: every value in column {col!r} is -1 "
                        "or empty (GLUE test files are unlabelled). Set data.eval_split to a labelled split ('dev').")
    if missing:
        raise DataError(f"{tab.where}: {len(missing)} rows have no label in column {col!r} (first: row {missing[0]}, "
                        f"value {raw[missing[0]]!r}); label or drop them")
    return values


def _label_mapping(train: list[Any], evaluation: list[Any], data: DataSpec, tab: _Table, col: str,
                   notes: list[str]) -> tuple[dict[str, int], list[str]]:
    seen = {str(v): v for v in [*train, *evaluation]}
    if data.labels is not None:
        names = [str(x) for x in data.labels]
        if len(set(names)) != len(names):
            raise DataError(f"data.labels {data.labels} lists a label twice; list each class once")
        unexpected = sorted(set(seen) - set(names))
        if unexpected:
            raise DataError(f"labels {unexpected[:10]} in column {col!r} are not in data.labels {data.labels}; "
                            "add them to data.labels, or fix the data")
        return {n: i for i, n in enumerate(names)}, names
    values = list(seen.values())
    if all(isinstance(v, int) for v in values):
        class_names = tab.class_names.get(col)
        if class_names is not None and all(0 <= v < len(class_names) for v in values):
            return {str(i): i for i in range(len(class_names))}, list(class_names)
        if set(values) == set(range(len(values))):
            return {str(i): i for i in range(len(values))}, [str(i) for i in range(len(values))]
        order = sorted(values)
    else:
        order = sorted(seen)  # strings (or a mix): sorted as text
    names = [str(v) for v in order]
    if len(names) <= 20:
        notes.append("labels mapped to class indices in sorted order: "
                     + ", ".join(f"{n}={i}" for i, n in enumerate(names)))
    return {n: i for i, n in enumerate(names)}, names


# ---------------------------------------------------------------------------------------------- tokenisation


@dataclass
class Encoded:
    input_ids: list[np.ndarray]  # int32 per example, with special tokens, truncated to max_length
    token_type_ids: list[np.ndarray] | None
    labels: np.ndarray  # int64
    truncated: int  # examples whose length reached max_length

    def __len__(self) -> int:
        return len(self.input_ids)

    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.input_ids), dtype=np.int64, count=len(self.input_ids))


def _tokenizer_key(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return json.dumps([getattr(tokenizer, "name_or_path", ""), sorted(tokenizer.get_vocab().items())])
    # The full fast-tokenizer definition, minus the truncation/padding state that every call rewrites.
    spec = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
    return json.dumps(spec, sort_keys=True)


def encode(split: Split, tokenizer: Any, *, max_length: int, cache_dir: str | Path | None) -> Encoded:
    """Tokenise ``split`` once (batched, unpadded), or load it from the ``.npz`` cache in ``cache_dir``."""
    h = hashlib.sha256(f"{_ENCODE_VERSION}|{type(tokenizer).__module__}.{type(tokenizer).__qualname__}|{max_length}|"
                       f"{_tokenizer_key(tokenizer)}".encode())
    h.update(json.dumps([split.texts, split.labels], ensure_ascii=False).encode())
    path = Path(cache_dir) / f"encoded-{h.hexdigest()[:24]}.npz" if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            return _load_encoded(path)
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache file is rebuilt below
    want_tt = "token_type_ids" in getattr(tokenizer, "model_input_names", ["token_type_ids"])
    pair = bool(split.texts) and len(split.texts[0]) == 2
    ids: list[np.ndarray] = []
    tts: list[np.ndarray] = []
    for start in range(0, len(split), 4096):  # chunks bound the memory of the Python lists the tokenizer returns
        chunk = split.texts[start:start + 4096]
        out = tokenizer([t[0] for t in chunk], [t[1] for t in chunk] if pair else None, truncation=True,
                        max_length=max_length, padding=False, return_attention_mask=False,
                        return_token_type_ids=want_tt)
        ids += [np.asarray(x, dtype=np.int32) for x in out["input_ids"]]
        tts += [np.asarray(x, dtype=np.int8) for x in out["token_type_ids"]] if want_tt else []
    enc = Encoded(ids, tts if want_tt else None, np.asarray(split.labels, dtype=np.int64),
                  int(sum(len(x) >= max_length for x in ids)))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"ids": np.concatenate(ids or [np.zeros(0, np.int32)]), "labels": enc.labels,
                  "offsets": np.concatenate([[0], np.cumsum(enc.lengths())]).astype(np.int64),
                  "truncated": np.asarray(enc.truncated, dtype=np.int64)}
        if want_tt:
            arrays["tt"] = np.concatenate(tts or [np.zeros(0, np.int8)])
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        with tmp.open("wb") as fh:  # write then rename: a concurrent reader never sees half a file
            np.savez(fh, **arrays)
        os.replace(tmp, path)
    return enc


def _load_encoded(path: Path) -> Encoded:
    with np.load(path, allow_pickle=False) as z:
        cut = z["offsets"][1:-1]
        n = len(z["offsets"]) - 1
        ids = np.split(z["ids"], cut) if n else []
        tt = (np.split(z["tt"], cut) if n else []) if "tt" in z.files else None
        return Encoded(ids, tt, z["labels"], int(z["truncated"]))


# Examples sorted by length within windows of this many batches (transformers' ``group_by_length`` uses 50).
_MEGABATCH = 50


def length_grouped(order: np.ndarray, lengths: np.ndarray, *, batch_size: int, seed: int) -> list[np.ndarray]:
    """``order`` (already shuffled) cut into batches of similar length, in a shuffled batch order.

    Windows of ``_MEGABATCH`` batches are sorted by length and cut, as transformers' ``group_by_length``
    does: every example is still drawn once per epoch and a batch mixes examples from across the window,
    but a batch pads to its own longest example, which is now close to its shortest. SST-2's phrases (13
    tokens on average, up to 64) pad to ~3x their tokens in random batches of 32 and ~1.05x grouped."""
    window = _MEGABATCH * batch_size
    out: list[np.ndarray] = []
    for start in range(0, len(order), window):
        chunk = order[start:start + window]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        out += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [out[i] for i in _rng(seed, stream=1).permutation(len(out))]


def batches(enc: Encoded, *, batch_size: int, device: Any = "cpu", shuffle: bool = False, seed: int = 0,
            indices: Sequence[int] | None = None, pad_token_id: int = 0, group_by_length: bool = False,
            drop_last: bool = False, with_index: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Batches padded to their own longest example (not a global max_length), moved to ``device``.
    ``group_by_length`` (with ``shuffle``) draws batches of similar length (:func:`length_grouped`).
    ``with_index`` adds ``example_index`` (positions in ``enc``), used to look up cached teacher outputs."""
    import torch

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = np.arange(len(enc)) if indices is None else np.asarray(indices, dtype=np.int64)
    if shuffle:
        order = _rng(seed).permutation(order)
    if shuffle and group_by_length:
        chunks = length_grouped(order, enc.lengths(), batch_size=batch_size, seed=seed)
    else:
        chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for idx in chunks:
        if drop_last and len(idx) < batch_size:
            continue
        width = max(len(enc.input_ids[i]) for i in idx)
        ids = np.full((len(idx), width), pad_token_id, dtype=np.int64)
        mask = np.zeros((len(idx), width), dtype=np.int64)
        tt = np.zeros((len(idx), width), dtype=np.int64)
        for row, i in enumerate(idx):
            n = len(enc.input_ids[i])
            ids[row, :n], mask[row, :n] = enc.input_ids[i], 1
            if enc.token_type_ids is not None:
                tt[row, :n] = enc.token_type_ids[i]
        batch = {"input_ids": ids, "attention_mask": mask, "labels": enc.labels[idx].astype(np.int64)}
        if enc.token_type_ids is not None:
            batch["token_type_ids"] = tt
        if with_index:
            batch["example_index"] = idx.astype(np.int64)
        yield {k: torch.from_numpy(v).to(device) for k, v in batch.items()}


def infinite_batches(enc: Encoded, *, batch_size: int, device: Any = "cpu", seed: int = 0, pad_token_id: int = 0,
                     group_by_length: bool = False, with_index: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Shuffled batches forever; epoch ``e`` is shuffled with ``seed + e`` so runs repeat."""
    if len(enc) == 0:
        raise DataError("cannot draw training batches from an empty split; check data.max_train_examples and the data")
    for epoch in itertools.count():
        yield from batches(enc, batch_size=batch_size, device=device, shuffle=True, seed=seed + epoch,
                           pad_token_id=pad_token_id, group_by_length=group_by_length, with_index=with_index)
