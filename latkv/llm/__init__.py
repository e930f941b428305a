"""A small, torch-free runner for Llama-family GGUF decoder models (NumPy forward).

`Model.load` reads a GGUF file (``llama`` or ``qwen2`` architecture) with the ``gguf``
package, dequantizes its weights to float32 and builds its byte-level BPE tokenizer;
`Model.forward` runs the decoder and can capture or transform every layer's KV cache.
"""

from latkv.llm.gguf_model import SUPPORTED_ARCHITECTURES, ModelConfig
from latkv.llm.model import LayerCache, Model

__all__ = ["SUPPORTED_ARCHITECTURES", "LayerCache", "Model", "ModelConfig"]
