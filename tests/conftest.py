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
