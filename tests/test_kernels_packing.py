"""The packed format (`pallas_kernels/packing.py`) against numpy code written independently here."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from kernels_helpers import rng, seed_for

from pallas_kernels import _mosaic_tpu, packing


def np_pack(q: np.ndarray, bits: int) -> np.ndarray:
    """(K, N) codes -> (K*bits/32, N) uint32, word w holds k = w*vpw + t at bits [t*b, (t+1)*b)."""
    vpw = 32 // bits
    k, n = q.shape
    out = np.zeros((k // vpw, n), np.uint64)
    for t in range(vpw):
        out |= q[t::vpw].astype(np.uint64) << np.uint64(t * bits)
    return out.astype(np.uint32)


def np_dequant(q, scale, zero, bits, group):
    """Dense (K, N) float64 weight, written from the format's formulas."""
    s = np.repeat(np.asarray(scale, np.float64), group, axis=0)
    if zero is None:
        return s * (2.0 * q - (2**bits - 1))
    return s * (q - np.repeat(np.asarray(zero, np.float64), group, axis=0))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_pack_unpack_round_trip(bits):
    seed = seed_for("test_pack_unpack_round_trip", bits)
    gen = rng(seed)
    q = gen.integers(0, 2**bits, (128, 24))
    planes = packing.pack_codes(jnp.asarray(q, jnp.uint32), bits)
    assert [p.shape for p in planes] == [(128 * pb // 32, 24) for pb in packing.plane_bits(bits)]
    assert all(p.dtype == jnp.uint32 for p in planes)
    np.testing.assert_array_equal(
        np.asarray(packing.unpack_codes(planes, bits)), q, err_msg=f"seed={seed}"
    )


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_single_plane_matches_numpy_packer(bits):
    seed = seed_for("test_single_plane_matches_numpy_packer", bits)
    gen = rng(seed)
    q = gen.integers(0, 2**bits, (256, 8))
    (plane,) = packing.pack_codes(jnp.asarray(q, jnp.uint32), bits)
    np.testing.assert_array_equal(np.asarray(plane), np_pack(q, bits), err_msg=f"seed={seed}")


def test_three_bit_planes_are_two_plus_one():
    seed = seed_for("test_three_bit_planes_are_two_plus_one")
    gen = rng(seed)
    q = gen.integers(0, 8, (64, 16))
    assert packing.plane_bits(3) == (2, 1)
    lo, hi = packing.pack_codes(jnp.asarray(q, jnp.uint32), 3)
    np.testing.assert_array_equal(np.asarray(lo), np_pack(q & 3, 2), err_msg=f"seed={seed}")
    np.testing.assert_array_equal(np.asarray(hi), np_pack(q >> 2, 1), err_msg=f"seed={seed}")


def test_plane_bits_and_padding():
    assert packing.plane_bits(5) == (4, 1)
    assert packing.plane_bits(6) == (4, 2)
    assert packing.plane_bits(7) == (4, 2, 1)
    assert packing.padded_k(576, 128) == 640
    assert packing.padded_k(96, 96) == 96
    assert packing.padded_k(1, 16) == 32
    with pytest.raises(ValueError):
        packing.plane_bits(9)


@pytest.mark.parametrize("bits,zero", [(1, False), (2, True), (3, False), (4, True), (8, False)])
def test_dequantize_matches_numpy(bits, zero):
    seed = seed_for("test_dequantize_matches_numpy", bits, zero)
    gen = rng(seed)
    k, n, g = 256, 12, 64
    q = gen.integers(0, 2**bits, (k, n))
    scale = gen.uniform(0.1, 1.0, (k // g, n)).astype(np.float32)
    z = gen.integers(0, 2**bits, (k // g, n)).astype(np.float32) if zero else None
    planes = packing.pack_codes(jnp.asarray(q, jnp.uint32), bits)
    got = packing.dequantize(
        planes, jnp.asarray(scale), None if z is None else jnp.asarray(z), bits=bits, group=g
    )
    np.testing.assert_allclose(
        np.asarray(got), np_dequant(q, scale, z, bits, g), rtol=1e-6, err_msg=f"seed={seed}"
    )


def test_one_bit_symmetric_is_plus_minus_scale():
    q = np.array([[0], [1]] * 16)
    (plane,) = packing.pack_codes(jnp.asarray(q, jnp.uint32), 1)
    w = packing.dequantize((plane,), jnp.full((1, 1), 0.5), None, bits=1, group=32)
    np.testing.assert_array_equal(np.asarray(w)[:, 0], np.where(q[:, 0] == 1, 0.5, -0.5))


@pytest.mark.parametrize("bits", [1, 3, 4])
def test_tpu_planar_repack(bits):
    """Planar layout: in each block of 128*vpw rows, word row r, field t holds k = t*128 + r."""
    seed = seed_for("test_tpu_planar_repack", bits)
    gen = rng(seed)
    k, n, g = 256, 16, 128
    q = gen.integers(0, 2**bits, (k, n))
    scale = gen.uniform(0.1, 1.0, (k // g, n)).astype(np.float32)
    planes = packing.pack_codes(jnp.asarray(q, jnp.uint32), bits)
    out, slab_scale, _ = _mosaic_tpu.repack_planar(
        planes, jnp.asarray(scale), None, bits=bits, group=g
    )
    k_t = _mosaic_tpu.padded_k_tpu(k, bits)
    qp = np.zeros((k_t, n), np.int64)
    qp[:k] = q
    shift = 0
    for words, pb in zip(out, packing.plane_bits(bits)):
        vpw, slab = 32 // pb, _mosaic_tpu.SLAB
        plane = (qp >> shift) & ((1 << pb) - 1)
        blocks = plane.reshape(k_t // (slab * vpw), vpw, slab, n)
        want = np.zeros((k_t // (slab * vpw), slab, n), np.uint64)
        for t in range(vpw):
            want |= blocks[:, t].astype(np.uint64) << np.uint64(t * pb)
        got = np.asarray(words).view(np.uint32).reshape(want.shape)
        np.testing.assert_array_equal(got, want.astype(np.uint32), err_msg=f"seed={seed}")
        shift += pb
    want_s = np.zeros((k_t // 128, n), np.float32)
    want_s[: k // 128] = np.repeat(scale, g // 128, axis=0)
    np.testing.assert_array_equal(np.asarray(slab_scale), want_s, err_msg=f"seed={seed}")
