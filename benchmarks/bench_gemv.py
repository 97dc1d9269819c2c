r"""Dense decode projections: XLA's GEMM vs `pallas_kernels.dense_matmul`, against the copy floor.

  python benchmarks/bench_gemv.py --out=benchmarks/gemv.md \
      --tuning_out=pallas_kernels/dense_matmul/tuning.json              # on a GPU
  python benchmarks/bench_gemv.py --shape=tiny --rows=1,4 --configs=2   # CPU smoke (interpret)

For each (rows M, N, K) of a model's projections (7B: q/k/v/o 4096×4096, gate/up 11008×4096,
down 4096×11008, lm_head 32000×4096), times `y = x @ Wᵀ` in bf16 three ways:
XLA's dot (`einsum`, what `ops.dense_matmul` runs by default), XLA's multiply-and-reduce form
(`sum(x * W)`, one row only) and the Pallas-Triton kernel over a sweep of tile configurations
(block_n, block_k, split-K, warps, stages, FMA or MMA tiles; `--configs` of them, the heuristic
first). Each timing cycles through enough distinct weights (> 2× the 50 MB L2) that every call
reads HBM. Floor = (weight + x + y bytes) / the copy bandwidth measured in the same run (the
faster of XLA's and torch's copy).

`--tuning_out` writes the best kernel configuration per shape and whether it beat XLA by more
than `--margin`; `ops.DENSE_MATMUL="auto"` (the default) takes the kernel for exactly those
shapes (`pallas_kernels/dense_matmul/pallas_gpu.py` reads the file).
"""

from __future__ import annotations

import itertools
import json
import random
import sys

import _common as C
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from pallas_kernels.dense_matmul import TritonConfig, dense_matmul

FLAGS = flags.FLAGS
flags.DEFINE_enum("shape", "7b", ["7b", "tiny"], "Projection shapes of this model.")
flags.DEFINE_list("rows", ["1", "16", "64"], "Rows (decode batch sizes) to time.")
flags.DEFINE_integer("configs", 24, "Kernel configurations tried per shape (heuristic first, then "
                     "a seeded sample of the grid).")
flags.DEFINE_integer("reps", 20, "Timed calls per measurement (median).")
flags.DEFINE_float("margin", 0.03, "The kernel is marked faster when it beats XLA by this "
                   "fraction.")
flags.DEFINE_string("out", None, "Markdown table to write.")
flags.DEFINE_string("tuning_out", None, "Tuning JSON to write (pallas_kernels/dense_matmul/).")

SHAPES = {
    "7b": {"q/k/v/o_proj": (4096, 4096), "gate/up_proj": (11008, 4096),
           "down_proj": (4096, 11008), "lm_head": (32000, 4096)},
    "tiny": {"proj": (128, 64), "down": (64, 128)},
}


def grid(m: int) -> list[TritonConfig]:
    """The sweep's search space for M rows."""
    out = []
    fmas = (True, False) if m <= 4 else (False,)
    for fma, bn, bk, split, warps, stages in itertools.product(
            fmas, (32, 64, 128), (32, 64, 128, 256), (1, 2, 4, 8), (4, 8), (2, 3, 4)):
        if fma and bn * bk * max(m, 1) > 128 * 128:
            continue
        if not fma and bn * bk > 128 * 256:
            continue
        out.append(TritonConfig(fma=fma, block_n=bn, block_k=bk, split_k=split,
                                num_warps=warps, num_stages=stages))
    return out


def config_dict(c: TritonConfig | None) -> dict:
    return {} if c is None else {k: v for k, v in c.__dict__.items() if v is not None}


def time_us(fn, x, ws, reps) -> float:
    """Median µs of one product, cycling through the distinct weights `ws` in one call."""
    f = jax.jit(lambda x, ws: [fn(x, w) for w in ws])
    return 1e6 * C.median_time(f, x, ws, reps=reps, warmup=1) / len(ws)


