"""``Codes``, and the versioned, checksummed file format of `save` / `load`.

File format, version 1 (little-endian; ``docs/spec/container.md`` restates it)
------------------------------------------------------------------------------
=========  =====================  ==========================================================
offset     size                   field
=========  =====================  ==========================================================
0          8                      magic ``89 4C 41 54 4B 56 0D 0A`` (``"\\x89LATKV\\r\\n"``)
8          2 (uint16)             format version, ``1``
10         2 (uint16)             flags, ``0`` (reserved)
12         4 (uint32)             ``H``: header length in bytes
16         8 (uint64)             ``P``: payload length in bytes
24         H                      header: UTF-8 JSON object (below)
24 + H     pad                    zeros up to the next multiple of 64
S          P                      payload: the arrays, each at a 64-byte-aligned offset
S + P      32                     SHA-256 of every preceding byte of the file
=========  =====================  ==========================================================

``S = 24 + H`` rounded up to a multiple of 64, and the file is exactly ``S + P + 32`` bytes.
The header holds ``method`` (registry name), ``method_id`` (the stable numeric id; the one
that decides, so files survive a rename), ``params`` (the quantizer's constructor arguments),
``shape`` and ``dtype`` of the encoded input, and ``arrays``: a list of ``{"name", "dtype",
"shape", "offset"}`` with offsets relative to ``S``, C order, little-endian. ``load`` checks the
size, the magic, the version, the checksum, the header's fields, and finally that the arrays
are what the named quantizer would have written for that shape; it raises ``ValueError``
saying which check failed.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from latkv._backend import array_module

MAGIC = b"\x89LATKV\r\n"
FORMAT_VERSION = 1
PREFIX = struct.Struct("<8sHHIQ")  # magic, version, flags, header length, payload length
ALIGNMENT = 64
CHECKSUM_SIZE = 32
ARRAY_DTYPES = ("uint8", "uint16", "uint32", "int8", "int16", "int32", "int64",
                "float16", "float32")
INPUT_DTYPES = ("float16", "float32", "float64")
MAX_HEADER = 1 << 24


@dataclass(frozen=True, eq=False)
class Codes:
    """The encoded form of an array: packed arrays plus what is needed to decode them.

    Attributes
    ----------
    method : str
        Registry name of the quantizer that wrote these codes (``"scalar"``, ...).
    params : dict
        That quantizer's constructor arguments (``dim``, ``bits``, ``seed``, ...); with
        ``method`` they rebuild it exactly (`latkv.quantizer_for`).
    shape : tuple of int
        Shape of the encoded input, ``(..., dim)``.
    dtype : str
        dtype of the encoded input; ``decode`` returns this dtype.
    arrays : dict of str to array
        Structure of arrays (packed codes, scales, norms, ...), NumPy or CuPy, all in one
        array module. Never a copy of the input.

    Notes
    -----
    ``nbytes`` counts every array, side information included: it is the exact storage needed
    to decode. The fixed per-file header of `save` is not part of it.

    Examples
    --------
    >>> import numpy as np, latkv
    >>> qz = latkv.ScalarQuant(dim=64, bits=4)
    >>> x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float16)
    >>> codes = qz.encode(x)
    >>> codes.method, codes.shape, codes.dtype, sorted(codes.arrays)
    ('scalar', (3, 64), 'float16', ['packed', 'scale', 'zero'])
    >>> codes["packed"].shape, codes.spec
    ((3, 32), 'scalar:4,dim=64,group=32,axis=token')
    >>> codes.nbytes == 3 * qz.code_size == 120       # 32 code bytes + 2 x 2 float16 a row
    True
    >>> qz.decode(codes).dtype
    dtype('float16')
    """

    method: str
    params: Mapping[str, Any]
    shape: tuple[int, ...]
    dtype: str
    arrays: Mapping[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Exact bytes of all arrays."""
        return int(sum(int(a.nbytes) for a in self.arrays.values()))

    @property
    def xp(self) -> Any:
        """The array module (``numpy`` or ``cupy``) holding the arrays."""
        first = next(iter(self.arrays.values()))
        return array_module(first)

    @property
    def spec(self) -> str:
        """The spec string of the quantizer that wrote these codes."""
        from latkv.registry import format_spec

        return format_spec(self.method, self.params)

    def __getitem__(self, name: str) -> Any:
        return self.arrays[name]

    def to_numpy(self) -> "Codes":
        """The same codes with every array on the host."""
        arrays = {k: (v if isinstance(v, np.ndarray) else v.get()) for k, v in self.arrays.items()}
        return Codes(self.method, dict(self.params), tuple(self.shape), self.dtype, arrays)

    def to_cupy(self) -> "Codes":
        """The same codes with every array on the current CUDA device."""
        import cupy

        arrays = {k: cupy.asarray(v) for k, v in self.arrays.items()}
        return Codes(self.method, dict(self.params), tuple(self.shape), self.dtype, arrays)


