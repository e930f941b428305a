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
points, ...), the exact window in float32, the softmax in float32 and the value sum from the
value quantizer's ``weighted_sum`` (rotation methods sum in the rotated domain and rotate back
once per query).

When keys and values are both TurboQuant-mse codes (no outlier split; per-block channel
statistics allowed), a decode step runs fused: one kernel per backend
(`latkv.attention.codebook_attention`: numba, CuPy, numba.cuda) reads the packed codes once and
returns the split-softmax partials of every block, which are combined with the window's in
float32. The compressed arrays of all blocks are kept contiguous (one buffer per array, grown
by a copy when a block is added: ``1 / block`` of the work of the attention steps between), so
a kernel reads the whole cache as one array.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from latkv._backend import array_module, implementation, resolve_backend
from latkv.attention import combine_partials
from latkv.checks import check_float_array, check_int
from latkv.container import Codes
from latkv.quantizer import Quantizer
from latkv.scalar import ScalarQuant
from latkv.turbo import TurboQuant

FLOAT16_MAX = 65504.0


class BlockCodes:
    """The codes of one quantizer's compressed blocks, kept as contiguous arrays.

    Each array of the code layout of a ``(batch, heads, block, dim)`` block is either
    *per token* (its axis 2 grows with the tokens: packed codes, norms, per-group scales),
    concatenated along axis 2, or *per block* (a fixed shape: per-block channel statistics,
    outlier indices), stacked along a new axis 2. Layouts with variable-length arrays (rANS
    streams) are kept as a list of `Codes`.

    Parameters
    ----------
    quantizer : Quantizer
        The quantizer that writes every block.
    block : int
        Tokens per block: each `extend` item is the `Codes` of a ``(batch, heads, block,
        dim)`` array.

    Attributes
    ----------
    arrays : dict of str to array
        The contiguous buffers: ``(batch, heads, count * ..., ...)`` per token,
        ``(batch, heads, count, ...)`` per block (empty for listed layouts).
    per_token : dict of str to bool, or None
        Which arrays are per token; None before the first block and for listed layouts.

    Examples
    --------
    >>> import numpy as np, latkv
    >>> from latkv.cache import BlockCodes
    >>> qz = latkv.TurboQuant(dim=8, bits=2)
    >>> x = np.random.default_rng(0).standard_normal((1, 2, 12, 8)).astype(np.float32)
    >>> blocks = BlockCodes(qz, block=4)
    >>> blocks.extend([qz.encode(x[:, :, i:i + 4]) for i in range(0, 12, 4)])
    >>> len(blocks), blocks.per_token, blocks.arrays["packed"].shape
    (3, {'packed': True, 'norm': True}, (1, 2, 12, 2))
    >>> bool((blocks.whole()["packed"] == qz.encode(x)["packed"]).all())
    True
    >>> blocks[1].shape, bool((qz.decode(blocks[1]) == qz.decode(qz.encode(x[:, :, 4:8]))).all())
    ((1, 2, 4, 8), True)

    With per-sequence channel means (``center=True``) each block's mean is per block, and the
    blocks side by side are no longer the codes of one array:

    >>> centred = latkv.TurboQuant(dim=8, bits=2, center=True)
    >>> blocks = BlockCodes(centred, block=4)
    >>> blocks.extend([centred.encode(x[:, :, i:i + 4]) for i in range(0, 12, 4)])
    >>> blocks.per_token["channel_mean"], blocks.arrays["channel_mean"].shape, blocks.whole()
    (False, (1, 2, 3, 8), None)
    """

    def __init__(self, quantizer: Quantizer, block: int) -> None:
        self.quantizer = quantizer
        self.block = block
        self.count = 0
        self.arrays: dict[str, Any] = {}
        self.per_token: dict[str, bool] | None = None
        self._listed: list[Codes] = []
        self._shape: tuple[int, ...] = ()
        self._dtype = ""

    def _array_kinds(self, shape: tuple[int, ...]) -> dict[str, bool] | None:
        batch, heads, tokens, dim = shape
        one = self.quantizer.code_layout(shape)
        two = self.quantizer.code_layout((batch, heads, 2 * tokens, dim))
        kinds = {}
        for name, (first, _) in one.items():
            second = two.get(name, ((),))[0]
            if None in first or first[:2] != (batch, heads):
                return None
            if (len(first) >= 3 and len(second) == len(first) and second[2] == 2 * first[2]
                    and first[3:] == second[3:]):
                kinds[name] = True
            elif first == second:
                kinds[name] = False
            else:
                return None
        return kinds if set(two) == set(one) else None

    def extend(self, blocks: list[Codes]) -> None:
        """Add the codes of consecutive blocks (one copy of each buffer for all of them)."""
        if not blocks:
            return
        if self.count == 0:
            self._shape, self._dtype = tuple(blocks[0].shape), blocks[0].dtype
            self.per_token = self._array_kinds(self._shape)
        if self.per_token is None:
            self._listed.extend(blocks)
        else:
            xp = blocks[0].xp
            for name, kind in self.per_token.items():
                pieces = [codes[name] if kind else codes[name][:, :, None] for codes in blocks]
                if self.count:
                    pieces.insert(0, self.arrays[name])
                self.arrays[name] = pieces[0] if len(pieces) == 1 else xp.concatenate(
                    pieces, axis=2)
        self.count += len(blocks)

    def __len__(self) -> int:
        return self.count

    @property
    def nbytes(self) -> int:
        return (sum(c.nbytes for c in self._listed)
                + sum(int(a.nbytes) for a in self.arrays.values()))

    def __getitem__(self, index: int) -> Codes:
        """Block ``index`` as `Codes` (views of the buffers)."""
        if not -self.count <= index < self.count:
            raise IndexError(f"block {index} of {self.count}")
        index %= self.count
        if self.per_token is None:
            return self._listed[index]
        arrays = {}
        for name, array in self.arrays.items():
            if self.per_token[name]:
                width = array.shape[2] // self.count
                arrays[name] = array[:, :, index * width:(index + 1) * width]
            else:
                arrays[name] = array[:, :, index]
        return Codes(self.quantizer.name, self.quantizer.params, self._shape, self._dtype,
                     arrays)

    def whole(self) -> Codes | None:
        """All blocks as one `Codes` of ``(batch, heads, count * block, dim)`` when every
        array is per token (the codes of the blocks side by side are then the codes of their
        concatenation), else None."""
        if self.per_token is None or not all(self.per_token.values()):
            return None
        batch, heads, _, dim = self._shape
        return Codes(self.quantizer.name, self.quantizer.params,
                     (batch, heads, self.count * self.block, dim), self._dtype, self.arrays)

    def __iter__(self):
        return (self[i] for i in range(self.count))