def main(argv):
    del argv
    gpu = jax.default_backend() == "gpu"
    interpret = not gpu
    bw = C.copy_bandwidths()
    floor_bw = bw["floor"]
    print(f"[bench_gemv] {C.device_description()}; copy " + ", ".join(
        f"{k} {v / 1e9:.0f} GB/s" for k, v in bw.items()), flush=True)
    rng = random.Random(0)
    key = jax.random.PRNGKey(0)
    rows, tuning = [], {}
    for m in (int(r) for r in FLAGS.rows):
        for name, (n, k) in SHAPES[FLAGS.shape].items():
            wbytes = n * k * 2
            copies = max(2, int(np.ceil(120e6 / wbytes))) if gpu else 2
            ks = jax.random.split(jax.random.fold_in(key, n * 7 + k), copies + 1)
            ws = [(jax.random.normal(kk, (n, k), jnp.float32) * 0.02).astype(jnp.bfloat16)
                  for kk in ks[1:]]
            x = jax.random.normal(ks[0], (m, k), jnp.float32).astype(jnp.bfloat16)
            byts = wbytes + 2 * m * (k + n)
            floor_us = 1e6 * byts / floor_bw
            ref = dense_matmul(x, ws[0], implementation="xla").astype(jnp.float32)
            xla_us = time_us(lambda x, w: dense_matmul(x, w, implementation="xla"), x, ws,
                             FLAGS.reps)
            red_us = None
            if m == 1:
                red_us = time_us(lambda x, w: jnp.sum(
                    x.astype(jnp.float32) * w.astype(jnp.float32), axis=-1,
                    keepdims=True).T.astype(x.dtype), x, ws, FLAGS.reps)
            cands = [None] + rng.sample(grid(m), min(len(grid(m)), max(FLAGS.configs - 1, 0)))
            best = (float("inf"), None)
            for cfg in cands:
                try:
                    y = dense_matmul(x, ws[0], implementation="pallas_gpu", config=cfg,
                                     interpret=interpret)
                    err = float(jnp.max(jnp.abs(y.astype(jnp.float32) - ref)))
                    scale = float(jnp.max(jnp.abs(ref))) + 1e-6
                    if err > 2e-2 * scale:
                        print(f"[bench_gemv] {name} M={m} {config_dict(cfg)}: wrong result "
                              f"(max |err| {err:.3g} of {scale:.3g})", file=sys.stderr)
                        continue
                    us = time_us(lambda x, w, cfg=cfg: dense_matmul(
                        x, w, implementation="pallas_gpu", config=cfg, interpret=interpret),
                        x, ws, FLAGS.reps)
                except Exception as e:  # noqa: BLE001 - a config the compiler refuses
                    print(f"[bench_gemv] {name} M={m} {config_dict(cfg)}: "
                          f"{type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
                    continue
                if us < best[0]:
                    best = (us, cfg)
            us, cfg = best
            faster = us < (1 - FLAGS.margin) * xla_us
            row = {"name": name, "m": m, "n": n, "k": k, "floor_us": floor_us, "xla_us": xla_us,
                   "reduce_us": red_us, "pallas_us": us, "config": config_dict(cfg),
                   "faster": faster}
            rows.append(row)
            print("[bench_gemv] " + json.dumps(row), flush=True)
            if cfg is not None or us < float("inf"):
                tuning[f"{m},{n},{k}"] = {"config": config_dict(cfg) or {}, "faster": faster,
                                          "pallas_us": round(us, 2), "xla_us": round(xla_us, 2)}

    def pct(us):
        if us is None or us == float("inf"):
            return "–"
        return f"{us:.1f} ({100 * r['floor_us'] / us:.0f} %)"

    lines = C.header("Dense decode projections: XLA vs the Pallas kernel", [
        "- copy bandwidth in this run: " + ", ".join(
            f"{k} {C.fmt_bandwidth(v)}" for k, v in bw.items() if k != "floor")
        + f"; floor = bytes / {C.fmt_bandwidth(floor_bw)}",
        f"- kernel: best of {FLAGS.configs} configurations per shape (heuristic first); "
        "µs per product with (% of the copy floor)", ""])
    table_rows = []
    for r in rows:
        table_rows.append([r["name"], r["m"], f"{r['n']}×{r['k']}", f"{r['floor_us']:.1f}",
                           pct(r["xla_us"]), pct(r["reduce_us"]), pct(r["pallas_us"]),
                           json.dumps(r["config"]) if r["config"] else "heuristic",
                           "yes" if r["faster"] else "no"])
    lines += C.table(["projection", "rows", "N×K", "floor µs", "XLA dot µs", "XLA reduce µs",
                      "Pallas µs", "best config", "kernel taken"], table_rows)
    text = "\n".join(lines) + "\n"
    print(text)
    if FLAGS.out:
        C.write_markdown(FLAGS.out, lines)
    if FLAGS.tuning_out:
        with open(FLAGS.tuning_out, "w") as fh:
            json.dump({"device": C.device_description(), "date": C.utc_now(),
                       "command": C.command_line(), "configs": tuning}, fh, indent=1)


if __name__ == "__main__":
    app.run(main)
