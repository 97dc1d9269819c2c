"""Benchmark the packed-matmul kernels on a GPU and write benchmarks/kernels.md.

Checks each Pallas kernel against its reference on the device first (`--check`), then times
per-layer µs for quant_matmul (group 128), sign_matmul, lowrank_delta_matmul (Delta-CoMe bands)
and the multi-tenant forms (T=16), against XLA bf16 dense, XLA int4 per-channel and the unfused
XLA dequantize-then-matmul of the same packed data. `--sweep` times a grid of Triton tile configs.

Timing (KERNELS.md §6): one jit runs `--loops` iterations of a `lax.fori_loop`; each iteration
applies R distinct layers (R chosen so the weights of one iteration exceed 160 MB, beyond L2), and
each layer's input depends on the previous output through one tiny fused add, so nothing is
hoisted. µs/layer = median of `--reps` runs / (loops * R); it includes launch gaps and glue ops
(the loop's own cost per layer is measured and printed as "loop overhead"). Roofline % = bytes a
layer must move (packed codes + scales + activations in and out) / the measured device copy
bandwidth, divided by the measured time.

Example:
  python benchmarks/bench_kernels.py --quick
  python benchmarks/bench_kernels.py --sweep --nobench
"""

from __future__ import annotations

import collections
import glob
import importlib.metadata
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback

import _common as C
import jax
import jax.numpy as jnp
from absl import app, flags

from pallas_kernels import _triton as tr
from pallas_kernels import packing
from pallas_kernels.lowrank_delta_matmul import (
    LowRankBand,
    lowrank_delta_matmul,
    lowrank_delta_matmul_multitenant,
)
from pallas_kernels.lowrank_delta_matmul import pallas_gpu as lrgpu
from pallas_kernels.quant_matmul import mosaic_gpu as qmg
from pallas_kernels.quant_matmul import pallas_gpu as qgpu
from pallas_kernels.quant_matmul import quant_matmul, quant_matmul_multitenant
from pallas_kernels.quant_matmul import reference as qref
from pallas_kernels.sign_matmul import pallas_gpu as sgpu
from pallas_kernels.sign_matmul import sign_matmul, sign_matmul_multitenant

FLAGS = flags.FLAGS
flags.DEFINE_bool("quick", False, "Run a small subset (2 shapes, 1 and 16 tokens, w4/w2).")
flags.DEFINE_bool("check", True, "Check every kernel against its reference on the device first.")
flags.DEFINE_bool("bench", True, "Run the benchmark tables.")
flags.DEFINE_bool("sweep", False, "Time a grid of Triton tile configs for quant_matmul.")
flags.DEFINE_integer("loops", 10, "fori_loop iterations per timed run.")
flags.DEFINE_integer("reps", 5, "Timed runs (the median is reported).")
flags.DEFINE_string("out", "benchmarks/kernels.md", "Markdown report path.")
flags.DEFINE_integer("sweep_budget_s", 150, "Stop starting new sweep configs after this long.")
flags.DEFINE_bool("smoke", False, "Tiny shapes, CPU allowed: checks the script's plumbing only.")
flags.DEFINE_bool(
    "profile",
    True,
    "Also run each timed loop once under the JAX profiler and report device kernel time per "
    "layer (the Pallas kernel alone, and all kernels of the layer).",
)
flags.DEFINE_list("shapes", [], "K×N shapes for the quant table, e.g. 4096x4096 (default: all 4).")
flags.DEFINE_list("tokens", [], "Token counts M for the quant table (default 1,16,32,64).")
flags.DEFINE_list("bits", [], "Bit widths at every M (default 4,2).")
flags.DEFINE_list("bits_m16", [], "Extra bit widths at M=16 (default 8,3,1).")
flags.DEFINE_list(
    "sections", ["quant", "sign", "lowrank", "multitenant"], "Which timing tables to run."
)
flags.DEFINE_bool(
    "fma",
    False,
    "A/B FMA tiles (no tensor-core dot) against the MMA tiles for small decode batches; adopt "
    "FMA_MAX_ROWS and the FMA tile from the result.",
)
flags.DEFINE_integer("fma_budget_s", 200, "Seconds after which no new FMA A/B timing starts.")
flags.DEFINE_bool(
    "mosaic", False,
    "A/B the Mosaic GPU (wgmma) quant_matmul against the Triton kernel: device check, then "
    "tile configs; reports the fastest config and where it beats Triton (the default in "
    "mosaic_gpu.py is set by hand from that report).",
)
flags.DEFINE_bool(
    "mosaic_rows", True,
    "Add Mosaic GPU rows (prepared 4/8-bit weights) to the quant table where its guard accepts.",
)
flags.DEFINE_integer("mosaic_budget_s", 240, "Seconds after which no new Mosaic timing starts.")
flags.DEFINE_string("check_filter", "", "pytest -k expression for --check (default: every test).")

GROUP = 128
TARGET_BYTES = 160e6
BF16 = jnp.bfloat16
LOG: list[str] = []


def log(msg: str = "") -> None:
    print(msg, flush=True)
    LOG.append(msg)


# ----------------------------------------------------------------------------- timing


