"""The Mosaic GPU (Hopper wgmma) quant_matmul: its serving layout, its lowering, its guards.

On CPU: `prepare` + the reference of the prepared layout must equal the stored format's
reference (so the layout change is lossless), the kernel must lower for CUDA (that runs Mosaic
GPU's layout inference and the whole Pallas lowering; only PTX compilation is left to the GPU),
and bad inputs must be refused with a clear error. The compiled kernel is checked against the
reference by the GPU tests at the end (skipped without a Hopper GPU); Mosaic GPU's interpreter
cannot run it (no register-A wgmma).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from kernels_helpers import (
    activations,
    assert_accepts_exactly,
    assert_close,
    packed_operand,
    rng,
    seed_for,
)

from pallas_kernels.quant_matmul import (
    PREPARED_IMPLEMENTATIONS,
    MosaicConfig,
    mosaic_gpu,
    prepare,
    quant_matmul,
    quant_matmul_prepared,
)

BF16, F32, F16 = jnp.bfloat16, jnp.float32, jnp.float16


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("zero", [False, True])
def test_prepared_layout_is_lossless(bits, zero):
    seed = seed_for("test_prepared_layout_is_lossless", bits, zero)
    gen = rng(seed)
    k, n = 384, 192
    k_pad, planes, scale, z, _ = packed_operand(gen, k, n, bits=bits, group=128, zero=zero)
    x = activations(gen, 5, k_pad, F32)
    w = prepare(planes, scale, z, bits=bits, group=128, dtype=F32)
    assert w.codes.shape == (n, k_pad) and w.codes.dtype == (jnp.int4 if bits == 4 else jnp.int8)
    got = quant_matmul_prepared(x, w, implementation="xla")
    want = quant_matmul(x, planes, scale, z, bits=bits, group=128, implementation="xla")
    assert_close(got, want, dtype=F32, what=f"seed={seed} prepared bits={bits} zero={zero}")
    # bf16 alpha/beta (the kernel's default) round the folded scales: bf16-level error only.
    wb = prepare(planes, scale, z, bits=bits, group=128)
    assert_close(quant_matmul_prepared(x.astype(BF16), wb, implementation="xla"), want,
                 dtype=BF16, what=f"seed={seed} prepared bf16")


def test_prepared_implementations_table_is_what_the_dispatcher_accepts():
    """quant_matmul_prepared accepts "auto" and PREPARED_IMPLEMENTATIONS' keys, nothing else
    ("mosaic_gpu" is accepted but refused off Hopper, as not the hardware, not as unknown)."""
    assert set(PREPARED_IMPLEMENTATIONS) == {"xla", "mosaic_gpu"}
    assert PREPARED_IMPLEMENTATIONS["mosaic_gpu"] is mosaic_gpu.quant_matmul
    assert PREPARED_IMPLEMENTATIONS["xla"] is mosaic_gpu.reference
    seed = seed_for("test_prepared_implementations_table_is_what_the_dispatcher_accepts")
    gen = rng(seed)
    k_pad, planes, scale, _, _ = packed_operand(gen, 256, 128, bits=4, group=128)
    w = prepare(planes, scale, None, bits=4, group=128)
    x = activations(gen, 3, k_pad, BF16)
    assert_accepts_exactly(
        lambda impl: quant_matmul_prepared(x, w, implementation=impl),
        PREPARED_IMPLEMENTATIONS, where="quant_matmul_prepared", dtype=BF16, seed=seed,
    )
    if not mosaic_gpu.on_hopper():
        with pytest.raises(ValueError, match="needs a Hopper GPU"):
            quant_matmul_prepared(x, w, implementation="mosaic_gpu")


def test_prepared_bytes_count_every_array():
    seed = seed_for("test_prepared_bytes_count_every_array")
    gen = rng(seed)
    _, planes, scale, _, _ = packed_operand(gen, 256, 128, bits=4, group=128)
    w = prepare(planes, scale, None, bits=4, group=128)
    assert w.nbytes == 256 * 128 // 2 + 2 * (2 * 128 * 2)  # codes + alpha + beta (bf16)


@pytest.mark.parametrize(
    "m,bits,cfg",
    [
        (1, 4, MosaicConfig()),
        (16, 4, MosaicConfig(block_n=128, block_k=256, split_k=1)),
        (3, 8, MosaicConfig(stages=2)),
        (14, 4, MosaicConfig()),  # ragged batch above the 8-row TMA tiling: padded
        (37, 4, MosaicConfig(block_k=256)),
        (200, 4, MosaicConfig()),  # prefill: 64-row chunks under lax.map
        (64, 8, MosaicConfig(block_n=64, split_k=2, pad_x=True)),
    ],
)
def test_kernel_lowers_for_cuda(m, bits, cfg):
    seed = seed_for("test_kernel_lowers_for_cuda", m, bits, cfg)
    gen = rng(seed)
    k_pad, planes, scale, z, _ = packed_operand(gen, 512, 256, bits=bits, group=128)
    w = prepare(planes, scale, z, bits=bits, group=128)
    x = activations(gen, m, k_pad, BF16)
    f = jax.jit(lambda x, w: mosaic_gpu.quant_matmul(x, w, config=cfg))
    text = f.trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text  # one Mosaic GPU custom call, layouts inferred


def test_guards_and_bad_input():
    seed = seed_for("test_guards_and_bad_input")
    gen = rng(seed)
    _, planes, scale, _, _ = packed_operand(gen, 256, 128, bits=2, group=128)
    with pytest.raises(ValueError, match="4, 8"):
        prepare(planes, scale, None, bits=2, group=128)
    _, planes, scale, _, _ = packed_operand(gen, 256, 128, bits=4, group=64)
    with pytest.raises(ValueError, match="group = 128"):
        prepare(planes, scale, None, bits=4, group=64)
    _, planes, scale, _, _ = packed_operand(gen, 256, 96, bits=4, group=128)
    with pytest.raises(ValueError, match="multiple of 64"):
        prepare(planes, scale, None, bits=4, group=128)
    _, planes, scale, _, _ = packed_operand(gen, 256, 128, bits=4, group=128)
    with pytest.raises(ValueError, match="scale has shape"):
        prepare(planes, scale[:1], None, bits=4, group=128)
    w = prepare(planes, scale, None, bits=4, group=128)
    x = activations(gen, 2, 256, BF16)
    from pallas_kernels.quant_matmul import choose_prepared

    want = "mosaic_gpu" if mosaic_gpu.on_hopper() else "xla"
    assert choose_prepared(w, m=2, dtype=BF16, implementation="auto") == want
    assert choose_prepared(w, m=300, dtype=BF16, implementation="auto") == want  # chunked
    assert choose_prepared(w, m=2, dtype=F32, implementation="auto") == "xla"  # no fp32 wgmma
    if not mosaic_gpu.on_hopper():
        with pytest.raises(ValueError, match="Hopper"):
            quant_matmul_prepared(x, w, implementation="mosaic_gpu")
    with pytest.raises(ValueError, match="bf16/fp16"):
        mosaic_gpu.quant_matmul(x.astype(F32), w)
    with pytest.raises(ValueError, match="implementation"):
        quant_matmul_prepared(x, w, implementation="pallas_gpu")
    with pytest.raises(ValueError, match="features"):
        quant_matmul_prepared(activations(gen, 2, 300, BF16), w)
    with pytest.raises(ValueError, match="block_n"):
        mosaic_gpu.quant_matmul(x, w, config=MosaicConfig(block_n=32))


# ----------------------------------------------------------------------------- on a Hopper GPU

hopper = pytest.mark.skipif(not mosaic_gpu.on_hopper(), reason="needs a Hopper GPU (sm_90)")


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m", [1, 3, 14, 16, 37, 64, 200])
@pytest.mark.parametrize("zero", [False, True])
def test_mosaic_gpu_matches_reference(bits, m, zero):
    seed = seed_for("test_mosaic_gpu_matches_reference", bits, m, zero)
    gen = rng(seed)
    k_pad, planes, scale, z, _ = packed_operand(gen, 1024, 512, bits=bits, group=128, zero=zero)
    x = activations(gen, m, k_pad, BF16)
    w = prepare(planes, scale, z, bits=bits, group=128)
    jnp.full((32 << 20,), jnp.nan, F32).block_until_ready()  # poison the allocator pool
    got = quant_matmul_prepared(x, w, implementation="mosaic_gpu")
    want = quant_matmul(x.astype(F32), planes, scale, z, bits=bits, group=128,
                        implementation="xla")
    assert_close(got, want, dtype=BF16, what=f"seed={seed} mosaic bits={bits} m={m} zero={zero}")


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize(
    "cfg",
    [MosaicConfig(block_n=128), MosaicConfig(block_k=256), MosaicConfig(split_k=1, stages=2),
     MosaicConfig(pad_x=True, split_k=4)],
)
@pytest.mark.parametrize("dtype", [BF16, F16])
def test_mosaic_gpu_configs(cfg, dtype):
    seed = seed_for("test_mosaic_gpu_configs", cfg, dtype)
    gen = rng(seed)
    k_pad, planes, scale, _, _ = packed_operand(gen, 2048, 256, bits=4, group=128)
    x = activations(gen, 5, k_pad, dtype)
    w = prepare(planes, scale, None, bits=4, group=128, dtype=dtype)
    got = mosaic_gpu.quant_matmul(x, w, config=cfg)
    want = quant_matmul(x.astype(F32), planes, scale, None, bits=4, group=128,
                        implementation="xla")
    assert_close(got, want, dtype=dtype, what=f"seed={seed} mosaic {cfg} {dtype}")


@pytest.mark.gpu
@hopper
def test_attached_rtn4_delta_served_by_mosaic_gpu():
    """deltajax.attach on a Hopper GPU prepares 4-bit group-128 deltas ("auto"); the bf16 logits
    match the stored-format (Triton) path."""
    from tiny_pair import perturb, tiny_base

    from deltajax import delta
    from deltajax import model as M
    from deltajax.methods import RTN
    from deltajax.ops import DeltaWeight

    cfg = M.ModelConfig(vocab_size=53, hidden_size=256, intermediate_size=512,
                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=64)
    base = jax.tree.map(lambda a: a.astype(BF16), tiny_base(cfg))
    seed = seed_for("test_attached_rtn4_delta_served_by_mosaic_gpu")
    ft = perturb(base, jax.random.PRNGKey(seed))
    comp = delta.compress(base, ft, RTN(bits=4, group=128), progress=False)
    tok = jnp.asarray(rng(seed).integers(0, cfg.vocab_size, (2, 7)), jnp.int32)
    auto = delta.attach(base, comp)
    leaves = [w for w in jax.tree.leaves(auto, is_leaf=lambda v: isinstance(v, DeltaWeight))
              if isinstance(w, DeltaWeight)]
    assert leaves and all(type(w.delta.container).__name__ == "PreparedMatrix" for w in leaves)
    got = M.forward_jit(auto, tok, cfg)
    want = M.forward_jit(delta.attach(base, comp, prepare=False), tok, cfg)
    assert_close(got, want, dtype=BF16, what=f"seed={seed} attached prepared vs stored")
