"""The packed low-bit weight format shared by deltajax's methods and the Pallas kernels.

A quantized matrix is a linear weight `W` of logical shape `(N, K) = (out, in)`; `K` is the
contraction axis. Codes `q ∈ [0, 2^b)` are packed **along K** into uint32 words, stored
transposed as `(K_pad * b / 32, N)` so a kernel reads a K-slab of words for a tile of N columns:

* interleaved: word `w` of column `n` holds `k = w * vpw + t` in bits `[t*b, (t+1)*b)`,
  `vpw = 32 // b` (b ∈ {1, 2, 4, 8});
* 3 bits are two planes: a 2-bit plane (low bits) and a 1-bit plane (high bit), each packed as
  above (FLUTE's split); any b in 1..8 is decomposed the same way into power-of-two planes
  (5 = 4 + 1, 6 = 4 + 2, 7 = 4 + 2 + 1), low bits first.

`K` is zero-padded to `K_pad`, a multiple of both 32 and the group size, so every plane has whole
words and every group is complete. Scales (and zeros) are `(K_pad / G, N)`; dequantization:

* symmetric:  `W[n, k] = s[g, n] * (2 q - (2^b - 1))`          (b = 1 gives ±s)
* asymmetric: `W[n, k] = s[g, n] * (q - z[g, n])`               (z integer-valued, stored as float)

with `g = k // G`. This module imports only jax and numpy.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

WORD_BITS = 32


def plane_bits(bits: int) -> tuple[int, ...]:
    """Power-of-two planes a `bits`-wide code is split into, low bits first (3 -> (2, 1))."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    out, rem = [], bits
    for p in (8, 4, 2, 1):
        if rem >= p:
            out.append(p)
            rem -= p
    return tuple(out)


def padded_k(k: int, group: int) -> int:
    """Smallest multiple of lcm(32, group) that is >= k."""
    m = np.lcm(WORD_BITS, group)
    return int(-(-k // m) * m)


def pack_plane(q: jnp.ndarray, bits: int) -> jnp.ndarray:
    """(K, N) integer codes in [0, 2^bits) -> (K*bits/32, N) uint32 words, interleaved along K."""
    vpw = WORD_BITS // bits
    k, n = q.shape
    if k % vpw:
        raise ValueError(f"K={k} is not a multiple of {vpw} values per word")
    q = q.astype(jnp.uint32).reshape(k // vpw, vpw, n)
    shifts = (jnp.arange(vpw, dtype=jnp.uint32) * bits)[None, :, None]
    # Fields do not overlap, so a sum is an OR.
    return jnp.sum(q << shifts, axis=1, dtype=jnp.uint32)


def unpack_plane(words: jnp.ndarray, bits: int) -> jnp.ndarray:
    """Inverse of `pack_plane`: (K*bits/32, N) uint32 -> (K, N) uint32 codes."""
    vpw = WORD_BITS // bits
    w, n = words.shape
    shifts = (jnp.arange(vpw, dtype=jnp.uint32) * bits)[None, :, None]
    q = (words[:, None, :] >> shifts) & jnp.uint32((1 << bits) - 1)
    return q.reshape(w * vpw, n)


def pack_codes(q: jnp.ndarray, bits: int) -> tuple[jnp.ndarray, ...]:
    """(K, N) codes in [0, 2^bits) -> tuple of planes (see `plane_bits`), low bits first."""
    planes, shift = [], 0
    q = q.astype(jnp.uint32)
    for pb in plane_bits(bits):
        planes.append(pack_plane((q >> shift) & jnp.uint32((1 << pb) - 1), pb))
        shift += pb
    return tuple(planes)


def unpack_codes(planes: tuple[jnp.ndarray, ...], bits: int) -> jnp.ndarray:
    """Inverse of `pack_codes`: planes -> (K, N) uint32 codes."""
    out, shift = None, 0
    for words, pb in zip(planes, plane_bits(bits), strict=True):
        part = unpack_plane(words, pb) << shift
        out = part if out is None else out | part
        shift += pb
    return out


def dequantize(
    planes: tuple[jnp.ndarray, ...],
    scale: jnp.ndarray,
    zero: jnp.ndarray | None,
    *,
    bits: int,
    group: int,
    dtype=jnp.float32,
) -> jnp.ndarray:
    """Packed planes + (K_pad/G, N) scales (+ zeros) -> dense (K_pad, N) `W^T` in `dtype`."""
    q = unpack_codes(planes, bits).astype(jnp.float32)
    s = jnp.repeat(scale.astype(jnp.float32), group, axis=0)
    if zero is None:
        w = s * (2.0 * q - (2**bits - 1))
    else:
        w = s * (q - jnp.repeat(zero.astype(jnp.float32), group, axis=0))
    return w.astype(dtype)


def packed_nbytes(k_pad: int, n: int, bits: int) -> int:
    """Bytes of the code planes of a (N, K_pad) matrix."""
    return sum(k_pad * pb // WORD_BITS * n * 4 for pb in plane_bits(bits))


def check_packed(
    planes,
    scale,
    zero,
    *,
    bits: int,
    group: int,
    where: str,
    stacked: bool = False,
) -> tuple[int, int]:
    """Validates one packed operand and returns `(k_pad, n)`.

    Args:
      planes: tuple of uint32 words, `(K_pad*pb/32, N)` per plane (`(T, ...)` when `stacked`).
      scale: `(K_pad/G, N)` float scales (`(T, ...)` when `stacked`).
      zero: None or integer-valued floats shaped like `scale`.
      bits: code width, 1..8.
      group: group size G along K.
      where: name used in error messages (e.g. "quant_matmul: planes").
      stacked: operands carry a leading tenant axis.

    Raises:
      ValueError: naming the operand and the shapes at fault.
    """
    pbits = plane_bits(bits)
    if not isinstance(planes, (tuple, list)) or len(planes) != len(pbits):
        got = len(planes) if isinstance(planes, (tuple, list)) else type(planes).__name__
        raise ValueError(f"{where}: bits={bits} needs {len(pbits)} planes {pbits}, got {got}")
    lead = 1 if stacked else 0
    first = planes[0]
    if first.ndim != 2 + lead:
        raise ValueError(f"{where}: plane 0 must have {2 + lead} dims, got shape {first.shape}")
    n = first.shape[-1]
    k_pad = first.shape[-2] * WORD_BITS // pbits[0]
    if group < 1:
        raise ValueError(f"{where}: group must be >= 1, got {group}")
    if k_pad % math.lcm(WORD_BITS, group):
        raise ValueError(
            f"{where}: K_pad={k_pad} (from plane 0 shape {first.shape}) is not a multiple of "
            f"lcm(32, group={group})"
        )
    for i, (p, pb) in enumerate(zip(planes, pbits)):
        want = first.shape[:lead] + (k_pad * pb // WORD_BITS, n)
        if tuple(p.shape) != want:
            raise ValueError(f"{where}: plane {i} ({pb}-bit) has shape {p.shape}, expected {want}")
        if p.dtype not in (jnp.uint32, jnp.int32):
            raise ValueError(f"{where}: plane {i} must be uint32 words, got {p.dtype}")
    want_s = first.shape[:lead] + (k_pad // group, n)
    if tuple(scale.shape) != want_s:
        raise ValueError(f"{where}: scale has shape {scale.shape}, expected {want_s}")
    if zero is not None and tuple(zero.shape) != want_s:
        raise ValueError(f"{where}: zero has shape {zero.shape}, expected {want_s}")
    return k_pad, n
