"""Regenerate latkv/data/smollm2-kv.npz from SmolLM2-135M-Instruct (`latkv model fetch smollm2`).

    python scripts/make_sample.py
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from latkv.capture import capture_kv, capture_metadata, default_text, save_capture
from latkv.llm import Model
from latkv.llm.fetch import resolve_model
from latkv.sample import SAMPLE_CHUNK_TOKENS, SAMPLE_CHUNKS, SAMPLE_FILE, SAMPLE_LAYERS


def main() -> None:
    model = Model.load(resolve_model("smollm2"))
    text, source = default_text()
    ids = model.tokenizer.encode(text)
    data = capture_kv(model, ids, chunk_tokens=SAMPLE_CHUNK_TOKENS, chunks=SAMPLE_CHUNKS,
                      layers=SAMPLE_LAYERS, dtype=np.float16)
    metadata = capture_metadata(model, text=text, source=source,
                                chunk_tokens=SAMPLE_CHUNK_TOKENS, chunks=SAMPLE_CHUNKS,
                                layers=list(SAMPLE_LAYERS), dtype=np.float16,
                                model_name="smollm2")
    out = Path(__file__).resolve().parent.parent / "latkv" / "data" / SAMPLE_FILE
    save_capture(out, data, metadata)
    print(f"wrote {out}: {os.path.getsize(out) / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