def _aligned(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def _header_and_payload(codes: Codes) -> tuple[bytes, list[tuple[int, bytes]], int]:
    from latkv.registry import method_class

    cls = method_class(codes.method)
    entries, chunks, offset = [], [], 0
    for name, array in codes.arrays.items():
        host = (np.asarray(array) if isinstance(array, (np.ndarray, np.generic))
                else array.get())
        host = np.ascontiguousarray(host).reshape(host.shape)  # keep 0-d arrays 0-d
        dtype = host.dtype.newbyteorder("<")
        if dtype.name not in ARRAY_DTYPES:
            raise TypeError(f"codes array {name!r} has dtype {host.dtype}, not one of {ARRAY_DTYPES}")
        entries.append({"name": name, "dtype": dtype.name, "shape": list(host.shape),
                        "offset": offset})
        chunks.append((offset, host.astype(dtype, copy=False).tobytes()))
        offset = _aligned(offset + host.nbytes)
    payload_length = offset if not chunks else chunks[-1][0] + len(chunks[-1][1])
    header = {
        "method": codes.method,
        "method_id": cls.method_id,
        "params": dict(codes.params),
        "shape": [int(s) for s in codes.shape],
        "dtype": str(codes.dtype),
        "arrays": entries,
    }
    return json.dumps(header, sort_keys=True).encode(), chunks, payload_length


def to_bytes(codes: Codes) -> bytes:
    """Serialise ``codes`` to the version-1 container format (the bytes `save` writes)."""
    if not isinstance(codes, Codes):
        raise TypeError(f"codes must be latkv.Codes, got {type(codes).__name__}")
    from latkv.registry import quantizer_for

    quantizer_for(codes).check_codes(codes, "codes")
    header, chunks, payload_length = _header_and_payload(codes)
    start = _aligned(PREFIX.size + len(header))
    buffer = bytearray(start + payload_length + CHECKSUM_SIZE)
    PREFIX.pack_into(buffer, 0, MAGIC, FORMAT_VERSION, 0, len(header), payload_length)
    buffer[PREFIX.size : PREFIX.size + len(header)] = header
    for offset, chunk in chunks:
        buffer[start + offset : start + offset + len(chunk)] = chunk
    buffer[-CHECKSUM_SIZE:] = hashlib.sha256(memoryview(buffer)[:-CHECKSUM_SIZE]).digest()
    return bytes(buffer)


def save(path: str | os.PathLike, codes: Codes) -> None:
    """Write ``codes`` to ``path`` atomically (temporary file in the same folder, then rename).

    Parameters
    ----------
    path : str or os.PathLike
        Destination; replaced whole or left untouched, never partially written.
    codes : Codes

    Examples
    --------
    >>> import numpy as np, latkv, tempfile, os
    >>> qz = latkv.ScalarQuant(dim=64, bits=4)
    >>> codes = qz.encode(np.ones((3, 64), dtype=np.float32))
    >>> path = os.path.join(tempfile.mkdtemp(), "k.lkv")
    >>> latkv.save(path, codes)
    >>> bool((latkv.load(path)["packed"] == codes["packed"]).all())
    True
    """
    data = to_bytes(codes)
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(handle, 0o666 & ~umask)  # mkstemp makes 0600; give the usual new-file mode
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def _corrupt(what: str) -> ValueError:
    return ValueError(f"not a valid latkv codes file: {what}")


def _parse_header(header_bytes: bytes) -> dict:
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _corrupt(f"header is not UTF-8 JSON ({error})") from None
    if not isinstance(header, dict):
        raise _corrupt("header is not a JSON object")
    expected = {"method": str, "method_id": int, "params": dict, "shape": list, "dtype": str,
                "arrays": list}
    for key, kind in expected.items():
        if not isinstance(header.get(key), kind) or isinstance(header.get(key), bool):
            raise _corrupt(f"header field {key!r} is missing or not a {kind.__name__}")
    if header["dtype"] not in INPUT_DTYPES:
        raise _corrupt(f"input dtype {header['dtype']!r} is not one of {INPUT_DTYPES}")
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in header["shape"]):
        raise _corrupt(f"shape {header['shape']!r} is not a list of non-negative integers")
    return header