def _carry(x, y):
    k, n = x.shape[-1], y.shape[-1]
    z = y[:, :k] if n >= k else jnp.pad(y, ((0, 0), (0, k - n)))
    return x + (z * 1e-8).astype(x.dtype)


PROFILE_INFO: dict = {"lines": set(), "kernels": collections.Counter()}
LAST_PROFILE: dict = {}
PALLAS_KERNEL_NAME = "deltajax_packed_matmul"


def _device_kernel_ns(run, args) -> collections.Counter:
    """ns per kernel name of one call of `run`, from the profiler's GPU stream lines."""
    d = tempfile.mkdtemp(prefix="jaxprof")
    try:
        jax.profiler.start_trace(d)
        run(*args).block_until_ready()
        jax.profiler.stop_trace()
        paths = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        pd = jax.profiler.ProfileData.from_file(paths[0])
        tot: collections.Counter = collections.Counter()
        for plane in pd.planes:
            if not plane.name.startswith("/device:GPU"):
                continue
            for line in plane.lines:
                PROFILE_INFO["lines"].add(line.name)
                if "Stream" not in line.name:
                    continue
                for ev in line.events:
                    tot[ev.name] += ev.duration_ns
        return tot
    finally:
        shutil.rmtree(d, ignore_errors=True)


def time_layers(fn, x0, weights) -> float:
    """Median µs per layer of `fn(x, w)` over the distinct layers `weights`.

    With --profile, also stores in LAST_PROFILE the device time per layer of the Pallas kernel
    alone ("kernel", µs) and of every kernel the loop ran ("busy", µs; the loop's own carry add
    included).
    """
    loops, r = FLAGS.loops, len(weights)

    @jax.jit
    def run(x, ws):
        def body(i, x):
            for w in ws:
                x = _carry(x, fn(x, w))
            return x

        return jax.lax.fori_loop(0, loops, body, x)

    run(x0, weights).block_until_ready()
    ts = []
    for _ in range(FLAGS.reps):
        t0 = time.perf_counter()
        run(x0, weights).block_until_ready()
        ts.append(time.perf_counter() - t0)
    LAST_PROFILE.clear()
    if FLAGS.profile and not FLAGS.smoke:
        try:
            ns = _device_kernel_ns(run, (x0, weights))
            calls = loops * r
            PROFILE_INFO["kernels"].update({k: 1 for k in ns})
            kern = sum(v for k, v in ns.items() if PALLAS_KERNEL_NAME in k)
            LAST_PROFILE["kernel"] = kern / calls / 1e3 if kern else None
            LAST_PROFILE["busy"] = sum(ns.values()) / calls / 1e3 if ns else None
            LAST_PROFILE["per_kernel"] = {k: v / calls / 1e3 for k, v in ns.items()}
        except Exception as e:  # the profiler is a diagnostic; never lose the wall-clock number
            log(f"profile failed: {type(e).__name__}: {str(e)[:200]}")
    return statistics.median(ts) / (loops * r) * 1e6


def prof(key):
    return LAST_PROFILE.get(key)


def copies(layer_bytes: float) -> int:
    return int(min(32, max(2, math.ceil(TARGET_BYTES / layer_bytes))))


# ----------------------------------------------------------------------------- weights


