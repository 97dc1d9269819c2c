"""`LowRankBand`: one Delta-CoMe band (factors of one bit width), as a jit-friendly pytree.

A band holds `V_b` as a packed weight of logical shape `(r_b, K)` (stored `(K_pad*pb/32, r_pad)`,
contraction over K), `U_b` as a packed weight of logical shape `(N, r_b)` (stored
`(r_pad*pb/32, N)`, contraction over r), and the singular values `S_b (r_pad,)`. `r_pad` is r_b
padded to a multiple of lcm(32, G) with zero codes and zero scales. The band's delta is
`x ↦ ((x @ deq(V)) * S) @ deq(U)`. Bit widths, group sizes and the true rank are static metadata,
so a tuple of bands can be passed straight into `jax.jit`. Multi-tenant bands carry a leading T
axis on every array.
"""

from __future__ import annotations

import dataclasses

import jax

from pallas_kernels.packing import check_packed


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class LowRankBand:
    """One rank band of a low-rank packed delta (see module docstring).

    Attributes:
      v_planes, v_scale, v_zero: packed `V_b` (contraction K), zero None for symmetric codes.
      u_planes, u_scale, u_zero: packed `U_b` (contraction r_pad).
      s: singular values `(r_pad,)` (or `(T, r_pad)`), zero in the padding.
      v_bits, v_group, u_bits, u_group: static code widths and group sizes.
      rank: static true rank r_b (<= r_pad); columns beyond it are padding the kernels may skip.
        None means r_pad.
    """

    v_planes: tuple[jax.Array, ...]
    v_scale: jax.Array
    u_planes: tuple[jax.Array, ...]
    u_scale: jax.Array
    s: jax.Array
    v_zero: jax.Array | None = None
    u_zero: jax.Array | None = None
    v_bits: int = dataclasses.field(metadata=dict(static=True))
    v_group: int = dataclasses.field(metadata=dict(static=True))
    u_bits: int = dataclasses.field(metadata=dict(static=True))
    u_group: int = dataclasses.field(metadata=dict(static=True))
    rank: int | None = dataclasses.field(default=None, metadata=dict(static=True))


def band_dims(band: LowRankBand, *, where: str, stacked: bool = False) -> tuple[int, int, int]:
    """Validates a band and returns `(k_pad, r_pad, n)`."""
    k_pad, r_pad = check_packed(
        tuple(band.v_planes),
        band.v_scale,
        band.v_zero,
        bits=band.v_bits,
        group=band.v_group,
        where=f"{where}: V",
        stacked=stacked,
    )
    r_pad_u, n = check_packed(
        tuple(band.u_planes),
        band.u_scale,
        band.u_zero,
        bits=band.u_bits,
        group=band.u_group,
        where=f"{where}: U",
        stacked=stacked,
    )
    if r_pad_u != r_pad:
        raise ValueError(f"{where}: V has r_pad={r_pad} columns but U contracts over {r_pad_u}")
    want = band.v_planes[0].shape[:1] + (r_pad,) if stacked else (r_pad,)
    if tuple(band.s.shape) != want:
        raise ValueError(f"{where}: s has shape {band.s.shape}, expected {want}")
    if band.rank is not None and not 0 < band.rank <= r_pad:
        raise ValueError(f"{where}: rank={band.rank} is not in [1, r_pad={r_pad}]")
    return k_pad, r_pad, n