def fused_codebook_stage(quantizer: Quantizer) -> Any:
    """The TurboQuant stage a fused step can read (mse codes, no outliers, statistics per
    block at most), or None.

    Parameters
    ----------
    quantizer : Quantizer

    Returns
    -------
    TurboStage or None
        The quantizer's only stage (its rotation, codebook and ``mse_bits``) when
        ``quantizer`` is a `latkv.TurboQuant` with ``mode="mse"``, no outlier channels and
        no ``local_stats``; None for any other quantizer.

    Examples
    --------
    >>> import latkv
    >>> from latkv.cache import fused_codebook_stage
    >>> from latkv.codebooks import sphere_codebook
    >>> stage = fused_codebook_stage(latkv.TurboQuant(dim=64, bits=3))
    >>> stage.mse_bits, bool((stage.codebook.centroids == sphere_codebook(64, 3).centroids).all())
    (3, True)
    >>> fused_codebook_stage(latkv.TurboQuant(dim=64, bits=3, mode="prod")) is None
    True
    >>> fused_codebook_stage(latkv.TurboQuant(dim=64, bits=3, outlier_channels=8)) is None
    True
    >>> fused_codebook_stage(latkv.ScalarQuant(dim=64, bits=3)) is None
    True
    """
    if (isinstance(quantizer, TurboQuant) and quantizer.mode == "mse"
            and not quantizer.outlier_channels and not quantizer.local_stats):
        return quantizer.stages()[0]
    return None


