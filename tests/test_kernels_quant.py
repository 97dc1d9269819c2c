"""quant_matmul kernels (Triton and Mosaic-TPU, interpret mode on CPU) against the reference.

Every comparison uses seeded random inputs (`kernels_helpers.seed_for`: one seed per case, named
in the assert message). Kernel outputs are poisoned: the Pallas interpreter fills output buffers
with NaN before the kernel runs (checked by `test_interpreter_poisons_outputs`) and
`assert_close` rejects any non-finite element, so an unwritten tile fails the test.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
from kernels_helpers import (
    activations,
    assert_accepts_exactly,
    assert_close,
    on_cpu,
    packed_operand,
    rng,
    seed_for,
    tenant_ids,
)

from pallas_kernels import _triton as tr
from pallas_kernels.quant_matmul import (
    IMPLEMENTATIONS,
    pallas_gpu,
    pallas_tpu,
    quant_matmul,
    quant_matmul_multitenant,
)

BF16, F32 = jnp.bfloat16, jnp.float32
DECODE, PREFILL = 5, 136
# (K, N, group): powers of two, SmolLM2-like non-powers of two (K_pad 640, N 192), and odd sizes.
SHAPES = [(256, 128, 128), (576, 192, 128), (200, 96, 32)]


def _run(impl, seed, *, bits, m, k, n, group, dtype, zero):
    gen = rng(seed)
    k_pad, planes, scale, z, _ = packed_operand(gen, k, n, bits=bits, group=group, zero=zero)
    x = activations(gen, m, k, dtype)
    with on_cpu():
        got = quant_matmul(
            x, planes, scale, z, bits=bits, group=group, implementation=impl, interpret=True
        )
        want = quant_matmul(x, planes, scale, z, bits=bits, group=group, implementation="xla")
    assert got.dtype == x.dtype and got.shape == (m, n), f"seed={seed}"
    what = f"seed={seed} {impl} bits={bits} m={m} k={k} n={n} g={group}"
    assert_close(got, want, dtype=dtype, what=what)


GPU_CASES = [
    (bits, m, dtype, zero, shape)
    for i, bits in enumerate([1, 2, 3, 4, 8])
    for j, (m, dtype, zero) in enumerate(
        [(1, BF16, False), (DECODE, F32, True), (PREFILL, BF16, True), (PREFILL, F32, False)]
    )
    for shape in [SHAPES[(i + j) % len(SHAPES)]]
]


@pytest.mark.parametrize("bits,m,dtype,zero,shape", GPU_CASES)
def test_gpu_kernel_interpret(bits, m, dtype, zero, shape):
    k, n, group = shape
    seed = seed_for("test_gpu_kernel_interpret", bits, m, dtype, zero, shape)
    _run("pallas_gpu", seed, bits=bits, m=m, k=k, n=n, group=group, dtype=dtype, zero=zero)


@pytest.mark.parametrize("bits,group", [(4, 256), (2, 640), (5, 128)])
def test_gpu_kernel_other_groups(bits, group):
    """Groups larger than the K step (several steps per scale) and a 5-bit (4+1 planes) code."""
    seed = seed_for("test_gpu_kernel_other_groups", bits, group)
    _run("pallas_gpu", seed, bits=bits, m=16, k=576, n=64, group=group, dtype=BF16, zero=False)


TPU_CASES = [
    (1, DECODE, BF16, False, 256, 128),
    (2, PREFILL, F32, True, 576, 192),
    (3, 1, F32, False, 576, 192),
    (4, PREFILL, BF16, True, 256, 256),
    (8, DECODE, BF16, True, 256, 128),
]


@pytest.mark.parametrize("bits,m,dtype,zero,k,n", TPU_CASES)
def test_tpu_kernel_interpret(bits, m, dtype, zero, k, n):
    seed = seed_for("test_tpu_kernel_interpret", bits, m, dtype, zero, k, n)
    _run("pallas_tpu", seed, bits=bits, m=m, k=k, n=n, group=128, dtype=dtype, zero=zero)


MT_CASES = [
    ("pallas_gpu", 4, 7, BF16, False, True),
    ("pallas_gpu", 3, PREFILL, F32, True, False),
    ("pallas_gpu", 8, 16, F32, True, True),
    ("pallas_tpu", 2, 9, BF16, True, True),
    ("pallas_tpu", 4, 70, F32, False, False),
]


@pytest.mark.parametrize("impl,bits,m,dtype,zero,with_base", MT_CASES)
def test_multitenant_interpret(impl, bits, m, dtype, zero, with_base):
    seed = seed_for("test_multitenant_interpret", impl, bits, m, dtype, zero, with_base)
    gen = rng(seed)
    num_t, k, n, group = 3, 256, 128, 128
    _, planes, scale, z, _ = packed_operand(
        gen, k, n, bits=bits, group=group, zero=zero, tenants=num_t
    )
    x = activations(gen, m, k, dtype)
    tids = tenant_ids(gen, m, num_t)
    y_base = activations(gen, m, n, dtype) if with_base else None
    kw = dict(bits=bits, group=group, y_base=y_base)
    with on_cpu():
        got = quant_matmul_multitenant(
            x, tids, planes, scale, z, **kw, implementation=impl, interpret=True
        )
        want = quant_matmul_multitenant(x, tids, planes, scale, z, **kw, implementation="xla")
    assert_close(got, want, dtype=dtype, what=f"seed={seed} {impl} multitenant bits={bits} m={m}")
    if not with_base:  # rows without a delta are exactly zero
        assert not np.asarray(got)[np.asarray(tids) < 0].any(), f"seed={seed}"


def test_multitenant_all_rows_without_delta():
    seed = seed_for("test_multitenant_all_rows_without_delta")
    gen = rng(seed)
    _, planes, scale, _, _ = packed_operand(gen, 128, 64, bits=4, group=128, tenants=2)
    x = activations(gen, 4, 128, F32)
    with on_cpu():
        got = quant_matmul_multitenant(
            x,
            jnp.full((4,), -1, jnp.int32),
            planes,
            scale,
            None,
            bits=4,
            group=128,
            implementation="pallas_gpu",
            interpret=True,
        )
    np.testing.assert_array_equal(np.asarray(got), 0.0, err_msg=f"seed={seed}")


def test_interpreter_poisons_outputs():
    """The premise of the poisoning claim: an output the kernel never writes comes back NaN."""

    def kernel(x_ref, o_ref):
        del x_ref, o_ref

    with on_cpu():
        out = pl.pallas_call(
            kernel,
            out_shape=jax.ShapeDtypeStruct((16, 16), jnp.float32),
            grid=(1,),
            compiler_params=pltriton.CompilerParams(num_warps=4),
            interpret=True,
        )(jnp.zeros((16, 16)))
    assert np.isnan(np.asarray(out)).all()


# ----------------------------------------------------------------------------- dispatcher


def _operands(n=128, group=128, k=256, bits=4):
    seed = seed_for("_operands", n, group, k, bits)
    gen = rng(seed)
    _, planes, scale, _, _ = packed_operand(gen, k, n, bits=bits, group=group)
    return activations(gen, 3, k, BF16), planes, scale


def test_auto_falls_back_to_reference_on_cpu():
    if jax.default_backend() != "cpu":
        pytest.skip("checks the CPU fallback")
    x, planes, scale = _operands()
    f = functools.partial(quant_matmul, bits=4, group=128)
    jaxpr = str(jax.make_jaxpr(lambda *a: f(*a))(x, planes, scale))
    assert "pallas_call" not in jaxpr
    np.testing.assert_array_equal(
        np.asarray(f(x, planes, scale)), np.asarray(f(x, planes, scale, implementation="xla"))
    )


def test_explicit_kernel_needs_hardware_or_interpret():
    if jax.default_backend() != "cpu":
        pytest.skip("checks the CPU refusal")
    x, planes, scale = _operands()
    for impl in ("pallas_gpu", "pallas_tpu"):
        with pytest.raises(ValueError, match="interpret=True"):
            quant_matmul(x, planes, scale, bits=4, group=128, implementation=impl)


def test_guards_refuse_unsupported_shapes():
    # N = 24 has no power-of-two divisor >= 16: Triton cannot tile it.
    assert not pallas_gpu.can_use(k_pad=256, n=24, bits=4, group=128, dtype=BF16)
    assert pallas_gpu.can_use(k_pad=640, n=576, bits=3, group=128, dtype=BF16)
    # group 16 leaves K steps of 16 < 32 rows, too few for a 1-bit plane.
    assert not pallas_gpu.can_use(k_pad=256, n=64, bits=1, group=16, dtype=BF16)
    assert not pallas_gpu.can_use(k_pad=256, n=64, bits=4, group=128, dtype=jnp.int8)
    # TPU: lane-aligned slabs need group % 128 == 0; wide N must be a multiple of 128.
    assert not pallas_tpu.can_use(n=128, group=64, dtype=BF16)
    assert not pallas_tpu.can_use(n=4100, group=128, dtype=BF16)
    assert not pallas_tpu.can_use(n=128, group=128, dtype=jnp.float16)
    assert pallas_tpu.can_use(n=576, group=128, dtype=BF16)

    x, planes, scale = _operands(n=24)
    with pytest.raises(ValueError, match="pallas_gpu cannot run"):
        quant_matmul(
            x, planes, scale, bits=4, group=128, implementation="pallas_gpu", interpret=True
        )
    x, planes, scale = _operands(group=64)
    with pytest.raises(ValueError, match="pallas_tpu cannot run"):
        quant_matmul(
            x, planes, scale, bits=4, group=64, implementation="pallas_tpu", interpret=True
        )
    # auto still answers (through the reference) where the guard says no.
    x, planes, scale = _operands(n=24)
    assert quant_matmul(x, planes, scale, bits=4, group=128).shape == (3, 24)


def test_bad_operands_are_named():
    x, planes, scale = _operands()
    with pytest.raises(ValueError, match="needs 2 planes"):
        quant_matmul(x, planes, scale, bits=3, group=128)
    with pytest.raises(ValueError, match="scale has shape"):
        quant_matmul(x, planes, scale[:1], bits=4, group=128)
    with pytest.raises(ValueError, match="features"):
        quant_matmul(jnp.zeros((3, 300), BF16), planes, scale, bits=4, group=128)
    with pytest.raises(ValueError, match="implementation must be"):
        quant_matmul(x, planes, scale, bits=4, group=128, implementation="cuda")


@pytest.mark.slow
def test_implementations_table_is_what_the_dispatchers_accept():
    """quant_matmul(_multitenant) accept "auto" and the keys of IMPLEMENTATIONS, nothing else."""
    assert set(IMPLEMENTATIONS) == {"xla", "pallas_gpu", "pallas_tpu"}
    for name, module in IMPLEMENTATIONS.items():
        assert callable(module.quant_matmul) and callable(module.quant_matmul_multitenant), name
    seed = seed_for("test_implementations_table_is_what_the_dispatchers_accept")
    gen = rng(seed)
    _, planes, scale, z, _ = packed_operand(gen, 256, 128, bits=3, group=128, zero=True)
    x = activations(gen, 3, 256, F32)
    _, t_planes, t_scale, _, _ = packed_operand(gen, 256, 128, bits=4, group=128, tenants=2)
    tids = tenant_ids(gen, 5, 2)
    xt = activations(gen, 5, 256, F32)
    with on_cpu():
        assert_accepts_exactly(
            lambda impl: quant_matmul(
                x, planes, scale, z, bits=3, group=128, implementation=impl, interpret=True
            ),
            IMPLEMENTATIONS, where="quant_matmul", dtype=F32, seed=seed,
        )
        assert_accepts_exactly(
            lambda impl: quant_matmul_multitenant(
                xt, tids, t_planes, t_scale, bits=4, group=128, implementation=impl,
                interpret=True,
            ),
            IMPLEMENTATIONS, where="quant_matmul_multitenant", dtype=F32, seed=seed,
        )
    # The Mosaic GPU kernel is a key of PREPARED_IMPLEMENTATIONS only: the refusal points there.
    with pytest.raises(ValueError, match="then quant_matmul_prepared"):
        quant_matmul(x, planes, scale, z, bits=3, group=128, implementation="mosaic_gpu")


def test_leading_dims_padding_and_outer_jit():
    seed = seed_for("test_leading_dims_padding_and_outer_jit")
    gen = rng(seed)
    k_pad, planes, scale, _, _ = packed_operand(gen, 200, 64, bits=2, group=32)
    x = jnp.asarray(gen.standard_normal((2, 3, 200)), F32)

    @jax.jit
    def f(x, planes, scale):
        return quant_matmul(
            x, planes, scale, bits=2, group=32, implementation="pallas_gpu", interpret=True
        )

    with on_cpu():
        got = f(x, planes, scale)
        xp = jnp.pad(x.reshape(6, 200), ((0, 0), (0, k_pad - 200)))
        want = quant_matmul(xp, planes, scale, bits=2, group=32, implementation="xla")
    assert got.shape == (2, 3, 64)
    assert_close(got.reshape(6, 64), want, dtype=F32, what=f"seed={seed}")


@pytest.mark.parametrize(
    "bits,m,zero,dtype,block_m",
    [(1, 1, False, BF16, None), (3, 3, True, F32, None), (4, 4, False, BF16, None),
     (8, 2, True, BF16, None), (2, 5, False, F32, 8), (4, 1, True, jnp.float16, 2)],
)
def test_gpu_kernel_fma_tiles(bits, m, zero, dtype, block_m):
    """FMA tiles (no tensor-core dot) for small decode batches, incl. split-K and padded rows."""
    seed = seed_for("test_gpu_kernel_fma_tiles", bits, m, zero, dtype, block_m)
    gen = rng(seed)
    k, n = 576, 192  # SmolLM2-like: K pads to 640, N is not a power of two
    k_pad, planes, scale, z, _ = packed_operand(gen, k, n, bits=bits, group=128, zero=zero)
    x = activations(gen, m, k_pad, dtype)
    cfg = pallas_gpu.TritonConfig(fma=True, block_m=block_m, split_k=5)
    prog = pallas_gpu.plan_single(
        m, k_pad, n, tr.Packed(bits=bits, group=128, has_zero=zero), dtype, cfg
    )
    assert prog.fma
    assert prog.block_m == (block_m or 1 << (m - 1).bit_length())
    with on_cpu():
        got = pallas_gpu.quant_matmul(
            x, planes, scale, z, bits=bits, group=128, config=cfg, interpret=True
        )
        want = quant_matmul(x, planes, scale, z, bits=bits, group=128, implementation="xla")
    assert_close(got, want, dtype=dtype, what=f"seed={seed} fma bits={bits} m={m}")


def test_fma_default_threshold(monkeypatch):
    """FMA_MAX_ROWS picks FMA tiles for small batches only; multi-tenant only when asked."""
    monkeypatch.setattr(tr, "FMA_MAX_ROWS", 4)
    pk = tr.Packed(bits=4, group=128)
    assert pallas_gpu.plan_single(4, 4096, 4096, pk, BF16, None).fma
    assert not pallas_gpu.plan_single(5, 4096, 4096, pk, BF16, None).fma
    assert not pallas_gpu.plan_single(2, 4096, 4096, pk, BF16, None, tenants=True).fma
    monkeypatch.setattr(tr, "FMA_MAX_ROWS", 0)
    assert not pallas_gpu.plan_single(1, 4096, 4096, pk, BF16, None).fma
    with pytest.raises(ValueError, match="power of two >= 16"):
        pallas_gpu.plan_single(1, 4096, 4096, pk, BF16, pallas_gpu.TritonConfig(block_m=4))


@pytest.mark.parametrize("bits,zero,dtype,m", [(4, False, BF16, 3), (8, True, F32, 17),
                                               (4, True, BF16, 1), (2, False, BF16, 5)])
def test_gpu_kernel_split_dots(bits, zero, dtype, m):
    """NK tiles with one dot per word field (strided x columns); 2-bit falls back to reshape."""
    seed = seed_for("test_gpu_kernel_split_dots", bits, zero, dtype, m)
    gen = rng(seed)
    k_pad, planes, scale, z, _ = packed_operand(gen, 576, 192, bits=bits, group=128, zero=zero)
    x = activations(gen, m, k_pad, dtype)
    cfg = pallas_gpu.TritonConfig(unpack="split", split_k=5)
    with on_cpu():
        got = pallas_gpu.quant_matmul(
            x, planes, scale, z, bits=bits, group=128, config=cfg, interpret=True
        )
        want = quant_matmul(x, planes, scale, z, bits=bits, group=128, implementation="xla")
    assert_close(got, want, dtype=dtype, what=f"seed={seed} split bits={bits} m={m}")
