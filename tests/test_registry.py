"""Spec strings and stable ids."""

from __future__ import annotations

import pytest

import latkv
from latkv.registry import METHODS, format_spec, method_class_by_id, parse_spec


def test_spec_strings_build_the_documented_quantizers():
    qz = latkv.quantizer("scalar:2,axis=channel,group=64", dim=128)
    assert qz == latkv.ScalarQuant(dim=128, bits=2, group=64, axis="channel")
    assert latkv.quantizer("scalar:3,dim=96") == latkv.ScalarQuant(dim=96, bits=3)
    assert latkv.quantizer("scalar", dim=64) == latkv.ScalarQuant(dim=64)
    assert parse_spec("scalar:4") == ("scalar", {"bits": 4})


@pytest.mark.parametrize("name", sorted(METHODS))
def test_canonical_spec_round_trips(name):
    qz = latkv.quantizer(name, dim=64)
    assert latkv.quantizer(qz.spec) == qz
    assert format_spec(*parse_spec(qz.spec)) == qz.spec


def test_ids_are_stable_and_unique():
    # these numbers are written into files: changing one breaks every saved file
    assert METHODS["scalar"].method_id == 1
    assert method_class_by_id(1) is latkv.ScalarQuant
    ids = [cls.method_id for cls in METHODS.values()]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("spec,match", [
    ("", "non-empty"), ("nosuch:4", "unknown method"), ("scalar:4,axis", "key=value"),
    ("scalar:4,bits=3", "twice"), ("scalar:4,colour=red", "colour"), ("scalar:99", "bits"),
])
def test_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        latkv.quantizer(spec, dim=64)


def test_spec_needs_a_dim():
    with pytest.raises(ValueError, match="needs a dim"):
        latkv.quantizer("scalar:4")
