"""latkv: torch-free KV-cache compression."""

from latkv.packing import pack_bits, packed_length, unpack_bits
from latkv.rotations import Hadamard, RandomizedHadamard, RandomOrthogonal

__version__ = "0.1.0"

__all__ = [
    "Hadamard",
    "RandomOrthogonal",
    "RandomizedHadamard",
    "pack_bits",
    "packed_length",
    "unpack_bits",
]
