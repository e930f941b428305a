"""``KVCache``: a streaming key/value cache that attends from the compressed codes.

Keys and values arrive as ``(batch, kv_heads, t, dim)`` arrays (``t = 1`` per decode step, or a
whole prefill). The newest tokens stay exact (float16) in a *window*; once more than
``residual`` tokens are exact, the oldest whole blocks of ``block`` tokens are compressed, keys
and values each with their own quantizer, and the window keeps the rest. Block ``i`` always
holds tokens ``i * block .. (i + 1) * block - 1``: a block is compressed once the token count
``n`` reaches ``(i + 1) * block + residual``. Which tokens are compressed, and how, depends only
on the token count, so appending one token at a time gives the same cache as one prefill.

``attention(q)`` takes queries ``(batch, q_heads, tq, dim)`` for the last ``tq`` positions
(``q_heads`` a multiple of ``kv_heads``: grouped-query attention) and computes

    softmax(q K^T * scale + causal mask) V

with the scores of compressed keys from the key quantizer's ``scores`` (never decoding the
keys: QJL's estimator, TurboQuant's codebook look-up on the rotated query, E8's lattice
points, ...), the exact window in float32, the softmax in float32 and the compressed values
decoded per block. This is the NumPy/CuPy reference; fused kernels follow.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from latkv._backend import array_module
from latkv.checks import check_float_array, check_int
from latkv.container import Codes
from latkv.quantizer import Quantizer


class KVCache:
    """A key/value cache whose older tokens are stored as codes.

    Parameters
    ----------
    key_quantizer, value_quantizer : Quantizer
        Same ``dim``; each block of ``block`` tokens of every head is encoded as one
        ``(batch, kv_heads, block, dim)`` array.
    residual : int
        Newest tokens kept exact in float16 (KIVI's residual), ``>= 0``.
    block : int
        Tokens compressed together, ``>= 1`` (the unit of per-block statistics such as KIVI's
        per-channel groups).

    Examples
    --------
    >>> import numpy as np, latkv
    >>> cache = latkv.KVCache(latkv.TurboQuant(dim=64, bits=4), latkv.TurboQuant(dim=64, bits=4),
    ...                       residual=32, block=64)
    >>> rng = np.random.default_rng(0)
    >>> cache.append(rng.standard_normal((1, 2, 200, 64)), rng.standard_normal((1, 2, 200, 64)))
    >>> len(cache), cache.compressed_tokens
    (200, 128)
    >>> cache.attention(rng.standard_normal((1, 4, 1, 64))).shape
    (1, 4, 1, 64)
    """

    def __init__(self, key_quantizer: Quantizer, value_quantizer: Quantizer, residual: int = 128,
                 block: int = 128) -> None:
        for name, qz in (("key_quantizer", key_quantizer), ("value_quantizer", value_quantizer)):
            if not isinstance(qz, Quantizer):
                raise TypeError(f"{name} must be a latkv quantizer, got {type(qz).__name__}")
        if key_quantizer.dim != value_quantizer.dim:
            raise ValueError(f"key and value quantizers have different dims "
                             f"({key_quantizer.dim} and {value_quantizer.dim})")
        self.key_quantizer = key_quantizer
        self.value_quantizer = value_quantizer
        self.residual = check_int(residual, "residual", 0)
        self.block = check_int(block, "block", 1)
        self.dim = key_quantizer.dim
        self.key_blocks: list[Codes] = []
        self.value_blocks: list[Codes] = []
        self._keys: Any = None     # the exact window, float16 (batch, kv_heads, w, dim)
        self._values: Any = None
        self._length = 0

    # -- state -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._length

    @property
    def compressed_tokens(self) -> int:
        return len(self.key_blocks) * self.block

    @property
    def nbytes(self) -> int:
        """Exact bytes: every block's codes plus the float16 window of keys and values."""
        window = 0 if self._keys is None else int(self._keys.nbytes + self._values.nbytes)
        return window + sum(c.nbytes for c in self.key_blocks + self.value_blocks)

    # -- appending ---------------------------------------------------------------------------

    def append(self, k: Any, v: Any) -> None:
        """Append ``k, v : (batch, kv_heads, t, dim)`` (float16/32/64, NumPy or CuPy)."""
        k = check_float_array(k, "k", dim=self.dim, min_ndim=4)
        v = check_float_array(v, "v", dim=self.dim, min_ndim=4)
        if k.ndim != 4 or k.shape != v.shape:
            raise ValueError(f"k and v must both be (batch, kv_heads, t, dim), got "
                             f"{tuple(k.shape)} and {tuple(v.shape)}")
        xp = array_module(k)
        if array_module(v) is not xp:
            raise ValueError("k and v must be in the same array module (NumPy or CuPy)")
        k16, v16 = k.astype(xp.float16), v.astype(xp.float16)
        if self._keys is None:
            self._keys, self._values = k16, v16
        else:
            if k.shape[:2] != self._keys.shape[:2] or array_module(self._keys) is not xp:
                raise ValueError(f"k has batch and heads {tuple(k.shape[:2])} in "
                                 f"{xp.__name__}; the cache holds "
                                 f"{tuple(self._keys.shape[:2])} in "
                                 f"{array_module(self._keys).__name__}")
            self._keys = xp.concatenate([self._keys, k16], axis=2)
            self._values = xp.concatenate([self._values, v16], axis=2)
        self._length += int(k.shape[2])
        while self._length - self.compressed_tokens >= self.block + self.residual:
            self._compress_oldest_block()

    def _compress_oldest_block(self) -> None:
        keys, values = self._keys[:, :, :self.block], self._values[:, :, :self.block]
        self.key_blocks.append(self.key_quantizer.encode(keys))
        self.value_blocks.append(self.value_quantizer.encode(values))
        self._keys, self._values = self._keys[:, :, self.block:], self._values[:, :, self.block:]

    # -- attention ---------------------------------------------------------------------------

    def attention(self, q: Any, *, scale: float | None = None) -> Any:
        """``softmax(q K^T scale + mask) V`` for ``q : (batch, q_heads, tq, dim)``.

        The queries are the last ``tq`` positions of the cache; with ``tq > 1`` each attends
        causally (to its own position and earlier). ``scale`` defaults to ``1 / sqrt(dim)``.

        Returns
        -------
        (batch, q_heads, tq, dim) float32
        """
        if self._length == 0:
            raise ValueError("the cache is empty: append keys and values first")
        q = check_float_array(q, "q", dim=self.dim, min_ndim=4)
        batch, kv_heads = self._keys.shape[:2]
        if q.ndim != 4 or q.shape[0] != batch or q.shape[1] % kv_heads:
            raise ValueError(f"q must be (batch={batch}, q_heads (a multiple of {kv_heads}), "
                             f"tq, {self.dim}), got {tuple(q.shape)}")
        tq = int(q.shape[2])
        if tq > self._length:
            raise ValueError(f"q has {tq} positions but the cache holds {self._length} tokens")
        xp = array_module(self._keys)
        if array_module(q) is not xp:
            raise ValueError("q and the cache must be in the same array module")
        scale = 1.0 / math.sqrt(self.dim) if scale is None else float(scale)
        group = q.shape[1] // kv_heads
        # (batch, kv_heads, group * tq, dim): the queries of one KV head side by side
        grouped = q.astype(xp.float32).reshape(batch, kv_heads, group * tq, self.dim)
        pieces = [self.key_quantizer.scores(grouped, codes) for codes in self.key_blocks]
        pieces.append(grouped @ xp.swapaxes(self._keys.astype(xp.float32), -1, -2))
        logits = xp.concatenate(pieces, axis=-1) * xp.float32(scale)
        positions = xp.arange(self._length)
        query_positions = xp.arange(self._length - tq, self._length)
        allowed = positions[None, :] <= query_positions[:, None]            # (tq, n)
        allowed = xp.tile(allowed, (group, 1))                               # (group * tq, n)
        logits = xp.where(allowed, logits, -xp.inf)
        logits = logits - logits.max(axis=-1, keepdims=True)
        weights = xp.exp(logits)
        weights /= weights.sum(axis=-1, keepdims=True)
        output = xp.zeros((batch, kv_heads, group * tq, self.dim), dtype=xp.float32)
        start = 0
        for codes in self.value_blocks:
            values = self.value_quantizer.decode(codes).astype(xp.float32)
            output += weights[..., start:start + self.block] @ values
            start += self.block
        output += weights[..., start:] @ self._values.astype(xp.float32)
        return output.reshape(batch, q.shape[1], tq, self.dim)