def from_bytes(data: bytes | bytearray | memoryview) -> Codes:
    """Parse and validate the container format; the inverse of `to_bytes`."""
    from latkv.registry import method_class_by_id, quantizer_for

    data = memoryview(data)
    size = len(data)
    if size == 0:
        raise _corrupt("the file is empty")
    if size < PREFIX.size + CHECKSUM_SIZE:
        if bytes(data[: min(size, len(MAGIC))]) != MAGIC[: min(size, len(MAGIC))]:
            raise _corrupt(f"wrong magic bytes {bytes(data[:8])!r} (expected {MAGIC!r})")
        raise _corrupt(f"truncated: {size} bytes is shorter than the fixed header")
    magic, version, flags, header_length, payload_length = PREFIX.unpack_from(data, 0)
    if magic != MAGIC:
        raise _corrupt(f"wrong magic bytes {magic!r} (expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise _corrupt(f"format version {version} is not supported (this latkv reads "
                       f"version {FORMAT_VERSION})")
    if flags != 0:
        raise _corrupt(f"reserved flags are {flags}, expected 0")
    if header_length > MAX_HEADER:
        raise _corrupt(f"header length {header_length} exceeds {MAX_HEADER}")
    start = _aligned(PREFIX.size + header_length)
    expected_size = start + payload_length + CHECKSUM_SIZE
    if size != expected_size:
        state = "truncated" if size < expected_size else "has trailing bytes"
        raise _corrupt(f"{state}: the header describes {expected_size} bytes, the file has {size}")
    if hashlib.sha256(data[:-CHECKSUM_SIZE]).digest() != bytes(data[-CHECKSUM_SIZE:]):
        raise _corrupt("SHA-256 checksum mismatch (the file is corrupted)")
    header = _parse_header(bytes(data[PREFIX.size : PREFIX.size + header_length]))
    try:
        cls = method_class_by_id(header["method_id"])  # the id decides; the name is informative
    except ValueError as error:
        raise _corrupt(str(error)) from None
    payload = data[start : start + payload_length]
    arrays: dict[str, np.ndarray] = {}
    end_of_previous = 0
    for entry in header["arrays"]:
        if not isinstance(entry, dict):
            raise _corrupt("array entry is not an object")
        name, dtype, shape, offset = (entry.get(k) for k in ("name", "dtype", "shape", "offset"))
        if not isinstance(name, str) or name in arrays:
            raise _corrupt(f"array name {name!r} is missing or repeated")
        if dtype not in ARRAY_DTYPES:
            raise _corrupt(f"array {name!r} has dtype {dtype!r}, not one of {ARRAY_DTYPES}")
        if not isinstance(shape, list) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
        ):
            raise _corrupt(f"array {name!r} has an invalid shape {shape!r}")
        if not isinstance(offset, int) or offset < end_of_previous or offset % ALIGNMENT:
            raise _corrupt(f"array {name!r} has an invalid offset {offset!r}")
        itemsize = np.dtype(dtype).itemsize
        nbytes = int(np.prod(shape, dtype=np.int64)) * itemsize
        if offset + nbytes > payload_length:
            raise _corrupt(f"array {name!r} runs past the end of the payload")
        raw = bytearray(payload[offset : offset + nbytes])
        arrays[name] = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).astype(
            dtype, copy=False).reshape(shape)
        end_of_previous = offset + nbytes
    codes = Codes(cls.name, header["params"], tuple(header["shape"]), header["dtype"], arrays)
    try:
        quantizer_for(codes).check_codes(codes, "file")
    except (TypeError, ValueError) as error:
        raise _corrupt(str(error)) from None
    return codes


def load(path: str | os.PathLike) -> Codes:
    """Read codes written by `save`, refusing anything that is not exactly such a file.

    Parameters
    ----------
    path : str or os.PathLike
        A file written by `save`.

    Returns
    -------
    Codes
        With NumPy arrays (``Codes.to_cupy()`` moves them to the GPU).

    Raises
    ------
    ValueError
        Empty, truncated, extended, corrupted (checksum) or foreign files, unsupported
        versions, unknown method ids, and arrays inconsistent with the named quantizer; the
        message says which.

    Examples
    --------
    >>> import numpy as np, latkv, tempfile, pathlib
    >>> qz = latkv.ScalarQuant(dim=64, bits=4)
    >>> codes = qz.encode(np.random.default_rng(0).standard_normal((3, 64)))
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "k.lkv"
    >>> latkv.save(path, codes)
    >>> loaded = latkv.load(path)
    >>> latkv.quantizer_for(loaded) == qz, bool((qz.decode(loaded) == qz.decode(codes)).all())
    (True, True)
    >>> data = bytearray(path.read_bytes())
    >>> data[-100] ^= 1                                  # flip one bit of the payload
    >>> _ = path.write_bytes(data)
    >>> latkv.load(path)
    Traceback (most recent call last):
    ValueError: not a valid latkv codes file: SHA-256 checksum mismatch (the file is corrupted)
    """
    with open(path, "rb") as file:
        data = file.read()
    return from_bytes(data)
