"""The embedded real KV sample: SmolLM2-135M-Instruct caches on Python stdlib docstrings.

``latkv/data/smollm2-kv.npz`` holds, for layers 0, 7, 15, 22 and 29 of the 30, two chunks of
160 tokens (each its own sequence): ``q_L{l}`` (9, 320, 64), ``k_L{l}`` / ``k_pre_L{l}`` /
``v_L{l}`` (3, 320, 64) in float16, with ``chunk_offsets``, ``token_ids`` and JSON
``metadata`` (model file and SHA-256, text source and SHA-256, layers, chunking). It is the
layout `latkv.capture` writes; ``scripts/make_sample.py`` regenerates it from the model.
"""

from __future__ import annotations

from importlib import resources

import numpy as np

SAMPLE_FILE = "smollm2-kv.npz"
SAMPLE_DESCRIPTION = "the embedded SmolLM2-135M sample (latkv/data/smollm2-kv.npz)"
#: what ``scripts/make_sample.py`` captures
SAMPLE_LAYERS = (0, 7, 15, 22, 29)
SAMPLE_CHUNK_TOKENS = 160
SAMPLE_CHUNKS = 2


def sample_path() -> str:
    return str(resources.files("latkv").joinpath("data", SAMPLE_FILE))


def load_sample() -> dict[str, np.ndarray]:
    """The sample as a dict of arrays (validated like any ``--kv`` file)."""
    from latkv.compare import load_kv

    return load_kv(sample_path())