class Maker:
    """Random device weights; every call draws new values."""

    def __init__(self):
        self.key = jax.random.key(int(time.time()))

    def _k(self):
        self.key, k = jax.random.split(self.key)
        return k

    def words(self, shape):
        return jax.random.bits(self._k(), shape, jnp.uint32)

    def packed(self, k, n, bits, lead=()):
        planes = tuple(self.words(lead + (k * pb // 32, n)) for pb in packing.plane_bits(bits))
        scale = jax.random.uniform(self._k(), lead + (k // GROUP, n), BF16, 0.5, 1.5) / 2**bits
        return planes, scale

    def dense(self, n, k):
        return (jax.random.normal(self._k(), (n, k), jnp.float32) * 0.02).astype(BF16)

    def int4(self, k, n):
        q = jax.random.randint(self._k(), (k, n), -8, 8, jnp.int32).astype(jnp.int4)
        return q, jax.random.uniform(self._k(), (n,), BF16, 0.001, 0.01)

    def x(self, m, k):
        return jax.random.normal(self._k(), (m, k), BF16)

    def band(self, k, n, bits, rank, lead=()):
        r_pad = packing.padded_k(rank, GROUP)
        vp, vs = self.packed(k, r_pad, bits, lead)
        up, us = self.packed(r_pad, n, bits, lead)
        col = (jnp.arange(r_pad) < rank).astype(BF16)
        s = jax.random.uniform(self._k(), lead + (r_pad,), jnp.float32) * col.astype(jnp.float32)
        return LowRankBand(
            v_planes=vp,
            v_scale=vs * col,
            u_planes=up,
            u_scale=us,
            s=s,
            v_bits=bits,
            v_group=GROUP,
            u_bits=bits,
            u_group=GROUP,
            rank=rank,
        )


def packed_bytes(k, n, bits):
    return k * n * bits / 8 + (k // GROUP) * n * 2


def io_bytes(m, k, n):
    return 2 * m * k + 2 * m * n


# ----------------------------------------------------------------------------- baselines


def bf16_fn(x, w):
    return jnp.einsum("mk,nk->mn", x, w, preferred_element_type=jnp.float32).astype(BF16)


def int4_fn(x, w):
    q, s = w
    y = jnp.dot(x, q.astype(BF16), preferred_element_type=jnp.float32)
    return (y * s.astype(jnp.float32)).astype(BF16)


def unfused_fn(bits):
    def f(x, w):
        planes, scale = w
        wd = packing.dequantize(planes, scale, None, bits=bits, group=GROUP, dtype=BF16)
        return jnp.dot(x, wd, preferred_element_type=jnp.float32).astype(BF16)

    return f


def ours_fn(bits):
    def f(x, w):
        return quant_matmul(x, w[0], w[1], None, bits=bits, group=GROUP)

    return f


class Baselines:
    """Caches XLA bf16 / int4 per-channel timings per (K, N, M)."""

    def __init__(self, mk: Maker):
        self.mk, self.cache, self.busy_cache = mk, {}, {}

    def get(self, k, n, m):
        key = (k, n, m)
        if key not in self.cache:
            x = self.mk.x(m, k)
            wb = [self.mk.dense(n, k) for _ in range(copies(2 * k * n))]
            wi = [self.mk.int4(k, n) for _ in range(copies(k * n / 2))]
            tb = time_layers(bf16_fn, x, wb)
            self.busy_cache[key] = prof("busy")
            self.cache[key] = (tb, time_layers(int4_fn, x, wi))
            del wb, wi
        return self.cache[key]

    def busy(self, k, n, m):
        """Device busy µs per layer of the XLA bf16 loop (GEMM + carry add)."""
        return self.busy_cache.get((k, n, m))


# ----------------------------------------------------------------------------- checks


def run_checks() -> list[str]:
    """Each kernel vs its reference on this device; returns result lines."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    import pytest

    log("## correctness on device: pytest -m gpu tests/test_kernels_gpu.py")
    rc = pytest.main(
        [
            "-q",
            "-m",
            "gpu",
            "-p",
            "no:cacheprovider",
            *(["-k", FLAGS.check_filter] if FLAGS.check_filter else []),
            os.path.join(os.path.dirname(__file__), "..", "tests", "test_kernels_gpu.py"),
        ]
    )
    line = f"device correctness tests: {'PASS' if rc == 0 else f'FAIL (pytest exit {rc})'}"
    log(line)
    return [line]


# ----------------------------------------------------------------------------- tables


def fmt(v, spec=".1f"):
    return "–" if v is None else format(v, spec)


def speed(base, ours):
    return None if base is None or ours is None else base / ours


def quant_rows(mk, bl, bw, shapes, ms, bits_all, bits_m16):
    rows = []
    for k, n in shapes:
        for m in ms:
            bits_list = bits_all + ([b for b in bits_m16 if b not in bits_all] if m == 16 else [])
            tb, ti = bl.get(k, n, m)
            for bits in bits_list:
                x = mk.x(m, k)
                ws = [mk.packed(k, n, bits) for _ in range(copies(packed_bytes(k, n, bits)))]
                t = time_layers(ours_fn(bits), x, ws)
                kern = (prof("kernel"), prof("busy"), bl.busy(k, n, m))
                tu = time_layers(unfused_fn(bits), x, ws)
                roof = (packed_bytes(k, n, bits) + io_bytes(m, k, n)) / bw * 1e6
                timed = [(f"quant w{bits}", t, kern, roof)]
                if FLAGS.mosaic_rows and not FLAGS.smoke and qmg.reason(
                    k_pad=k, n=n, bits=bits, group=GROUP, dtype=BF16, m=m
                ) is None:
                    pws = [qmg.prepare(p, s, None, bits=bits, group=GROUP) for p, s in ws]
                    tm = time_layers(lambda x, w: qmg.quant_matmul(x, w), x, pws)
                    timed.append((f"quant w{bits} Mosaic GPU", tm,
                                  (_mosaic_kernel_us(), prof("busy"), bl.busy(k, n, m)),
                                  roof + mosaic_extra_bytes(k, n) / bw * 1e6))
                    del pws
                del ws
                for label, tt, kk, roof in timed:
                    add_row(
                        rows,
                        [f"{k}×{n}", m, label, tt, 100 * roof / tt, tb, tb / tt, ti, ti / tt,
                         tu, tu / tt, *kk],
                    )

    return rows


def _row(r):
    return (
        "| "
        + " | ".join(
            [
                str(r[0]),
                str(r[1]),
                r[2],
                fmt(r[3]),
                fmt(r[4], ".0f"),
                fmt(r[5]),
                fmt(r[6], ".2f"),
                fmt(r[7]),
                fmt(r[8], ".2f"),
                fmt(r[9]),
                fmt(r[10], ".2f"),
                *(fmt(v) for v in (list(r[11:14]) + [None] * 3)[:3]),
            ]
        )
        + " |"
    )


REPORT = {"header": [], "tables": {}, "rows": []}


def add_row(rows, r):
    """Records a table row, logs it and rewrites the report (partial results survive a timeout)."""
    rows.append(r)
    REPORT["rows"].append(r)
    log(_row(r))
    write_report()


def write_report():
    method = __doc__.split("Example:")[0].strip().split("\n\n", 1)[1]
    parts = ["\n".join(REPORT["header"]), method]
    parts += list(REPORT["tables"].values())
    if REPORT["rows"]:
        parts.append(
            "## Per-layer timings\n\n"
            + "\n".join([HEADER, SEP] + [_row(r) for r in REPORT["rows"]])
        )
    md = "\n\n".join(parts) + "\n"
    paths = [FLAGS.out]
    if os.environ.get("OUT"):
        paths.append(os.path.join(os.environ["OUT"], "kernels.md"))
    for path in paths:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path + ".tmp", "w") as f:
            f.write(md)
        os.replace(path + ".tmp", path)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_log.txt"), "w") as f:
            f.write("\n".join(LOG) + "\n")


def sign_rows(mk, bl, bw, shapes, ms):
    rows = []
    for k, n in shapes:
        for m in ms:
            tb, ti = bl.get(k, n, m)
            x = mk.x(m, k)
            ws = [(mk.words((k // 32, n)), jnp.float32(0.01)) for _ in range(copies(k * n / 8))]

            def ours(x, w):
                return sign_matmul(x, w[0], w[1])

            def unfused(x, w):
                sg = 2 * packing.unpack_plane(w[0], 1).astype(BF16) - 1
                return (jnp.dot(x, sg, preferred_element_type=jnp.float32) * w[1]).astype(BF16)

            t = time_layers(ours, x, ws)
            kern = (prof("kernel"), prof("busy"), bl.busy(k, n, m))
            tu = time_layers(unfused, x, ws)
            roof = (k * n / 8 + io_bytes(m, k, n)) / bw * 1e6
            add_row(
                rows,
                [f"{k}×{n}", m, "sign w1", t, 100 * roof / t, tb, tb / t, ti, ti / t, tu, tu / t]
                + list(kern),
            )

    return rows


COME_BANDS = [(8, 2), (3, 32), (2, 968)]  # Delta-CoMe α=1/16 for 4096²: (bits, rank)


def lowrank_bytes(k, n, bands=COME_BANDS):
    total = 0
    for bits, rank in bands:
        r = math.ceil(rank / 32) * 32
        total += packed_bytes(k, r, bits) + r * n * bits / 8 + math.ceil(r / GROUP) * n * 2
    return total


def lowrank_rows(mk, bl, bw, ms, dim=4096, bands=COME_BANDS):
    k = n = dim
    rows = []
    for m in ms:
        tb, ti = bl.get(k, n, m)
        x = mk.x(m, k)
        nl = copies(lowrank_bytes(k, n, bands) + 2 * k * n)
        ws = [(tuple(mk.band(k, n, b, r) for b, r in bands), mk.dense(n, k)) for _ in range(nl)]

        def delta(x, w):
            return lowrank_delta_matmul(x, w[0])

        def fused(x, w):
            return lrgpu.lowrank_delta_matmul(
                x, w[0], base=w[1], fuse_base=True, interpret=FLAGS.smoke
            )

        def xla_base(x, w):
            return lrgpu.lowrank_delta_matmul(
                x, w[0], base=w[1], fuse_base=False, interpret=FLAGS.smoke
            )

        def unfused_delta(x, w):
            return lowrank_delta_matmul(x, w[0], implementation="xla")

        def unfused_fused(x, w):
            return (
                bf16_fn(x, w[1]).astype(jnp.float32)
                + lowrank_delta_matmul(x, w[0], implementation="xla").astype(jnp.float32)
            ).astype(BF16)

        for name, f, fu, extra in [
            ("lowrank delta", delta, unfused_delta, 0),
            ("lowrank + base, fused in Pallas", fused, unfused_fused, 2 * k * n),
            ("lowrank + base, XLA base GEMM", xla_base, unfused_fused, 2 * k * n),
        ]:
            t = time_layers(f, x, ws)
            kern = (prof("kernel"), prof("busy"), bl.busy(k, n, m))
            tu = time_layers(fu, x, ws)
            roof = (lowrank_bytes(k, n, bands) + extra + io_bytes(m, k, n)) / bw * 1e6
            add_row(
                rows,
                [f"{k}×{n}", m, name, t, 100 * roof / t, tb, tb / t, ti, ti / t, tu, tu / t]
                + list(kern),
            )

        del ws
    return rows


def multitenant_rows(mk, bl, bw, ms, quick, dim=4096, bands=COME_BANDS):
    k = n = dim
    num_t = 16
    rows = []
    for m in ms:
        tb, ti = bl.get(k, n, m)
        x = mk.x(m, k)
        tids = jnp.arange(m, dtype=jnp.int32) % num_t
        distinct = min(m, num_t)
        kinds = [("MT quant w4", 4), ("MT quant w2", 2), ("MT sign w1", 1), ("MT lowrank", 0)]
        if quick:
            kinds = kinds[:1]
        for name, bits in kinds:
            if name.startswith("MT quant"):
                per = packed_bytes(k, n, bits)
                ws = [mk.packed(k, n, bits, (num_t,)) for _ in range(copies(per * num_t))]

                def f(x, w, bits=bits, tids=tids):
                    return quant_matmul_multitenant(
                        x, tids, w[0], w[1], None, bits=bits, group=GROUP
                    )

                def fu(x, w, bits=bits, tids=tids):
                    return quant_matmul_multitenant(
                        x, tids, w[0], w[1], None, bits=bits, group=GROUP, implementation="xla"
                    )
            elif name.startswith("MT sign"):
                per = k * n / 8
                ws = [
                    (mk.words((num_t, k // 32, n)), jnp.full((num_t,), 0.01, jnp.float32))
                    for _ in range(copies(per * num_t))
                ]

                def f(x, w, tids=tids):
                    return sign_matmul_multitenant(x, tids, w[0], w[1])

                def fu(x, w, tids=tids):
                    return sign_matmul_multitenant(x, tids, w[0], w[1], implementation="xla")
            else:
                per = lowrank_bytes(k, n, bands)
                ws = [
                    tuple(mk.band(k, n, b, r, (num_t,)) for b, r in bands)
                    for _ in range(copies(per * num_t))
                ]

                def f(x, w, tids=tids):
                    return lowrank_delta_matmul_multitenant(x, tids, w)

                def fu(x, w, tids=tids):
                    return lowrank_delta_matmul_multitenant(x, tids, w, implementation="xla")

            t = time_layers(f, x, ws)
            kern = (prof("kernel"), prof("busy"), bl.busy(k, n, m))
            try:
                tu = time_layers(fu, x, ws[:2])
            except Exception as e:  # the unfused form materializes T dense weights
                log(f"unfused baseline for {name} failed: {type(e).__name__}")
                tu = None
            del ws
            roof = (per * distinct + io_bytes(m, k, n)) / bw * 1e6
            add_row(
                rows,
                [
                    f"{k}×{n} T={num_t}",
                    m,
                    name,
                    t,
                    100 * roof / t,
                    tb,
                    tb / t,
                    ti,
                    ti / t,
                    tu,
                    speed(tu, t),
                    *kern,
                ],
            )

    return rows


def loop_overhead(mk) -> float:
    x = mk.x(16, 4096)
    ws = [jnp.float32(i) for i in range(8)]
    return time_layers(lambda x, w: (x[:, :1] * w).astype(BF16), x, ws)


# ----------------------------------------------------------------------------- sweep


def sweep(mk, bw):
    lines = [
        "| K×N | M | bits | block_n | split_k | warps | stages | µs/layer | % roofline |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    log("\n## Triton tile sweep (quant_matmul, per layer)")
    log(lines[0])
    cases = [
        ((4096, 14336), 16, 4),
        ((4096, 14336), 16, 2),
        ((4096, 4096), 16, 4),
        ((4096, 4096), 16, 1),
        ((4096, 14336), 64, 4),
        ((8192, 8192), 16, 4),
    ]
    deadline = time.time() + FLAGS.sweep_budget_s
    for (k, n), m, bits in cases:
        if time.time() > deadline:
            log("sweep budget spent; remaining cases skipped")
            break
        x = mk.x(m, k)
        ws = [mk.packed(k, n, bits) for _ in range(copies(packed_bytes(k, n, bits)))]
        roof = (packed_bytes(k, n, bits) + io_bytes(m, k, n)) / bw * 1e6
        best = None
        for bn in (64, 128, 256):
            for split in (1, 2, 4, 8, 16):
                for warps, stages in ((4, 3), (4, 4), (8, 4)):
                    cfg = qgpu.TritonConfig(
                        block_n=bn, split_k=split, num_warps=warps, num_stages=stages
                    )
                    tiles = (n // bn) * split
                    if tiles < 128 or tiles > 4096 or time.time() > deadline:
                        continue

                    def f(x, w, cfg=cfg, bits=bits):
                        return qgpu.quant_matmul(
                            x, w[0], w[1], None, bits=bits, group=GROUP, config=cfg
                        )

                    try:
                        t = time_layers(f, x, ws)
                    except Exception as e:
                        log(f"config {cfg} failed: {type(e).__name__}: {str(e)[:200]}")
                        continue
                    line = (
                        f"| {k}×{n} | {m} | {bits} | {bn} | {split} | {warps} | {stages} | "
                        f"{t:.1f} | {100 * roof / t:.0f} |"
                    )
                    lines.append(line)
                    if best is None or t < best[0]:
                        best = (t, line)
        del ws
        if best:
            log("best: " + best[1])
    return lines


def _qfn(cfg, bits):
    def f(x, w):
        return qgpu.quant_matmul(
            x, w[0], w[1], None, bits=bits, group=GROUP, config=cfg, interpret=FLAGS.smoke
        )

    return f


# ----------------------------------------------------------------------------- FMA tiles

FMA_CONFIGS = [  # (name, TritonConfig fields) for the FMA tiles
    ("FMA bn64 w4", dict(fma=True, block_n=64, num_warps=4)),
    ("FMA bn128 w4", dict(fma=True, block_n=128, num_warps=4)),
    ("FMA bn32 w2", dict(fma=True, block_n=32, num_warps=2)),
    ("FMA bn64 w8", dict(fma=True, block_n=64, num_warps=8)),
    ("FMA bn256 w8", dict(fma=True, block_n=256, num_warps=8)),
]


def fma_ab(mk, bw):
    """MMA tiles (the default) vs FMA tiles for small batches; adopts FMA_MAX_ROWS and the tile."""
    lines = [
        "| K×N | M | bits | tiles | µs/layer | Pallas kernel µs | % roofline (kernel) |",
        "|---|---|---|---|---|---|---|",
    ]
    log("\n## FMA tiles vs MMA tiles (quant_matmul)")
    log(lines[0])
    cases = [((4096, 14336), m, b) for m in (1, 16) for b in (4, 1)]
    cases += [((4096, 14336), 2, 4), ((4096, 14336), 4, 4), ((4096, 14336), 64, 4)]
    cases += [((4096, 14336), 1, 2), ((4096, 14336), 16, 8)]
    cases += [((4096, 4096), 1, 4), ((4096, 4096), 16, 4), ((8192, 8192), 16, 4)]
    if FLAGS.smoke:
        cases = [((256, 128), 1, 4), ((256, 128), 4, 1)]
    deadline = time.time() + FLAGS.fma_budget_s
    res = {}  # (k, n, m, bits) -> {name: kernel-or-wall µs}
    for (k, n), m, bits in cases:
        if time.time() > deadline:
            log("FMA budget spent; remaining cases skipped")
            break
        x = mk.x(m, k)
        ws = [mk.packed(k, n, bits) for _ in range(copies(packed_bytes(k, n, bits)))]
        roof = (packed_bytes(k, n, bits) + io_bytes(m, k, n)) / bw * 1e6
        mma = [("MMA (default)", dict(fma=False)), ("MMA split", dict(fma=False, unpack="split"))]
        for name, kw in mma + FMA_CONFIGS:
            try:
                t = time_layers(_qfn(qgpu.TritonConfig(**kw), bits), x, ws)
            except Exception as e:
                log(f"{name} failed: {type(e).__name__}: {str(e)[:300]}")
                continue
            kt = prof("kernel")
            res.setdefault((k, n, m, bits), {})[name] = kt or t
            line = (
                f"| {k}×{n} | {m} | {bits} | {name} | {t:.1f} | {fmt(kt)} | "
                f"{fmt(None if not kt else 100 * roof / kt, '.0f')} |"
            )
            lines.append(line)
            log(line)
        del ws
    # Adopt: the FMA tile with the lowest geometric-mean time over the cases it won or lost,
    # and FMA_MAX_ROWS = the largest M at which it beats the MMA tiles in every case of that M.
    names = [nm for nm, _ in FMA_CONFIGS]
    full = [nm for nm in names if all(nm in r for r in res.values())] or names
    best = min(full, key=lambda nm: sum(math.log(r.get(nm, 1e9)) for r in res.values()))
    rows_ok = 0
    for m in sorted({key[2] for key in res}):
        at = [r for key, r in res.items() if key[2] == m and "MMA (default)" in r]
        if at and all(r.get(best, 1e9) < r["MMA (default)"] for r in at) and rows_ok == m // 2:
            rows_ok = m
        elif at:
            break
    kw = dict(FMA_CONFIGS)[best]
    tr.FMA_MAX_ROWS = rows_ok
    tr.FMA_BLOCK_N = kw["block_n"]
    tr.FMA_NUM_WARPS = kw["num_warps"]
    jax.clear_caches()
    lines.append(
        f"\nadopted: FMA tile **{best}**, FMA tiles for batches of <= {rows_ok} rows "
        f"(`_triton.FMA_MAX_ROWS={rows_ok}`, `FMA_BLOCK_N={tr.FMA_BLOCK_N}`, "
        f"`FMA_NUM_WARPS={tr.FMA_NUM_WARPS}`; chosen by Pallas kernel time)"
    )
    log(lines[-1])
    # Multi-tenant: one row per tenant (BitDelta-style serving) as per-row FMA work items.
    lines += ["", "| op | T | M | tiles | µs/layer | Pallas kernel µs |",
              "|---|---|---|---|---|---|"]
    num_t, k, n = (16, 4096, 4096) if not FLAGS.smoke else (4, 256, 128)
    x = mk.x(16, k)
    tids = jnp.arange(16, dtype=jnp.int32) % num_t
    sws = [
        (mk.words((num_t, k // 32, n)), jnp.full((num_t,), 0.01, jnp.float32))
        for _ in range(copies(k * n / 8 * num_t))
    ]
    qws = [mk.packed(k, n, 4, (num_t,)) for _ in range(copies(packed_bytes(k, n, 4) * num_t))]
    for name, cfg in [
        ("MMA (default)", None),
        ("FMA per-row bn64", qgpu.TritonConfig(fma=True, block_m=1, block_n=64)),
        ("FMA per-row bn128 w8", qgpu.TritonConfig(fma=True, block_m=1, block_n=128, num_warps=8)),
    ]:
        for op, ws, f in [
            ("sign w1", sws, lambda x, w, cfg=cfg: sgpu.sign_matmul_multitenant(
                x, tids, w[0], w[1], config=cfg, interpret=FLAGS.smoke)),
            ("quant w4", qws, lambda x, w, cfg=cfg: qgpu.quant_matmul_multitenant(
                x, tids, w[0], w[1], None, bits=4, group=GROUP, config=cfg,
                interpret=FLAGS.smoke)),
        ]:
            if time.time() > deadline + 60:
                break
            try:
                t = time_layers(f, x, ws)
            except Exception as e:
                log(f"MT {op} {name} failed: {type(e).__name__}: {str(e)[:300]}")
                continue
            lines.append(f"| {op} | {num_t} | 16 | {name} | {t:.1f} | {fmt(prof('kernel'))} |")
            log(lines[-1])
    del sws, qws
    return "\n".join(lines)


MOSAIC_CONFIGS = [  # (name, MosaicConfig fields); split None = the heuristic
    ("bn64 split8", dict(block_n=64, split_k=8)),
    ("bn64 split8 pad_x", dict(block_n=64, split_k=8, pad_x=True)),
    ("bn128 auto", dict(block_n=128)),
    ("bn64 bk256 auto", dict(block_n=64, block_k=256)),
    ("bn128 bk256 auto", dict(block_n=128, block_k=256)),
]


def _mosaic_kernel_us(name_hint="mosaic"):
    """Profiler µs per call of the Mosaic GPU kernel(s) of the last timed loop (None if unseen)."""
    per = LAST_PROFILE.get("per_kernel") or {}
    hits = [v for k, v in per.items() if name_hint in k.lower()]
    return sum(hits) if hits else None


def mosaic_extra_bytes(k, n):
    """Bytes the prepared layout moves beyond `packed_bytes`: beta, one bf16 per group and column
    (alpha takes the place of the stored scale)."""
    return (k // GROUP) * n * 2


def mosaic_ab(mk, bw):
    """Mosaic GPU quant_matmul: checks on the device, then µs vs the Triton kernel."""
    lines = [
        "| K×N | M | bits | kernel | µs/layer | kernel µs | % roofline (kernel) | rel. err |",
        "|---|---|---|---|---|---|---|---|",
    ]
    log("\n## Mosaic GPU quant_matmul vs Triton")
    log(lines[0])
    cases = [((4096, 14336), m, 4) for m in (1, 16)] + [((4096, 14336), 16, 8)]
    cases += [((4096, 4096), 1, 4), ((8192, 8192), 16, 4), ((14336, 4096), 16, 4)]
    cases += [((4096, 14336), 64, 4)]
    if FLAGS.smoke:
        cases = [((256, 128), 1, 4)]
    deadline = time.time() + FLAGS.mosaic_budget_s
    res = {}
    for (k, n), m, bits in cases:
        if time.time() > deadline:
            log("Mosaic budget spent; remaining cases skipped")
            break
        x = mk.x(m, k)
        ws = [mk.packed(k, n, bits) for _ in range(copies(packed_bytes(k, n, bits)))]
        prepared = [qmg.prepare(p, s, None, bits=bits, group=GROUP) for p, s in ws]
        roof_m = (packed_bytes(k, n, bits) + mosaic_extra_bytes(k, n) + io_bytes(m, k, n)) / bw
        roof_m *= 1e6
        ref = qref.quant_matmul(
            x.astype(jnp.float32), ws[0][0], ws[0][1].astype(jnp.float32), None,
            bits=bits, group=GROUP,
        )
        roof = (packed_bytes(k, n, bits) + io_bytes(m, k, n)) / bw * 1e6
        t = time_layers(_qfn(None, bits), x, ws)
        kt = prof("kernel")
        res.setdefault((k, n, m, bits), {})["triton"] = kt or t
        lines.append(f"| {k}×{n} | {m} | {bits} | Triton (default) | {t:.1f} | {fmt(kt)} | "
                     f"{fmt(None if not kt else 100 * roof / kt, '.0f')} | |")
        log(lines[-1])
        for name, kw in MOSAIC_CONFIGS:
            cfg = qmg.MosaicConfig(**kw)
            fn = lambda x, w, cfg=cfg: qmg.quant_matmul(x, w, config=cfg)  # noqa: E731
            try:
                y = jax.jit(fn)(x, prepared[0]).astype(jnp.float32)
                err = float(jnp.max(jnp.abs(y - ref)) / jnp.max(jnp.abs(ref)))
                t = time_layers(fn, x, prepared)
            except Exception as e:
                log(f"mosaic {name} failed: {type(e).__name__}: {str(e)[:600]}")
                continue
            kt = _mosaic_kernel_us()
            if not err < 2e-2:
                log(f"mosaic {name}: WRONG (rel. err {err:.2e})")
            else:
                res[(k, n, m, bits)][name] = kt or t
            per = LAST_PROFILE.get("per_kernel") or {}
            log(f"  kernels: {sorted(((round(v, 1), nm[:60]) for nm, v in per.items()))[-4:]}")
            lines.append(f"| {k}×{n} | {m} | {bits} | Mosaic {name} | {t:.1f} | {fmt(kt)} | "
                         f"{fmt(None if not kt else 100 * roof_m / kt, '.0f')} | {err:.1e} |")
            log(lines[-1])
        r = res[(k, n, m, bits)]
        log(f"  fastest here: {min(r, key=r.get)} ({min(r.values()):.1f} µs)")
        del ws, prepared
    names = [nm for nm, _ in MOSAIC_CONFIGS]
    full = [nm for nm in names if all(nm in r for r in res.values())]
    if full:
        best = min(full, key=lambda nm: sum(math.log(r[nm]) for r in res.values()))
        wins = [f"{k}×{n} M={m} w{b}" for (k, n, m, b), r in res.items() if r[best] < r["triton"]]
        lines.append(f"\nbest Mosaic config: **{best}**; faster than Triton at: "
                     f"{', '.join(wins) or 'none'}")
    else:
        lines.append("\nno Mosaic config ran correctly on every case")
    log(lines[-1])
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


HEADER = (
    "| shape K×N | M | kernel | µs/layer | % roofline | XLA bf16 µs | × bf16 | "
    "XLA int4-pc µs | × int4-pc | XLA unfused µs | × unfused | Pallas kernel µs | "
    "device busy µs | XLA bf16 busy µs |"
)
SEP = "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"


def main(argv):
    del argv
    dev = jax.devices()[0]
    if dev.platform != "gpu" and not FLAGS.smoke:
        raise SystemExit(f"bench_kernels.py needs a GPU (found {dev.platform}); it times kernels")
    header = [
        "# deltajax kernel benchmark",
        "",
        f"- date: {C.utc_now()}",
        f"- device: {dev.device_kind} ({jax.device_count()} visible)",
        f"- jax {jax.__version__}, jaxlib {importlib.metadata.version('jaxlib')}",
        f"- command: `{C.command_line()}`",
    ]
    for line in header:
        log(line)
    REPORT["header"] = header
    write_report()
    mk = Maker()
    bws = C.copy_bandwidths()  # the same floor every speed table uses (the faster copy)
    bw = bws.pop("floor")
    header.append("- measured copy bandwidth (read+write; the floor is the faster): " + ", ".join(
        f"{k} {C.fmt_bandwidth(v)}" for k, v in bws.items()) + f"; floor {C.fmt_bandwidth(bw)}")
    overhead = loop_overhead(mk)
    header.append(
        f"- timing-loop overhead per layer (one tiny fused add + launch, included in "
        f"every µs/layer below): {overhead:.1f} µs"
    )
    log(header[-2])
    log(header[-1])
    write_report()
    if FLAGS.mosaic:
        try:
            REPORT["tables"]["mosaic"] = "## Mosaic GPU quant_matmul\n\n" + mosaic_ab(mk, bw)
        except Exception:
            log(traceback.format_exc())
        write_report()
    if FLAGS.fma:
        try:
            REPORT["tables"]["fma"] = "## FMA tiles for small batches\n\n" + fma_ab(mk, bw)
        except Exception:
            log(traceback.format_exc())
        write_report()
    if FLAGS.check and not FLAGS.smoke:
        header += [f"- {line}" for line in run_checks()]
    if FLAGS.sweep:
        try:
            REPORT["tables"]["sweep"] = "## Triton tile sweep (quant_matmul)\n\n" + "\n".join(
                sweep(mk, bw)
            )
        except Exception:
            log(traceback.format_exc())
    write_report()
    if FLAGS.bench:
        bl = Baselines(mk)
        if FLAGS.smoke:
            shapes, ms, bits_all, bits_m16 = [(256, 128)], [1, 16], [4], [3]
        elif FLAGS.quick:
            shapes, ms, bits_all, bits_m16 = [(4096, 4096), (4096, 14336)], [1, 16], [4, 2], []
        else:
            shapes = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192)]
            ms, bits_all, bits_m16 = [1, 16, 32, 64], [4, 2], [8, 3, 1]
        if FLAGS.shapes:
            shapes = [tuple(int(v) for v in sh.lower().split("x")) for sh in FLAGS.shapes]
        if FLAGS.tokens:
            ms = [int(v) for v in FLAGS.tokens]
        if FLAGS.bits:
            bits_all = [int(v) for v in FLAGS.bits]
        if FLAGS.bits_m16:
            bits_m16 = [int(v) for v in FLAGS.bits_m16]
        small = FLAGS.quick or FLAGS.smoke
        dim, bands = (256, [(8, 2), (3, 32), (2, 60)]) if FLAGS.smoke else (4096, COME_BANDS)
        log("\n## Per-layer timings\n")
        log(HEADER)
        log(SEP)
        sections = [
            ("quant", lambda: quant_rows(mk, bl, bw, shapes, ms, bits_all, bits_m16)),
            ("sign", lambda: sign_rows(mk, bl, bw, shapes[:2], [16] if small else [1, 16])),
            (
                "lowrank",
                lambda: lowrank_rows(mk, bl, bw, [16] if small else [1, 16, 64], dim, bands),
            ),
            (
                "multitenant",
                lambda: multitenant_rows(
                    mk, bl, bw, [16] if small else [16, 64], small, dim, bands
                ),
            ),
        ]
        for name, fn in sections:
            if name not in FLAGS.sections:
                continue
            try:
                fn()
            except Exception:
                log(f"{name} rows failed:\n{traceback.format_exc()}")
    write_report()
    if PROFILE_INFO["lines"]:
        log(f"profiler GPU lines seen: {sorted(PROFILE_INFO['lines'])[:12]}")
        log(f"kernel names seen (first 40): {sorted(PROFILE_INFO['kernels'])[:40]}")
    print("\n" + "\n\n".join(REPORT["tables"].values()))
    if REPORT["rows"]:
        print("\n".join([HEADER, SEP] + [_row(r) for r in REPORT["rows"]]))


if __name__ == "__main__":
    app.run(main)
