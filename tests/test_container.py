"""save/load: round trips, atomic writes, and refusal of every damaged or foreign file."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import latkv
from latkv.container import CHECKSUM_SIZE, MAGIC, PREFIX, from_bytes, to_bytes


def _codes(rng, shape=(3, 5, 64), **params):
    qz = latkv.ScalarQuant(dim=shape[-1], **params)
    return qz, qz.encode(rng.standard_normal(shape).astype(np.float32))


def _same(a: latkv.Codes, b: latkv.Codes) -> None:
    assert a.method == b.method and dict(a.params) == dict(b.params)
    assert tuple(a.shape) == tuple(b.shape) and a.dtype == b.dtype
    assert set(a.arrays) == set(b.arrays)
    for key in a.arrays:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape
        assert np.array_equal(a[key], b[key])


@given(bits=st.integers(1, 8), tokens=st.integers(1, 40), axis=st.sampled_from(["token", "channel"]),
       dtype=st.sampled_from([np.float16, np.float32]), seed=st.integers(0, 2**16))
def test_round_trip_every_field(bits, tokens, axis, dtype, seed):
    rng = np.random.default_rng(seed)
    qz = latkv.ScalarQuant(dim=64, bits=bits, group=16, axis=axis)
    codes = qz.encode(rng.standard_normal((2, tokens, 64)).astype(dtype))
    loaded = from_bytes(to_bytes(codes))
    _same(codes, loaded)
    assert np.array_equal(qz.decode(loaded), qz.decode(codes))


def test_save_load_file_and_layout(tmp_path, rng):
    qz, codes = _codes(rng)
    path = tmp_path / "codes.lkv"
    latkv.save(path, codes)
    data = path.read_bytes()
    # the documented prefix: magic, version 1, flags 0, header length, payload length
    magic, version, flags, header_length, payload_length = PREFIX.unpack_from(data, 0)
    assert magic == b"\x89LATKV\r\n" and version == 1 and flags == 0
    start = -(-(24 + header_length) // 64) * 64
    assert len(data) == start + payload_length + 32
    _same(codes, latkv.load(path))
    assert [p.name for p in tmp_path.iterdir()] == ["codes.lkv"]  # no temporary left behind


def test_atomic_write_leaves_old_file_on_failure(tmp_path, rng, monkeypatch):
    qz, codes = _codes(rng)
    path = tmp_path / "codes.lkv"
    latkv.save(path, codes)
    before = path.read_bytes()

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        latkv.save(path, _codes(rng, bits=2)[1])
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["codes.lkv"]


def test_every_single_bit_flip_is_refused(rng):
    _, codes = _codes(rng, shape=(2, 64), bits=3)
    data = bytearray(to_bytes(codes))
    for position in range(len(data)):
        for bit in (0, 7) if position % 5 else range(8):
            damaged = bytearray(data)
            damaged[position] ^= 1 << bit
            with pytest.raises(ValueError, match="not a valid latkv codes file"):
                from_bytes(bytes(damaged))


def test_every_truncation_and_extension_is_refused(rng):
    _, codes = _codes(rng, shape=(2, 64), bits=3)
    data = to_bytes(codes)
    for length in range(len(data)):
        with pytest.raises(ValueError, match="not a valid latkv codes file"):
            from_bytes(data[:length])
    with pytest.raises(ValueError, match="trailing bytes"):
        from_bytes(data + b"\x00")


@pytest.mark.parametrize("content,message", [
    (b"", "empty"),
    (b"PK\x03\x04" + b"\x00" * 100, "magic"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, "magic"),
    (b"hello", "magic"),
])
def test_foreign_files_are_refused(tmp_path, content, message):
    path = tmp_path / "foreign.lkv"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        latkv.load(path)


def _rewrite(data: bytes, header: bytes, version: int = 1) -> bytes:
    """A well-checksummed file with another header (to reach the checks behind the checksum)."""
    import hashlib

    _, _, _, old_length, payload_length = PREFIX.unpack_from(data, 0)
    old_start = -(-(24 + old_length) // 64) * 64
    payload = data[old_start: old_start + payload_length]
    start = -(-(24 + len(header)) // 64) * 64
    body = (PREFIX.pack(MAGIC, version, 0, len(header), payload_length) + header
            + b"\x00" * (start - 24 - len(header)) + payload)
    return body + hashlib.sha256(body).digest()


def test_valid_checksum_but_inconsistent_header_is_refused(rng):
    import json

    _, codes = _codes(rng, shape=(2, 64), bits=3)
    data = to_bytes(codes)
    _, _, _, header_length, _ = PREFIX.unpack_from(data, 0)
    header = json.loads(data[24: 24 + header_length])
    cases = {
        "method id": dict(header, method_id=999),
        "shape": dict(header, shape=[3, 64]),
        "parameters": dict(header, params=dict(header["params"], bits=77)),
        "dtype": dict(header, dtype="int8"),
        "arrays": dict(header, arrays=header["arrays"][:1]),
    }
    for what, changed in cases.items():
        with pytest.raises(ValueError, match="not a valid latkv codes file"):
            from_bytes(_rewrite(data, json.dumps(changed).encode()))
    with pytest.raises(ValueError, match="not a valid latkv codes file"):
        from_bytes(_rewrite(data, b"{not json"))
    with pytest.raises(ValueError, match="version 2"):
        from_bytes(_rewrite(data, json.dumps(header).encode(), version=2))
    assert CHECKSUM_SIZE == 32


def test_load_missing_file_raises_oserror(tmp_path):
    with pytest.raises(FileNotFoundError):
        latkv.load(tmp_path / "missing.lkv")


def test_save_rejects_non_codes(tmp_path):
    with pytest.raises(TypeError, match="codes must be latkv.Codes"):
        latkv.save(tmp_path / "x.lkv", np.zeros(3))
    assert not (tmp_path / "x.lkv").exists()


def test_method_id_in_file_is_stable(rng):
    _, codes = _codes(rng, shape=(1, 64))
    data = to_bytes(codes)
    _, _, _, header_length, _ = PREFIX.unpack_from(data, 0)
    assert b'"method_id": 1' in data[24: 24 + header_length]
    assert struct.calcsize("<8sHHIQ") == 24
