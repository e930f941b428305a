"""latkv: torch-free KV-cache compression.

Every quantizer is a frozen config with ``encode``, ``decode``, ``scores``, ``code_size`` and
``bits_per_coordinate``; ``latkv.quantizer("scalar:4", dim=128)`` builds one from a spec
string, and ``latkv.save`` / ``latkv.load`` store its ``Codes``.
"""

from latkv.cache import KVCache
from latkv.container import Codes, load, save
from latkv.packing import pack_bits, packed_length, unpack_bits
from latkv.quantizer import Quantizer
from latkv.registry import METHODS, quantizer, quantizer_for
from latkv.rotations import Hadamard, RandomizedHadamard, RandomOrthogonal
from latkv.e8 import E8Quant
from latkv.polar import PolarQuant
from latkv.qet import QET
from latkv.qjl import QJL
from latkv.scalar import ScalarQuant
from latkv.turbo import TurboQuant

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "Codes",
    "E8Quant",
    "Hadamard",
    "KVCache",
    "PolarQuant",
    "QET",
    "QJL",
    "Quantizer",
    "RandomOrthogonal",
    "RandomizedHadamard",
    "ScalarQuant",
    "TurboQuant",
    "load",
    "pack_bits",
    "packed_length",
    "quantizer",
    "quantizer_for",
    "save",
    "unpack_bits",
]
