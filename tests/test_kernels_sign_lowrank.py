"""sign_matmul and lowrank_delta_matmul kernels (interpret mode on CPU) against the references.

Seeded random inputs (one seed per case, named in the assert message); outputs are NaN-poisoned
by the interpreter (see test_kernels_quant.py) and `assert_close` rejects non-finite elements.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from kernels_helpers import (
    activations,
    assert_accepts_exactly,
    assert_close,
    lowrank_bands,
    on_cpu,
    packed_operand,
    rng,
    seed_for,
    tenant_ids,
)

from pallas_kernels import lowrank_delta_matmul as lowrank_op
from pallas_kernels import packing
from pallas_kernels import sign_matmul as sign_op
from pallas_kernels.lowrank_delta_matmul import (
    LowRankBand,
    lowrank_delta_matmul,
    lowrank_delta_matmul_multitenant,
)
from pallas_kernels.lowrank_delta_matmul import reference as lr_reference
from pallas_kernels.sign_matmul import pallas_gpu as sign_gpu
from pallas_kernels.sign_matmul import sign_matmul, sign_matmul_multitenant

BF16, F32 = jnp.bfloat16, jnp.float32
GPU, TPU = "pallas_gpu", "pallas_tpu"


# ----------------------------------------------------------------------------- sign_matmul


@pytest.mark.parametrize(
    "impl,m,k,n,dtype",
    [
        (GPU, 1, 4096, 64, BF16),
        (GPU, 136, 320, 96, F32),
        (TPU, 5, 256, 192, BF16),
        (TPU, 136, 512, 128, F32),
    ],
)
def test_sign_matmul(impl, m, k, n, dtype):
    seed = seed_for("test_sign_matmul", impl, m, k, n, dtype)
    gen = rng(seed)
    _, (words,), _, _, _ = packed_operand(gen, k, n, bits=1, group=32)
    x = activations(gen, m, k, dtype)
    scale = jnp.float32(gen.uniform(0.01, 0.1))
    with on_cpu():
        got = sign_matmul(x, words, scale, implementation=impl, interpret=True)
        want = sign_matmul(x, words, scale, implementation="xla")
    assert_close(got, want, dtype=dtype, what=f"seed={seed} {impl} sign m={m}")


def test_sign_reference_is_bitdelta():
    """scale * x @ sign matrix, with the sign matrix built by hand."""
    seed = seed_for("test_sign_reference_is_bitdelta")
    gen = rng(seed)
    q = gen.integers(0, 2, (64, 8))
    (words,) = packing.pack_codes(jnp.asarray(q, jnp.uint32), 1)
    x = gen.standard_normal((3, 64)).astype(np.float32)
    got = sign_matmul(jnp.asarray(x), words, jnp.float32(0.25), implementation="xla")
    np.testing.assert_allclose(
        np.asarray(got), 0.25 * x @ (2.0 * q - 1), rtol=1e-5, atol=1e-5, err_msg=f"seed={seed}"
    )


@pytest.mark.parametrize("impl,m,dtype", [(GPU, 11, BF16), (GPU, 136, F32), (TPU, 9, F32)])
def test_sign_multitenant(impl, m, dtype):
    seed = seed_for("test_sign_multitenant", impl, m, dtype)
    gen = rng(seed)
    num_t, k, n = 4, 256, 128
    _, (words,), _, _, _ = packed_operand(gen, k, n, bits=1, group=32, tenants=num_t)
    scales = jnp.asarray(gen.uniform(0.01, 0.1, num_t), F32)
    x = activations(gen, m, k, dtype)
    tids = tenant_ids(gen, m, num_t)
    y_base = activations(gen, m, n, dtype)
    with on_cpu():
        got = sign_matmul_multitenant(
            x, tids, words, scales, y_base=y_base, implementation=impl, interpret=True
        )
        want = sign_matmul_multitenant(x, tids, words, scales, y_base=y_base, implementation="xla")
    assert_close(got, want, dtype=dtype, what=f"seed={seed} {impl} sign multitenant m={m}")


def test_sign_guard():
    assert sign_gpu.can_use(k_pad=4096, n=576, dtype=BF16)
    assert not sign_gpu.can_use(k_pad=4096, n=40, dtype=BF16)
    seed = seed_for("test_sign_guard")
    gen = rng(seed)
    _, (words,), _, _, _ = packed_operand(gen, 64, 40, bits=1, group=32)
    with pytest.raises(ValueError, match="pallas_gpu cannot run"):
        sign_matmul(
            activations(gen, 2, 64, F32),
            words,
            jnp.float32(1.0),
            implementation=GPU,
            interpret=True,
        )


# ----------------------------------------------------------------------------- lowrank

# Delta-CoMe style: a few high-precision directions, more at 3 bits, most at 2 bits.
SPECS = [(8, 128, 8, 128, 2), (3, 128, 3, 128, 32), (2, 128, 2, 128, 72)]


@pytest.mark.parametrize(
    "impl,m,dtype,zero,with_base",
    [
        (GPU, 1, BF16, False, False),
        (GPU, 136, F32, True, True),
        (GPU, 16, BF16, True, True),
        (TPU, 5, F32, False, True),
        (TPU, 136, BF16, True, False),
    ],
)
def test_lowrank(impl, m, dtype, zero, with_base):
    seed = seed_for("test_lowrank", impl, m, dtype, zero, with_base)
    gen = rng(seed)
    k, n = 256, 192
    bands = lowrank_bands(gen, k, n, SPECS, zero=zero)
    x = activations(gen, m, k, dtype)
    base = jnp.asarray(gen.standard_normal((n, k)) * 0.05, dtype) if with_base else None
    with on_cpu():
        got = lowrank_delta_matmul(x, bands, base=base, implementation=impl, interpret=True)
        want = lowrank_delta_matmul(x, bands, base=base, implementation="xla")
    assert_close(got, want, dtype=dtype, what=f"seed={seed} {impl} lowrank m={m}")


def test_lowrank_reference_matches_dense_svd_form():
    """Σ_b (x V_b S_b) U_b equals x @ (Σ_b V_b diag(S_b) U_b), the dense delta."""
    seed = seed_for("test_lowrank_reference_matches_dense_svd_form")
    gen = rng(seed)
    bands = lowrank_bands(gen, 128, 64, [(4, 32, 4, 32, 8), (2, 32, 2, 32, 20)])
    x = activations(gen, 4, 128, F32)
    got = lowrank_delta_matmul(x, bands, implementation="xla")
    want = x @ lr_reference.dense_delta(bands)
    np.testing.assert_allclose(
        np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4, err_msg=f"seed={seed}"
    )


@pytest.mark.parametrize("impl,m,dtype", [(GPU, 9, BF16), (GPU, 136, F32), (TPU, 9, F32)])
def test_lowrank_multitenant(impl, m, dtype):
    seed = seed_for("test_lowrank_multitenant", impl, m, dtype)
    gen = rng(seed)
    num_t, k, n = 3, 256, 128
    bands = lowrank_bands(gen, k, n, SPECS, tenants=num_t, zero=True)
    x = activations(gen, m, k, dtype)
    tids = tenant_ids(gen, m, num_t)
    y_base = activations(gen, m, n, dtype)
    with on_cpu():
        got = lowrank_delta_matmul_multitenant(
            x, tids, bands, y_base=y_base, implementation=impl, interpret=True
        )
        want = lowrank_delta_matmul_multitenant(x, tids, bands, y_base=y_base, implementation="xla")
    assert_close(got, want, dtype=dtype, what=f"seed={seed} {impl} lowrank multitenant m={m}")


def test_lowrank_rejects_inconsistent_bands():
    seed = seed_for("test_lowrank_rejects_inconsistent_bands")
    gen = rng(seed)
    (band,) = lowrank_bands(gen, 128, 64, [(4, 32, 4, 32, 8)])
    x = activations(gen, 2, 128, F32)
    bad = LowRankBand(
        v_planes=band.v_planes,
        v_scale=band.v_scale,
        u_planes=band.u_planes,
        u_scale=band.u_scale,
        s=band.s[:16],
        v_bits=4,
        v_group=32,
        u_bits=4,
        u_group=32,
    )
    with pytest.raises(ValueError, match="s has shape"):
        lowrank_delta_matmul(x, (bad,))
    with pytest.raises(ValueError, match="at least one band"):
        lowrank_delta_matmul(x, ())
    with pytest.raises(ValueError, match="base must be"):
        lowrank_delta_matmul(x, (band,), base=jnp.zeros((63, 128)))


@pytest.mark.slow
def test_stored_delta_multitenant_interpret():
    """Delta-CoMe-layout bands (U packed along d_out; odd ranks 2 and 20; zeros and symmetric)
    through the masked multi-tenant Triton kernels = the per-tenant dequantized reference."""
    from pallas_kernels.lowrank_delta_matmul import stored_gpu as sg

    seed = seed_for("test_stored_delta_multitenant_interpret")
    gen = rng(seed)
    num_t, d_in, d_out = 2, 200, 128
    bands = []
    for bits, r, zero in [(4, 2, True), (3, 20, False)]:
        _, vp, vs, vz, _ = packed_operand(gen, d_in, r, bits=bits, group=128, zero=zero,
                                          tenants=num_t)
        _, up, us, uz, _ = packed_operand(gen, d_out, r, bits=bits, group=128, zero=zero,
                                          tenants=num_t)
        s = jnp.asarray(gen.uniform(0.5, 2.0, (num_t, r)), jnp.float32)
        bands.append(sg.StoredBand(v_planes=vp, v_scale=vs, v_zero=vz, u_planes=up, u_scale=us,
                                   u_zero=uz, s=s, v_bits=bits, v_group=128, u_bits=bits,
                                   u_group=128, n=d_out))
    x = activations(gen, 4, d_in, jnp.float32)
    ids = jnp.asarray([1, -1, 0, 1], jnp.int32)
    yb = activations(gen, 4, d_out, jnp.float32)
    with on_cpu():
        got = sg.stored_delta_multitenant(x, ids, tuple(bands), y_base=yb, interpret=True)
        want = sg.reference(x, ids, tuple(bands), y_base=yb)
    assert_close(got, want, dtype=jnp.float32, what=f"seed={seed} stored delta")
    # id -1: base only
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(yb[1]), err_msg=f"seed={seed}")
    assert float(jnp.abs(got[0] - yb[0]).max()) > 1e-3, f"seed={seed}"


# ----------------------------------------------------------------------------- dispatchers


@pytest.mark.slow
def test_sign_implementations_table_is_what_the_dispatchers_accept():
    """sign_matmul(_multitenant) accept "auto" and the keys of IMPLEMENTATIONS, nothing else."""
    table = sign_op.IMPLEMENTATIONS
    assert set(table) == {"xla", "pallas_gpu", "pallas_tpu"}
    for name, module in table.items():
        assert callable(module.sign_matmul) and callable(module.sign_matmul_multitenant), name
    seed = seed_for("test_sign_implementations_table_is_what_the_dispatchers_accept")
    gen = rng(seed)
    _, (words,), _, _, _ = packed_operand(gen, 256, 128, bits=1, group=32)
    _, (t_words,), _, _, _ = packed_operand(gen, 256, 128, bits=1, group=32, tenants=2)
    x = activations(gen, 5, 256, F32)
    tids = tenant_ids(gen, 5, 2)
    scales = jnp.asarray(gen.uniform(0.01, 0.1, 2), F32)
    with on_cpu():
        assert_accepts_exactly(
            lambda impl: sign_matmul(
                x, words, jnp.float32(0.05), implementation=impl, interpret=True
            ),
            table, where="sign_matmul", dtype=F32, seed=seed,
        )
        assert_accepts_exactly(
            lambda impl: sign_matmul_multitenant(
                x, tids, t_words, scales, implementation=impl, interpret=True
            ),
            table, where="sign_matmul_multitenant", dtype=F32, seed=seed,
        )


@pytest.mark.slow
def test_lowrank_implementations_table_is_what_the_dispatchers_accept():
    """lowrank_delta_matmul(_multitenant) accept "auto" and IMPLEMENTATIONS' keys, nothing else."""
    table = lowrank_op.IMPLEMENTATIONS
    assert set(table) == {"xla", "pallas_gpu", "pallas_tpu"}
    for name, module in table.items():
        assert callable(module.lowrank_delta_matmul), name
        assert callable(module.lowrank_delta_matmul_multitenant), name
    seed = seed_for("test_lowrank_implementations_table_is_what_the_dispatchers_accept")
    gen = rng(seed)
    specs = [(4, 128, 4, 128, 8)]  # group 128: both Pallas guards accept it
    bands = lowrank_bands(gen, 256, 128, specs)
    t_bands = lowrank_bands(gen, 256, 128, specs, tenants=2)
    x = activations(gen, 5, 256, F32)
    tids = tenant_ids(gen, 5, 2)
    with on_cpu():
        assert_accepts_exactly(
            lambda impl: lowrank_delta_matmul(x, bands, implementation=impl, interpret=True),
            table, where="lowrank_delta_matmul", dtype=F32, seed=seed,
        )
        assert_accepts_exactly(
            lambda impl: lowrank_delta_matmul_multitenant(
                x, tids, t_bands, implementation=impl, interpret=True
            ),
            table, where="lowrank_delta_matmul_multitenant", dtype=F32, seed=seed,
        )
