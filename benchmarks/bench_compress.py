r"""Time Delta-CoMe compression of a Llama-2-7B-shaped delta (32 layers × 7 matrices).

  python benchmarks/bench_compress.py --out=benchmarks/compress.md

Synthetic but realistic inputs, generated on the device per matrix (generation not timed):
a delta with a long-tailed spectrum (σ_i ∝ exp(−i/τ) + a small flat tail, random singular
vectors) and a Hessian H = 2/n·XᵀX of correlated inputs (a low-rank-plus-identity covariance).
Each matrix is compressed by the jitted `DeltaCoMe.compress` with its Hessian (SVD, GPTQ on all
bands' V rows in one pass, GPTQ on each band's U, packing); the clock covers compress only,
synchronised with block_until_ready. Prints and writes a table with date, device and command.
The copy floor (`_common.copy_bandwidth`, measured in the same run) of a matrix is the time to
read Δ and H (fp32) and write the packed container once; the table gives it as % of the measured
time (compression is compute-bound: SVD and GPTQ, so this is small).
With --max_seconds, layers stop being started once the budget is spent and the whole-model time
is extrapolated from the measured per-matrix medians (labelled as such).
"""

from __future__ import annotations

import statistics
import time

import _common as C
import jax
import jax.numpy as jnp
from absl import flags

from deltajax import cli
from deltajax.containers import LinearStats
from deltajax.methods import DeltaCoMe

FLAGS = flags.FLAGS
flags.DEFINE_integer("layers", 32, "Decoder layers (Llama-2-7B: 32).")
flags.DEFINE_integer("hidden", 4096, "Hidden size.")
flags.DEFINE_integer("ffn", 11008, "MLP intermediate size.")
flags.DEFINE_float("ratio", 1 / 16, "Delta-CoMe α.")
flags.DEFINE_list("svd", ["full", "gram"], "SVD variants to time (first one runs the model).")
flags.DEFINE_float("max_seconds", 420.0, "Stop starting new layers after this many seconds.")
flags.DEFINE_string("out", "benchmarks/compress.md", "Markdown output ('' to skip).")


def _shapes(h, f):
    return [("q_proj", h, h), ("k_proj", h, h), ("v_proj", h, h), ("o_proj", h, h),
            ("gate_proj", f, h), ("up_proj", f, h), ("down_proj", h, f)]


def _synthetic(key, n, k):
    """Δ (n, k) with σ_i = exp(−i/64) + 0.02 and its input Hessian H (k, k), on the device."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    r = min(n, k)
    a = jax.random.normal(k1, (n, r), jnp.float32) / jnp.sqrt(n)
    b = jax.random.normal(k2, (r, k), jnp.float32) / jnp.sqrt(k)
    s = jnp.exp(-jnp.arange(r) / 64.0) + 0.02
    d = (a * s) @ b * 1e-2
    z = jax.random.normal(k3, (k, 256), jnp.float32)
    x = jax.random.normal(k4, (2048, 256), jnp.float32) @ z.T + jax.random.normal(
        k4, (2048, k), jnp.float32)
    h = 2.0 / x.shape[0] * (x.T @ x)
    return d, LinearStats(hessian=h, mean=jnp.zeros((k,)), sq=jnp.diag(h) / 2,
                          count=jnp.float32(x.shape[0]))


def _floor_bytes(m, n, k) -> int:
    """Bytes one compression must move at least: Δ and H read in fp32, the container written."""
    out = jax.eval_shape(lambda d, h: m.compress(d, stats=LinearStats(
        hessian=h, mean=jnp.zeros((k,)), sq=jnp.zeros((k,)), count=jnp.float32(1))),
        jax.ShapeDtypeStruct((n, k), jnp.float32), jax.ShapeDtypeStruct((k, k), jnp.float32))
    return 4 * (n * k + k * k) + sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(out))


def main(argv):
    cli.no_extra_args(argv)
    bw = C.copy_bandwidth()
    print(f"copy bandwidth {C.fmt_bandwidth(bw)}", flush=True)
    shapes = _shapes(FLAGS.hidden, FLAGS.ffn)
    gen = jax.jit(_synthetic, static_argnums=(1, 2))
    results = {}
    for variant in FLAGS.svd:
        m = DeltaCoMe(ratio=FLAGS.ratio, svd=variant)
        fn = jax.jit(lambda d, st, m=m: m.compress(d, stats=st))
        per = {name: [] for name, _, _ in shapes}
        compile_s = {}
        for name, n, k in shapes:  # compile (and warm) once per shape
            d, st = gen(jax.random.PRNGKey(0), n, k)
            compile_s[name] = C.timed(fn, d, st)[1]
        layers_run = FLAGS.layers if variant == FLAGS.svd[0] else 1
        t_start = time.perf_counter()
        for layer in range(layers_run):
            if time.perf_counter() - t_start > FLAGS.max_seconds:
                break
            for j, (name, n, k) in enumerate(shapes):
                d, st = C.block(gen(jax.random.PRNGKey(1000 * layer + j), n, k))
                per[name].append(C.timed(fn, d, st)[1])
            print(f"[{variant}] layer {layer}: {sum(v[-1] for v in per.values()):.2f} s",
                  flush=True)
        med = {k: statistics.median(v) for k, v in per.items()}
        done = len(per[shapes[0][0]])
        measured = sum(sum(v) for v in per.values())
        results[variant] = dict(med=med, compile=compile_s, layers=done, measured=measured,
                                model=FLAGS.layers * sum(med.values()),
                                alloc={name: m.allocation(n, k) for name, n, k in shapes},
                                floor={name: _floor_bytes(m, n, k) for name, n, k in shapes})
    lines = C.header("Delta-CoMe compression time, Llama-2-7B-shaped delta", [
        f"- copy bandwidth (device-to-device copy, read + write, this run): "
        f"{C.fmt_bandwidth(bw)}; % of copy floor = (bytes of Δ + H read in fp32 and of the "
        "container written) / bandwidth / measured time",
        f"- {FLAGS.layers} layers × 7 matrices (hidden {FLAGS.hidden}, MLP {FLAGS.ffn}), "
        f"α = 1/{round(1 / FLAGS.ratio)}, true-byte budget; synthetic long-tailed deltas and "
        "correlated-input Hessians generated on the device (not timed); GPTQ asym g128, "
        "act-order (static groups); target: whole model ≤ 5 min",
        "",
    ])
    lines += C.table(
        ["SVD", "matrix", "shape", "bands (bits, rank)", "compile s", "median s / matrix",
         "% of copy floor"],
        [(variant, name, f"{n}×{k}", r["alloc"][name], f"{r['compile'][name]:.1f}",
          f"{r['med'][name]:.3f}", f"{C.pct_of_floor(r['floor'][name], r['med'][name], bw):.3g}")
         for variant, r in results.items() for name, n, k in shapes],
        align="llllrrr")
    lines += [""] + C.table(
        ["SVD", "layers timed", "measured s", f"whole model ({FLAGS.layers} × 7 medians) s",
         "target ≤ 300 s"],
        [(variant, r["layers"], f"{r['measured']:.1f}", f"{r['model']:.1f}",
          "met" if r["model"] <= 300 else "missed") for variant, r in results.items()],
        align="lrrrl")
    text = "\n".join(lines) + "\n"
    print(text)
    C.write_markdown(FLAGS.out, text)


if __name__ == "__main__":
    cli.run(main)