def fused_keys(quantizer: Quantizer, block: int) -> bool:
    """Whether a fused step can read these keys: `fused_codebook_stage`, or KIVI's per-channel
    `ScalarQuant` with one group of tokens per cache block (``x = code * scale_b + zero_b``:
    the codebook ``0 .. 2**bits - 1`` with the query scaled per block and ``<q, zero_b>``
    added)."""
    return fused_codebook_stage(quantizer) is not None or (
        isinstance(quantizer, ScalarQuant) and quantizer.axis == "channel"
        and quantizer.group == block)


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

    Attributes
    ----------
    key_blocks, value_blocks : BlockCodes
        The compressed blocks (``cache.key_blocks[i]`` is block ``i``'s `Codes`).

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
    >>> cache.fused
    True
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
        self.key_blocks = BlockCodes(key_quantizer, self.block)
        self.value_blocks = BlockCodes(value_quantizer, self.block)
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
    def window(self) -> tuple[Any, Any] | None:
        """The exact newest tokens: float16 ``(keys, values)``, each ``(batch, kv_heads, w,
        dim)`` (read-only views; None before the first append). With
        ``key_blocks.whole()`` and ``value_blocks.whole()`` they are what an exported
        attention graph with ``window=True`` takes (`latkv.onnx.export`)."""
        if self._keys is None:
            return None
        keys, values = self._keys.view(), self._values.view()
        if isinstance(keys, np.ndarray):       # CuPy arrays have no read-only flag
            keys.flags.writeable = values.flags.writeable = False
        return keys, values

    @property
    def nbytes(self) -> int:
        """Exact bytes: every block's codes plus the float16 window of keys and values."""
        window = 0 if self._keys is None else int(self._keys.nbytes + self._values.nbytes)
        return window + self.key_blocks.nbytes + self.value_blocks.nbytes

    @property
    def fused(self) -> bool:
        """Whether decode steps run the fused kernel: TurboQuant-mse values with TurboQuant-mse
        keys or KIVI per-channel keys grouped by the cache's blocks (`fused_keys`)."""
        return (fused_keys(self.key_quantizer, self.block)
                and fused_codebook_stage(self.value_quantizer) is not None)

    # -- appending ---------------------------------------------------------------------------

    def append(self, k: Any, v: Any) -> None:
        """Append ``k, v : (batch, kv_heads, t, dim)`` (float16/32/64, NumPy or CuPy).

        A refused append (wrong shape, dtype, module, NaN) leaves the cache as it was.
        """
        k = check_float_array(k, "k", dim=self.dim, min_ndim=4)
        v = check_float_array(v, "v", dim=self.dim, min_ndim=4)
        if k.ndim != 4 or k.shape != v.shape:
            raise ValueError(f"k and v must both be (batch, kv_heads, t, dim), got "
                             f"{tuple(k.shape)} and {tuple(v.shape)}")
        xp = array_module(k)
        if array_module(v) is not xp:
            raise ValueError("k and v must be in the same array module (NumPy or CuPy)")
        if self._keys is not None and (k.shape[:2] != self._keys.shape[:2]
                                       or array_module(self._keys) is not xp):
            raise ValueError(f"k has batch and heads {tuple(k.shape[:2])} in "
                             f"{xp.__name__}; the cache holds "
                             f"{tuple(self._keys.shape[:2])} in "
                             f"{array_module(self._keys).__name__}")
        for name, array in (("k", k), ("v", v)):
            if array.dtype != xp.float16 and bool((xp.abs(array) > FLOAT16_MAX).any()):
                raise ValueError(f"{name} holds values beyond the float16 range (|x| > 65504)")
        k16, v16 = k.astype(xp.float16), v.astype(xp.float16)
        keys = k16 if self._keys is None else xp.concatenate([self._keys, k16], axis=2)
        values = v16 if self._values is None else xp.concatenate([self._values, v16], axis=2)
        length = self._length + int(k.shape[2])
        # encode every block now due, each on its own, before anything changes: a refused
        # block (a quantizer's own check) leaves the cache as it was
        due = max((length - self.residual) // self.block - len(self.key_blocks), 0)
        key_codes, value_codes = [], []
        for index in range(due):
            window = slice(index * self.block, (index + 1) * self.block)
            key_codes.append(self.key_quantizer.encode(keys[:, :, window]))
            value_codes.append(self.value_quantizer.encode(values[:, :, window]))
        self.key_blocks.extend(key_codes)
        self.value_blocks.extend(value_codes)
        moved = due * self.block
        if moved:   # a copy: a view would keep every compressed token's float16 alive
            keys = xp.ascontiguousarray(keys[:, :, moved:])
            values = xp.ascontiguousarray(values[:, :, moved:])
        self._keys, self._values = keys, values
        self._length = length

    # -- attention ---------------------------------------------------------------------------

    def attention(self, q: Any, *, scale: float | None = None, backend: str | None = None,
                  fused: bool | None = None) -> Any:
        """``softmax(q K^T scale + mask) V`` for ``q : (batch, q_heads, tq, dim)``.

        The queries are the last ``tq`` positions of the cache; with ``tq > 1`` each attends
        causally (to its own position and earlier). ``scale`` defaults to ``1 / sqrt(dim)``.

        Parameters
        ----------
        q : (batch, q_heads, tq, dim) float16/32/64
            ``q_heads`` a multiple of the cache's ``kv_heads`` (grouped-query attention).
        scale : float, optional
        backend : str, optional
            Runs the quantizers' kernels (and the fused step); by default the array module's.
        fused : bool, optional
            Force (True) or avoid (False) the fused step; by default it runs where it can
            (`fused`, and every compressed token visible to every query: always for
            ``tq <= residual + 1``).

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
        backend = resolve_backend(backend, q)
        scale = 1.0 / math.sqrt(self.dim) if scale is None else float(scale)
        group = q.shape[1] // kv_heads
        # (batch, kv_heads, group * tq, dim): the queries of one KV head side by side
        grouped = q.astype(xp.float32).reshape(batch, kv_heads, group * tq, self.dim)
        can_fuse = self.fused and self.compressed_tokens <= self._length - tq + 1
        if fused and not can_fuse:
            raise ValueError("this step cannot run fused: it needs TurboQuant-mse values, "
                             "TurboQuant-mse or per-channel ScalarQuant keys (group = block), "
                             "and every compressed token visible to every query")
        if fused is None:
            fused = can_fuse
        if fused and self.compressed_tokens:
            output = self._fused_attention(grouped, tq, scale, backend)
        else:
            output = self._attention(grouped, group, tq, scale, backend)
        return output.reshape(batch, q.shape[1], tq, self.dim)

    def _causal(self, logits: Any, start: int, group: int, tq: int) -> Any:
        """``logits (..., group * tq, n)`` of positions ``start ..`` with -inf where a query of
        the last ``tq`` positions may not look yet (nothing to hide for ``tq = 1``)."""
        if tq == 1:
            return logits
        xp = array_module(logits)
        positions = xp.arange(start, self._length)
        query_positions = xp.arange(self._length - tq, self._length)
        allowed = xp.tile(positions[None, :] <= query_positions[:, None], (group, 1))
        return xp.where(allowed, logits, -xp.inf)

    def _window_logits(self, grouped: Any, scale: float) -> Any:
        """float32 logits of the exact window ``(batch, kv_heads, group * tq, w)``, unmasked."""
        xp = array_module(grouped)
        return grouped @ xp.swapaxes(self._keys.astype(xp.float32), -1, -2) * xp.float32(scale)

    def _attention(self, grouped: Any, group: int, tq: int, scale: float, backend: str) -> Any:
        """The reference step: logits from ``scores``, softmax, sums from ``weighted_sum``."""
        xp = array_module(grouped)
        key_whole, value_whole = self.key_blocks.whole(), self.value_blocks.whole()
        key_codes = [key_whole] if key_whole is not None else list(self.key_blocks)
        pieces = [self.key_quantizer.scores(grouped, codes, backend=backend) * xp.float32(scale)
                  for codes in key_codes]
        pieces.append(self._window_logits(grouped, scale))
        logits = self._causal(xp.concatenate(pieces, axis=-1), 0, group, tq)
        compressed = self.compressed_tokens
        logits = logits - logits.max(axis=-1, keepdims=True)
        weights = xp.exp(logits)
        weights /= weights.sum(axis=-1, keepdims=True)
        output = weights[..., compressed:] @ self._values.astype(xp.float32)
        if value_whole is not None:
            output += self.value_quantizer.weighted_sum(weights[..., :compressed], value_whole,
                                                        backend=backend)
        else:
            for index, codes in enumerate(self.value_blocks):
                window = weights[..., index * self.block:(index + 1) * self.block]
                output += self.value_quantizer.weighted_sum(window, codes, backend=backend)
        return output

    def _fused_attention(self, grouped: Any, tq: int, scale: float, backend: str) -> Any:
        """Split-softmax partials of the blocks (one kernel) and of the window, combined."""
        xp = array_module(grouped)
        batch, heads, m, dim = grouped.shape
        key_stage = fused_codebook_stage(self.key_quantizer)
        value_stage = fused_codebook_stage(self.value_quantizer)
        keys, values = self.key_blocks.arrays, self.value_blocks.arrays
        blocks, tokens = len(self.key_blocks), self.compressed_tokens
        f32 = xp.float32

        def device(array: Any) -> Any:
            return array if xp is np else xp.asarray(array)

        def flat(array: Any) -> Any:
            return array.reshape(batch * heads, tokens, *array.shape[3:])

        # keys as x = factor * R^T centroids[codes] * channel_scale_b + channel_mean_b
        if key_stage is not None:           # TurboQuant (statistics per block, if any)
            channel_scale, channel_mean = keys.get("channel_scale"), keys.get("channel_mean")
            factor = flat(keys["norm"]).astype(f32)
            centroids, key_bits = device(key_stage.codebook.centroids), key_stage.mse_bits
        else:                               # KIVI: code * scale_b + zero_b, one group a block
            channel_scale, channel_mean = keys["scale"], keys["zero"]
            factor = xp.ones((batch * heads, tokens), dtype=f32)
            key_bits = self.key_quantizer.bits
            centroids = xp.arange(1 << key_bits, dtype=f32)
        # the queries in the keys' domain: q * channel_scale_b per block, rotated if TurboQuant
        if channel_scale is not None:
            q_key = grouped[:, :, None] * channel_scale.astype(f32)[:, :, :, None, :]
        else:
            q_key = grouped[:, :, None]
        q_key = xp.ascontiguousarray(q_key)
        if key_stage is not None:
            q_key = key_stage.rotation.apply(q_key, backend=backend)
        q_key = q_key.reshape(batch * heads, -1, m, dim)
        if channel_mean is not None:        # <q, mean_b>: (batch, heads, m, blocks) -> per block
            offset = grouped @ xp.swapaxes(channel_mean.astype(f32), -1, -2)
            offset = xp.ascontiguousarray(xp.swapaxes(offset, -1, -2).reshape(
                batch * heads, blocks, m))
        else:
            offset = xp.zeros((batch * heads, 1, m), dtype=f32)

        acc, maximum, total = implementation("codebook_attention", backend)(
            q_key, flat(keys["packed"]), factor, centroids, key_bits, offset,
            flat(values["packed"]), flat(values["norm"]).astype(f32),
            device(value_stage.codebook.centroids), value_stage.mse_bits, dim, self.block,
            scale)
        acc = acc.reshape(batch, heads, blocks, m, dim)
        maxima = [maximum.reshape(batch, heads, blocks, m)]
        totals = [total.reshape(batch, heads, blocks, m)]
        if self._length > tokens:         # the exact window as one more partial
            logits = self._causal(self._window_logits(grouped, scale), tokens, m // tq, tq)
            window_max = logits.max(axis=-1)
            exps = xp.exp(logits - window_max[..., None])
            maxima.append(window_max[:, :, None])
            totals.append(exps.sum(axis=-1)[:, :, None])
        weight = combine_partials(xp.concatenate(maxima, axis=2),
                                  xp.concatenate(totals, axis=2), axis=2)
        block_weight = weight[:, :, :blocks, :, None]                 # (batch, heads, b, m, 1)
        if "channel_scale" in values:     # rotate back per block, then scale per block
            rotated = value_stage.rotation.inverse(acc * block_weight, backend=backend)
            output = (rotated * values["channel_scale"].astype(f32)[:, :, :, None, :]).sum(
                axis=2)
        else:                             # one inverse rotation per query
            output = value_stage.rotation.inverse((acc * block_weight).sum(axis=2),
                                                  backend=backend)
        if "channel_mean" in values:
            mass = weight[:, :, :blocks] * totals[0]                     # (batch, heads, b, m)
            output = output + xp.swapaxes(mass, -1, -2) @ values["channel_mean"].astype(f32)
        if self._length > tokens:
            output = output + weight[:, :, blocks, :, None] * (
                exps @ self._values.astype(f32))
        return output.astype(f32)
