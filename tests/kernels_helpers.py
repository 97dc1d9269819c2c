"""Seeded random packed operands and comparison helpers for the kernel tests.

Every draw comes from `rng(seed)`; tests derive the seed from their name and parameters
(`seed_for`) and put it in their assert messages, so a failure names the inputs that caused it.
"""

from __future__ import annotations

import contextlib
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import packing
from pallas_kernels.lowrank_delta_matmul import LowRankBand

CPU = jax.devices("cpu")[0]


def seed_for(*key) -> int:
    """A stable seed for one test case: CRC-32 of the repr of its name and parameters."""
    return zlib.crc32(repr(key).encode())


def rng(seed: int) -> np.random.Generator:
    """The generator of one test case (`np.random.default_rng(seed)`)."""
    return np.random.default_rng(seed)


@contextlib.contextmanager
def on_cpu():
    """Keep interpret-mode kernels on the CPU even on a machine with an accelerator."""
    with jax.default_device(CPU):
        yield


def packed_operand(gen, k, n, *, bits, group, zero=False, tenants=None, scale_dtype=jnp.bfloat16):
    """Random codes packed by `packing.pack_codes` -> (k_pad, planes, scale, zero, codes)."""
    k_pad = packing.padded_k(k, group)
    lead = () if tenants is None else (tenants,)
    codes = gen.integers(0, 2**bits, lead + (k_pad, n))
    codes[..., k:, :] = 0
    if tenants is None:
        planes = packing.pack_codes(jnp.asarray(codes, jnp.uint32), bits)
    else:
        per = [packing.pack_codes(jnp.asarray(codes[t], jnp.uint32), bits) for t in range(tenants)]
        planes = tuple(jnp.stack(p) for p in zip(*per))
    scale = jnp.asarray(gen.uniform(0.5, 1.5, lead + (k_pad // group, n)) / 2**bits, scale_dtype)
    zeros = None
    if zero:
        zeros = jnp.asarray(gen.integers(0, 2**bits, scale.shape), jnp.float32)
    return k_pad, planes, scale, zeros, codes


def activations(gen, m, k, dtype):
    """(m, k) standard-normal activations in dtype."""
    return jnp.asarray(gen.standard_normal((m, k)), dtype)


def tenant_ids(gen, m, tenants):
    """Random tenant ids in [-1, T) with at least one -1 and one repeated tenant when m allows."""
    t = gen.integers(-1, tenants, m)
    if m >= 3:
        t[0] = -1
        t[1] = t[2] = gen.integers(0, tenants)
    return jnp.asarray(t, jnp.int32)


def lowrank_bands(gen, k, n, specs, *, tenants=None, zero=False, ranks=None):
    """Random bands; specs = [(v_bits, v_group, u_bits, u_group, rank), ...]."""
    bands = []
    for v_bits, v_group, u_bits, u_group, rank in specs:
        r_pad = packing.padded_k(rank, u_group)
        _, vp, vs, vz, _ = packed_operand(
            gen, k, r_pad, bits=v_bits, group=v_group, zero=zero, tenants=tenants
        )
        _, up, us, uz, _ = packed_operand(
            gen, rank, n, bits=u_bits, group=u_group, zero=zero, tenants=tenants
        )
        lead = () if tenants is None else (tenants,)
        s = gen.uniform(0.5, 2.0, lead + (r_pad,)).astype(np.float32)
        s[..., rank:] = 0.0
        # Padding columns of V carry zero scale: zero them like a real compressor would.
        col = (np.arange(r_pad) < rank).astype(np.float32)
        vs = (vs.astype(jnp.float32) * col).astype(vs.dtype)
        bands.append(
            LowRankBand(
                v_planes=vp,
                v_scale=vs,
                v_zero=vz,
                u_planes=up,
                u_scale=us,
                u_zero=uz,
                s=jnp.asarray(s),
                v_bits=v_bits,
                v_group=v_group,
                u_bits=u_bits,
                u_group=u_group,
                rank=rank,
            )
        )
    return tuple(bands)


def assert_close(got, want, *, dtype, what=""):
    """Max-abs error relative to the largest reference magnitude; all outputs finite."""
    got = np.asarray(jnp.asarray(got, jnp.float32))
    want = np.asarray(jnp.asarray(want, jnp.float32))
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert np.isfinite(got).all(), f"{what}: non-finite output (unwritten or poisoned elements)"
    tol = 2e-2 if jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else 2e-5
    scale = max(1e-6, float(np.abs(want).max()))
    err = float(np.abs(got - want).max()) / scale
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"


# Names every dispatcher is probed with: each implementation any op has, and names none has.
PROBE_NAMES = ("auto", "xla", "pallas_gpu", "mosaic_gpu", "pallas_tpu", "triton", "XLA", "")


def assert_accepts_exactly(call, table, *, where, dtype, seed):
    """A dispatcher accepts "auto" and the keys of its `IMPLEMENTATIONS` table, nothing else.

    Args:
      call: `call(name)` runs the dispatcher with `implementation=name` (interpret mode) on fixed
        inputs and returns its output.
      table: the op's `IMPLEMENTATIONS` dict.
      where: the dispatcher's name, expected at the start of its error messages.
      dtype: activation dtype (for the tolerance of `assert_close`).
      seed: the seed of the inputs, for the messages.

    Every name outside the table must raise a ValueError that names the call, the name given and
    every allowed value. Every name in it must either run and match the "xla" output, or be refused
    for another reason (e.g. a missing GPU), never as an unknown name.
    """
    allowed = ("auto", *table)
    want = call("xla")
    for name in dict.fromkeys(PROBE_NAMES + allowed):
        try:
            got = call(name)
        except ValueError as e:
            msg = str(e)
            unknown = "implementation must be one of" in msg
            assert unknown != (name in allowed), f"seed={seed} {where}({name!r}): {msg}"
            if unknown:
                assert msg.startswith(where) and repr(name) in msg, f"seed={seed} {msg}"
                missing = [a for a in allowed if repr(a) not in msg]
                assert not missing, f"seed={seed} {where}: {msg!r} does not name {missing}"
            continue
        assert name in allowed, f"seed={seed} {where}: implementation={name!r} was accepted"
        assert_close(got, want, dtype=dtype, what=f"seed={seed} {where}({name!r})")
