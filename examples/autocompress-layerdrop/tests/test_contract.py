"""autocompress's contract suite, run on this plugin (identity, claimed effects, save/reload, CUDA when
present, composition with every other installed technique), plus checks of the layer choice itself."""

from __future__ import annotations

import pytest

from autocompress.testing import TechniqueContract, tiny_model
from autocompress_layerdrop.layer_drop import LayerDrop, layers_to_drop


class TestLayerDropContract(TechniqueContract):
    technique = LayerDrop()
    # The plugin module, so the suite also runs from a source tree that is not installed; once installed,
    # the entry point loads the same module and this entry is skipped.
    plugins = ("autocompress_layerdrop.layer_drop",)


@pytest.mark.parametrize("which,expected", [
    ("top", [8, 9, 10, 11]),
    ("bottom", [0, 1, 2, 3]),
    ("every_other", [2, 5, 8, 11]),
    ("middle", [4, 5, 6, 7]),
])
def test_which_layers_go(which, expected):
    assert layers_to_drop(12, 1 / 3, which) == expected


def test_every_other_matches_layerdrop_rule():
    # Fan et al.: rate p drops depth d (1-based) with d % floor(1/p) == 0; p = 0.5 -> 2nd, 4th, ... layer.
    assert layers_to_drop(12, 0.5, "every_other") == [1, 3, 5, 7, 9, 11]


def test_at_least_one_layer_stays():
    assert layers_to_drop(2, 0.75, "top") == [1]
    assert layers_to_drop(1, 0.75, "top") == []


def test_restore_rebuilds_the_depth():
    from autocompress.technique import TechniqueContext

    tech = LayerDrop()
    model = tiny_model()
    record = tech.apply(model, params={"drop": 0.5, "which": "bottom"}, ctx=TechniqueContext())
    fresh = tiny_model(seed=1)
    tech.restore(fresh, phase="apply", params={"drop": 0.5, "which": "bottom"}, record=record)
    assert fresh.config.num_hidden_layers == model.config.num_hidden_layers == 2
    assert set(fresh.state_dict()) == set(model.state_dict())
