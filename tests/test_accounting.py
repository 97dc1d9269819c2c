"""deltajax/accounting.py: bytes by part of real containers, and the two ratios."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from deltajax import accounting, containers
from deltajax.methods import RTN, Keep, LowRank

Q = "layers.0.self_attn.q_proj.weight"
UP = "layers.0.mlp.up_proj.weight"
NORM = "norm.weight"
EMB = "embed_tokens.weight"


def _nbytes(*arrays) -> int:
    return sum(int(np.asarray(a).nbytes) for a in arrays)


@pytest.mark.parametrize("bits,sym", [(4, False), (3, False), (8, True)])
def test_container_bytes_quantized_matrix(rng, bits, sym):
    w = jnp.asarray(rng.standard_normal((16, 40)), jnp.float32)  # k padded to 64
    qm = containers.quantize_rtn(w, bits=bits, group=32, sym=sym)
    got = accounting.container_bytes(qm)
    want = {"codes": _nbytes(*qm.planes), "scales": _nbytes(qm.scale)}
    if not sym:
        want["zeros"] = _nbytes(qm.zero)
    assert got == want
    # padding words are counted: k_pad = 64, bits per entry of the padded matrix
    assert want["codes"] == 64 * bits * 16 // 8
    assert len(qm.planes) == (2 if bits == 3 else 1)


def test_container_bytes_low_rank(rng):
    d = jnp.asarray(rng.standard_normal((16, 32)), jnp.float32)
    c = LowRank(rank=4).compress(d)
    assert accounting.container_bytes(c) == {"factors": _nbytes(c.u, c.v)}
    assert _nbytes(c.u, c.v) == (16 * 4 + 4 * 32) * 2  # bf16 factors


def _hand_built(rng):
    d = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    comp = {
        Q: containers.compress_leaf(RTN(bits=4, group=32), Q, d(16, 32)),
        UP: containers.compress_leaf(LowRank(rank=4), UP, d(16, 32)),
        NORM: containers.compress_leaf(Keep(), NORM, d(32)),
    }
    shapes = {EMB: (10, 32), Q: (16, 32), UP: (16, 32), NORM: (32,)}
    return comp, shapes


def test_account_ratios_hand_built(rng):
    comp, shapes = _hand_built(rng)
    acc = accounting.account(comp, shapes)
    # RTN 4-bit g32 on 16x32: words (4, 16) u32 = 256 B, bf16 scale + zero (1, 16) = 32 B each
    # LowRank r4: u (16, 4) + v (4, 32) bf16 = 384 B; Keep bf16 norm (32,) = 64 B
    assert acc["linear_parts_bytes"] == {"codes": 256, "scales": 32, "zeros": 32,
                                         "factors": 384}
    assert acc["linear_bytes"] == 704
    assert acc["linear_params"] == 1024
    assert acc["linear_ratio"] == 2 * 1024 / 704
    assert acc["linear_bits_per_param"] == 8 * 704 / 1024
    # Keep counts in the total, not in the linear part
    assert acc["kept"] == [NORM] and acc["kept_bytes"] == 64 and acc["kept_params"] == 32
    assert acc["total_params"] == 320 + 1024 + 32
    assert acc["total_bytes"] == 704 + 64
    assert acc["total_ratio"] == 2 * 1376 / 768
    assert acc["dropped"] == [EMB]
    assert acc["methods"] == {"rtn": 512, "lowrank": 512}
    table = accounting.format_table(acc)
    assert f"**{2 * 1024 / 704:.2f}x**" in table and f"**{2 * 1376 / 768:.2f}x**" in table


def test_account_nothing_kept_or_dropped(rng):
    comp, shapes = _hand_built(rng)
    only_q = {Q: comp[Q]}
    acc = accounting.account(only_q, {Q: shapes[Q]})
    assert acc["linear_ratio"] == 2 * 512 / 320
    assert acc["total_ratio"] == acc["linear_ratio"]
    assert acc["kept"] == [] and acc["dropped"] == [] and acc["kept_bytes"] == 0
