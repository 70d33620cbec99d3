from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from autocompress.tiny import make_tiny_classifier, make_tiny_model_dir, tiny_vocab, write_glue_tsv

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_model():
    return make_tiny_classifier()


@pytest.fixture
def tiny_inputs():
    torch.manual_seed(1)
    ids = torch.randint(5, len(tiny_vocab()), (4, 12))
    ids[:, 0] = 2  # [CLS]
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0  # a padded row: techniques must respect padding
    ids[2, 8:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture
def tiny_data_dir(tmp_path) -> Path:
    return write_glue_tsv(tmp_path / "data")


@pytest.fixture(scope="session")
def sst2_dir() -> Path:
    """The real SST-2 directory, or skip with the reason."""
    d = Path(os.environ.get("AUTOCOMPRESS_SST2_DIR", ROOT.parent / "shared" / "data" / "sst2"))
    if not (d / "train.tsv").is_file():
        pytest.skip(f"SST-2 data not found at {d}; set AUTOCOMPRESS_SST2_DIR to a GLUE SST-2 directory")
    return d


def write_tiny_spec(tmp_path: Path, model_dir: Path, data_dir: Path, *, study: str = "tiny", trials: int = 4,
                    techniques: str | None = None, extra: str = "") -> Path:
    """A complete spec for a seconds-long search on the tiny model and data."""
    techniques = techniques or (
        "  head_pruning: {params: {fraction: [0.1, 0.7], importance_batches: 2}}\n"
        "  quantization: {}\n"
    )
    text = (
        f"study: {study}\n"
        f"model: {{name: {model_dir}, max_length: 32}}\n"
        f"data: {{path: {data_dir}, validation_size: 24}}\n"
        "baseline: {max_steps: 40, batch_size: 16, learning_rate: 3.0e-3}\n"
        "recovery: {steps: 4, batch_size: 16}\n"
        "measurement: {latency_examples: 16, repeats: 1, warmup: 0, batch_sizes: [8, 1], max_batches: 2}\n"
        "objectives: [accuracy, latency_bs8, size_mb]\n"
        f"techniques:\n{techniques}"
        f"search: {{trials: {trials}, sampler: random, seed: 0}}\n"
        f"{extra}"
    )
    path = tmp_path / f"{study}.yaml"
    path.write_text(text)
    return path


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("AUTOCOMPRESS_CACHE", str(cache))
    return cache
