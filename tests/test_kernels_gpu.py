"""Compiled Triton kernels on a real GPU against the references (skipped without a GPU).

Run on the GPU machine: `python3 -m pytest -q -m gpu tests/test_kernels_gpu.py`. Before each
kernel call the allocator pool is poisoned (a large NaN buffer is written and freed, so the
kernel's output buffer is likely carved from NaN-filled memory) and `assert_close` rejects any
non-finite output element.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernels_helpers import (
    activations,
    assert_close,
    lowrank_bands,
    packed_operand,
    rng,
    seed_for,
    tenant_ids,
)

from pallas_kernels.lowrank_delta_matmul import (
    lowrank_delta_matmul,
    lowrank_delta_matmul_multitenant,
)
from pallas_kernels.quant_matmul import pallas_gpu as qgpu
from pallas_kernels.quant_matmul import quant_matmul, quant_matmul_multitenant
from pallas_kernels.sign_matmul import sign_matmul, sign_matmul_multitenant

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU"),
]

BF16, F32, F16 = jnp.bfloat16, jnp.float32, jnp.float16


def _poison():
    jnp.full((32 << 20,), jnp.nan, jnp.float32).block_until_ready()


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("m", [1, 16, 200])
@pytest.mark.parametrize("zero", [False, True])
def test_quant_matmul_gpu(bits, m, zero):
    seed = seed_for("test_quant_matmul_gpu", bits, m, zero)
    gen = rng(seed)
    k, n, group = 1024, 576, 128
    _, planes, scale, z, _ = packed_operand(gen, k, n, bits=bits, group=group, zero=zero)
    x = activations(gen, m, k, BF16)
    _poison()
    got = quant_matmul(x, planes, scale, z, bits=bits, group=group, implementation="pallas_gpu")
    want = quant_matmul(x, planes, scale, z, bits=bits, group=group, implementation="xla")
    assert_close(got, want, dtype=BF16, what=f"seed={seed} gpu quant bits={bits} m={m} zero={zero}")


@pytest.mark.parametrize("dtype", [F32, F16])
def test_quant_matmul_gpu_dtypes(dtype):
    seed = seed_for("test_quant_matmul_gpu_dtypes", dtype)
    gen = rng(seed)
    _, planes, scale, _, _ = packed_operand(gen, 4096, 512, bits=4, group=128)
    x = activations(gen, 16, 4096, dtype)
    _poison()
    got = quant_matmul(x, planes, scale, bits=4, group=128, implementation="pallas_gpu")
    want = quant_matmul(x, planes, scale, bits=4, group=128, implementation="xla")
    assert_close(got, want, dtype=dtype, what=f"seed={seed} gpu quant {dtype}")


@pytest.mark.parametrize("m", [1, 64])
def test_sign_matmul_gpu(m):
    seed = seed_for("test_sign_matmul_gpu", m)
    gen = rng(seed)
    _, (words,), _, _, _ = packed_operand(gen, 4096, 512, bits=1, group=32)
    x = activations(gen, m, 4096, BF16)
    _poison()
    got = sign_matmul(x, words, jnp.float32(0.02), implementation="pallas_gpu")
    want = sign_matmul(x, words, jnp.float32(0.02), implementation="xla")
    assert_close(got, want, dtype=BF16, what=f"seed={seed} gpu sign")


@pytest.mark.parametrize("m,with_base", [(1, False), (16, True), (100, True)])
def test_lowrank_gpu(m, with_base):
    seed = seed_for("test_lowrank_gpu", m, with_base)
    gen = rng(seed)
    k, n = 1024, 768
    bands = lowrank_bands(
        gen, k, n, [(8, 128, 8, 128, 2), (3, 128, 3, 128, 32), (2, 128, 2, 128, 200)]
    )
    x = activations(gen, m, k, BF16)
    base = jnp.asarray(gen.standard_normal((n, k)) * 0.02, BF16) if with_base else None
    _poison()
    got = lowrank_delta_matmul(x, bands, base=base, implementation="pallas_gpu")
    want = lowrank_delta_matmul(x, bands, base=base, implementation="xla")
    assert_close(got, want, dtype=BF16, what=f"seed={seed} gpu lowrank m={m}")


@pytest.mark.parametrize("m", [16, 200])
def test_multitenant_gpu(m):
    seed = seed_for("test_multitenant_gpu", m)
    gen = rng(seed)
    num_t, k, n = 4, 1024, 512
    tids = tenant_ids(gen, m, num_t)
    x = activations(gen, m, k, BF16)
    y_base = activations(gen, m, n, BF16)
    _, planes, scale, z, _ = packed_operand(gen, k, n, bits=3, group=128, zero=True, tenants=num_t)
    _poison()
    got = quant_matmul_multitenant(
        x, tids, planes, scale, z, bits=3, group=128, y_base=y_base, implementation="pallas_gpu"
    )
    want = quant_matmul_multitenant(
        x, tids, planes, scale, z, bits=3, group=128, y_base=y_base, implementation="xla"
    )
    assert_close(got, want, dtype=BF16, what=f"seed={seed} gpu quant multitenant")

    _, (words,), _, _, _ = packed_operand(gen, k, n, bits=1, group=32, tenants=num_t)
    scales = jnp.asarray(gen.uniform(0.01, 0.1, num_t), F32)
    _poison()
    got = sign_matmul_multitenant(x, tids, words, scales, implementation="pallas_gpu")
    want = sign_matmul_multitenant(x, tids, words, scales, implementation="xla")
    assert_close(got, want, dtype=BF16, what=f"seed={seed} gpu sign multitenant")

    bands = lowrank_bands(gen, k, n, [(8, 128, 8, 128, 2), (2, 128, 2, 128, 60)], tenants=num_t)
    _poison()
    got = lowrank_delta_matmul_multitenant(
        x, tids, bands, y_base=y_base, implementation="pallas_gpu"
    )
    want = lowrank_delta_matmul_multitenant(x, tids, bands, y_base=y_base, implementation="xla")
    assert_close(got, want, dtype=BF16, what=f"seed={seed} gpu lowrank multitenant")


@pytest.mark.parametrize("m,dtype", [(1, BF16), (16, BF16), (40, F16), (16, F32)])
def test_stored_delta_multitenant_gpu(m, dtype):
    """Delta-CoMe-layout bands (V, U both packed along their own K; odd ranks), compiled."""
    from pallas_kernels.lowrank_delta_matmul import stored_gpu as sg

    seed = seed_for("test_stored_delta_multitenant_gpu", m, dtype)
    gen = rng(seed)
    num_t, d_in, d_out = 4, 1024, 512
    bands = []
    for bits, r, zero in [(8, 2, True), (3, 32, False), (2, 100, True)]:
        _, vp, vs, vz, _ = packed_operand(gen, d_in, r, bits=bits, group=128, zero=zero,
                                          tenants=num_t)
        _, up, us, uz, _ = packed_operand(gen, d_out, r, bits=bits, group=128, zero=zero,
                                          tenants=num_t)
        s = jnp.asarray(gen.uniform(0.5, 2.0, (num_t, r)), jnp.float32)
        bands.append(sg.StoredBand(v_planes=vp, v_scale=vs, v_zero=vz, u_planes=up, u_scale=us,
                                   u_zero=uz, s=s, v_bits=bits, v_group=128, u_bits=bits,
                                   u_group=128, n=d_out))
    bands = tuple(bands)
    x = activations(gen, m, d_in, dtype)
    ids = tenant_ids(gen, m, num_t)
    yb = activations(gen, m, d_out, dtype)
    _poison()
    got = jax.jit(sg.stored_delta_multitenant)(x, ids, bands, y_base=yb)
    want = sg.reference(x, ids, bands, y_base=yb)
    assert_close(got, want, dtype=dtype, what=f"seed={seed} gpu stored delta m={m} {dtype}")


@pytest.mark.parametrize("bits,m,zero,dtype", [(1, 1, False, BF16), (2, 2, True, BF16),
                                               (3, 4, False, F32), (4, 1, True, F16),
                                               (4, 8, False, BF16), (8, 16, True, BF16)])
@pytest.mark.parametrize("block_n,warps", [(64, 4), (256, 8)])
def test_quant_matmul_gpu_fma_tiles(bits, m, zero, dtype, block_n, warps):
    """FMA tiles (no tensor-core dot) compiled, incl. split-K and SmolLM2-like odd N."""
    seed = seed_for("test_quant_matmul_gpu_fma_tiles", bits, m, zero, dtype, block_n, warps)
    gen = rng(seed)
    k_pad, planes, scale, z, _ = packed_operand(gen, 1024, 768, bits=bits, group=128, zero=zero)
    x = activations(gen, m, k_pad, dtype)
    cfg = qgpu.TritonConfig(fma=True, block_n=block_n, num_warps=warps)
    _poison()
    got = qgpu.quant_matmul(x, planes, scale, z, bits=bits, group=128, config=cfg)
    want = quant_matmul(x, planes, scale, z, bits=bits, group=128, implementation="xla")
    assert_close(got, want, dtype=dtype, what=f"seed={seed} gpu fma bits={bits} m={m} bn={block_n}")


@pytest.mark.parametrize("op", ["sign", "quant"])
def test_multitenant_gpu_fma_rows(op):
    """Per-row FMA work items (block_m=1) for one-token-per-tenant serving, compiled."""
    from pallas_kernels.sign_matmul import pallas_gpu as sgpu

    seed = seed_for("test_multitenant_gpu_fma_rows", op)
    gen = rng(seed)
    num_t, k, n, m = 4, 1024, 512, 16
    x = activations(gen, m, k, BF16)
    ids = tenant_ids(gen, m, num_t)
    cfg = qgpu.TritonConfig(fma=True, block_m=1, block_n=64)
    _poison()
    if op == "sign":
        _, (words,), _, _, _ = packed_operand(gen, k, n, bits=1, group=32, tenants=num_t)
        sc = jnp.asarray(gen.uniform(0.01, 0.1, num_t), F32)
        got = sgpu.sign_matmul_multitenant(x, ids, words, sc, config=cfg)
        want = sign_matmul_multitenant(x, ids, words, sc, implementation="xla")
    else:
        _, planes, scale, _, _ = packed_operand(gen, k, n, bits=4, group=128, tenants=num_t)
        got = qgpu.quant_matmul_multitenant(x, ids, planes, scale, None, bits=4, group=128,
                                            config=cfg)
        want = quant_matmul_multitenant(x, ids, planes, scale, bits=4, group=128,
                                        implementation="xla")
    assert_close(got, want, dtype=BF16, what=f"seed={seed} gpu MT fma {op}")


@pytest.mark.parametrize("bits,m,zero,dtype", [(4, 1, False, BF16), (4, 16, True, BF16),
                                               (8, 64, False, F16), (4, 200, False, F32),
                                               (2, 16, False, BF16)])
def test_quant_matmul_gpu_split_dots(bits, m, zero, dtype):
    """NK tiles with one dot per word field (x columns permuted outside), compiled."""
    seed = seed_for("test_quant_matmul_gpu_split_dots", bits, m, zero, dtype)
    gen = rng(seed)
    k_pad, planes, scale, z, _ = packed_operand(gen, 1024, 768, bits=bits, group=128, zero=zero)
    x = activations(gen, m, k_pad, dtype)
    cfg = qgpu.TritonConfig(unpack="split")
    _poison()
    got = qgpu.quant_matmul(x, planes, scale, z, bits=bits, group=128, config=cfg)
    want = quant_matmul(x, planes, scale, z, bits=bits, group=128, implementation="xla")
    assert_close(got, want, dtype=dtype, what=f"seed={seed} gpu split bits={bits} m={m}")


@pytest.mark.parametrize("m", [1, 4, 16, 64])
@pytest.mark.parametrize("fma", [None, True, False])
def test_dense_matmul_gpu(m, fma):
    from pallas_kernels.dense_matmul import TritonConfig, dense_matmul

    if fma and m > 4:
        pytest.skip("FMA tiles are for a few rows")
    seed = seed_for("test_dense_matmul_gpu", m, fma)
    gen = rng(seed)
    x = activations(gen, m, 1024, BF16)
    w = jnp.asarray(gen.normal(size=(576, 1024)) * 0.05, BF16)
    cfg = None if fma is None else TritonConfig(fma=fma)
    _poison()
    got = dense_matmul(x, w, implementation="pallas_gpu", config=cfg)
    want = dense_matmul(x, w, implementation="xla")
    assert_close(got, want, dtype=BF16, what=f"seed={seed} gpu dense m={m} fma={fma}")


@pytest.mark.parametrize("b,h,kh,s", [(16, 32, 32, 161), (1, 32, 8, 2049), (4, 8, 1, 40)])
def test_decode_attention_gpu(b, h, kh, s):
    from pallas_kernels.decode_attention import decode_attention

    seed = seed_for("test_decode_attention_gpu", b, h, kh, s)
    gen = rng(seed)
    q = jnp.asarray(gen.normal(size=(b, h, 128)), BF16)
    k = jnp.asarray(gen.normal(size=(b, s, kh, 128)), BF16)
    v = jnp.asarray(gen.normal(size=(b, s, kh, 128)), BF16)
    valid = jnp.asarray(gen.random((b, s)) < 0.8)
    _poison()
    got = decode_attention(q, k, v, valid, implementation="pallas_gpu")
    want = decode_attention(q, k, v, valid, implementation="xla")
    assert_close(got, want, dtype=BF16, what=f"seed={seed} gpu decode attention b={b} s={s}")


def test_decode_attention_gpu_stops_at_row_length():
    """A serving cache (2048 slots, rows of 1..2048 tokens): equal to the reference, and the
    whole blocks past a row's length are never read (NaN there would poison the row)."""
    from pallas_kernels.decode_attention import decode_attention

    seed = seed_for("test_decode_attention_gpu_stops_at_row_length")
    gen = rng(seed)
    b, h, kh, s = 6, 32, 8, 2048
    lengths = np.array([1, 63, 64, 130, 1500, 2048])
    q = jnp.asarray(gen.normal(size=(b, h, 128)), BF16)
    k = jnp.asarray(gen.normal(size=(b, s, kh, 128)), BF16)
    v = jnp.asarray(gen.normal(size=(b, s, kh, 128)), BF16)
    valid = jnp.asarray(np.arange(s)[None] < lengths[:, None])
    want = decode_attention(q, k, v, valid, implementation="xla")
    past = jnp.asarray(np.arange(s)[None] >= -(-lengths[:, None] // 64) * 64)[:, :, None, None]
    got = decode_attention(q, jnp.where(past, jnp.nan, k), jnp.where(past, jnp.nan, v), valid,
                           implementation="pallas_gpu", block_s=64)
    assert_close(got, want, dtype=BF16, what=f"seed={seed} gpu decode attention, prefix rows")
