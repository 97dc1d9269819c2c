r"""Decode-step speed as a fraction of the memory floor, next to a plain PyTorch CUDA-graph step.

  python benchmarks/bench_decode.py --shape=7b --out=benchmarks/decode.md       # on a GPU
  python benchmarks/bench_decode.py --shape=tiny --rows=base:1:16               # CPU smoke

The step timed is the one `deltajax.serve.generate` decodes with (`generate._decode_loop`: a
`lax.while_loop` of `generate._step`, i.e. `model.forward` over the KV cache + sampling), run
for --steps steps in one call; ms/step = wall time / steps (host work included: one call per
--steps tokens, as generate does). `--step=engine` times the serving engine's step instead
(`serve.engine._decode`: every slot active, one jitted call and one host read of the tokens per
--decode_steps tokens, attention over the slot's `--max_len` cache under a mask, tenants bound
from a delta pool), i.e. what `Engine` / `deltajax-serve` run.

Floor = bytes one step must read / the device-to-device copy bandwidth measured in the same run
(the faster of a jax copy and a torch copy, counting bytes read + written). Bytes per step: every
bf16 weight the step multiplies by (embedding row gathers are negligible; the lm_head / tied
table counts whole), the active tenants' exact container bytes, and the valid KV cache (mean over
the timed steps). % of floor = floor time / measured time.

Peer: a plain PyTorch decode step (HF-style Llama layer: separate q/k/v/o/gate/up/down matmuls,
RoPE, a static KV cache with SDPA, greedy argmax), captured in one CUDA graph and replayed — what
a user would write instead (about 70 lines, `torch_step` below). Same shapes, same batch and KV.

Rows (--rows, comma separated): `base:B:KV` (the base alone), `T:METHOD:B:KV` (T tenants of
METHOD in a batch of B, row i -> tenant i % T; METHOD one of bitdelta, deltacome (α = 1/16),
rtn4, lowrank, deltadq (1/64)). Deltas hold random codes of exactly the structure `compress`
produces (`jax.eval_shape`): decode speed does not depend on the values.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import sys
import time
import zlib

import _common as C
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from deltajax import model as M
from deltajax import ops
from deltajax.methods import make_method
from deltajax.serve import generate as G
from deltajax.serve.multitenant import MultiTenantWeight
from deltajax.tree import is_projection, map_with_names

FLAGS = flags.FLAGS
flags.DEFINE_enum("shape", "7b", ["7b", "1b", "tiny"], "Model shape (random bf16 weights).")
flags.DEFINE_list("rows", ["base:1:128", "base:16:128", "base:64:128", "base:16:2048"],
                  "Rows: base:B:KV or T:METHOD:B:KV (see the module docstring).")
flags.DEFINE_integer("steps", 32, "Decode steps per timed call.")
flags.DEFINE_integer("repeats", 3, "Timed calls per row (median).")
flags.DEFINE_bool("torch_peer", True, "Also time the plain PyTorch CUDA-graph step (GPU only).")
flags.DEFINE_string("profile_dir", None, "Write a jax.profiler trace of the first row here and "
                    "print the top device ops.")
flags.DEFINE_enum("attention", "auto", ["auto", "xla", "cudnn", "pallas"],
                  "Decode attention (ops.DECODE_ATTENTION).")
flags.DEFINE_enum("dense", "auto", ["auto", "xla", "pallas"],
                  "Dense projections (ops.DENSE_MATMUL): XLA's GEMMs, pallas_kernels.dense_matmul, "
                  "or the kernel where its tuning table measured it faster.")
flags.DEFINE_string("out", None, "Markdown table to write (default: print only).")
flags.DEFINE_string("json_out", None, "Also write the rows as JSON here.")
flags.DEFINE_enum("step", "generate", ["generate", "engine"],
                  "Which decode step to time: `generate` (serve.generate's on-device while_loop, "
                  "--steps tokens per call) or `engine` (the serving engine's `_decode`: one call "
                  "and one host read of the tokens per step over --max_len cache slots, tenants "
                  "from a delta pool, as `Engine` runs it).")
flags.DEFINE_integer("max_len", 2048, "--step=engine: cache positions per slot (the engine's "
                     "--max_len; grown to fit KV + the timed steps).")
flags.DEFINE_integer("decode_steps", 4, "--step=engine: decode steps per engine call (the "
                     "engine's decode_steps; one host read of the tokens per call).")
flags.DEFINE_bool("lookahead", True, "--step=engine: read each call's tokens after dispatching "
                  "the next call, as `Engine(lookahead=True)` (the default) does.")
flags.DEFINE_bool("host_ab", False, "--step=engine: also time the same calls reading each "
                  "call's tokens at once (sync), one call late (lookahead) and only at the end "
                  "(async: device time).")
flags.DEFINE_bool("isolate", True, "Time each row in a fresh process of this script (on the H200 a "
                  "row compiled after another in the same process was measured up to 2x slower; "
                  "see benchmarks/decode.md). --noisolate times all rows in this process.")

SHAPES = {
    "7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, head_dim=128),
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
               num_attention_heads=16, num_key_value_heads=16, head_dim=128),
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, head_dim=16),
}
METHODS = {"bitdelta": ("bitdelta", {}), "deltacome": ("deltacome", {"ratio": 1 / 16}),
           "rtn4": ("rtn", {"bits": 4}), "lowrank": ("lowrank", {"ratio": 1 / 16}),
           "deltadq": ("deltadq", {"ratio": 1 / 64})}


# ------------------------------------------------------------------------------- measurements


def _nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


@functools.partial(jax.jit, static_argnames=("shape", "norm"))
def _random_leaf(key, shape, norm):
    w = jax.random.normal(key, shape, jnp.float32) * 0.02
    return (1.0 + w if norm else w).astype(jnp.bfloat16)


def build_params(cfg, key):
    """Random bf16 params of `cfg`'s shapes, one small jitted draw per leaf (a single jit of
    `model.init_params` over all 7B weights took minutes to compile on the H200)."""
    abstract = jax.eval_shape(functools.partial(M.init_params, cfg, dtype=jnp.bfloat16), key)
    flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    keys = jax.random.split(key, len(flat))
    return jax.tree.unflatten(treedef, [
        _random_leaf(k, tuple(a.shape), "norm" in jax.tree_util.keystr(p))
        for k, (p, a) in zip(keys, flat)])


def random_deltas(base, method_key: str, t: int, key):
    """(method, {projection name: (T random containers stacked, abstract container)}): codes of
    exactly the structure METHOD's `compress` produces, drawn per leaf from a name-keyed seed."""
    name, kw = METHODS[method_key]
    m = make_method(name, **kw)
    out, cache = {}, {}

    def f(n, w):
        if is_projection(n):
            shp = tuple(w.shape)
            if shp not in cache:
                cache[shp] = jax.eval_shape(lambda d: m.compress(d, key=jax.random.PRNGKey(0)),
                                            jax.ShapeDtypeStruct(shp, jnp.float32))
            leaf_key = jax.random.fold_in(key, zlib.crc32(n.encode()) & 0x7FFFFFFF)
            out[n] = (C.random_like(leaf_key, cache[shp], (t,)), cache[shp])
        return w

    map_with_names(f, base)
    return m, out


def with_tenants(base, method_key: str, t: int, batch: int, key) -> tuple[dict, int]:
    """Base params with every projection a `MultiTenantWeight` of T random deltas; their bytes."""
    m, deltas = random_deltas(base, method_key, t, key)
    ids = jnp.arange(batch, dtype=jnp.int32) % t
    params = map_with_names(
        lambda n, w: MultiTenantWeight(base=w, deltas=deltas[n][0], tenant_ids=ids, method=m,
                                       num_tenants=t) if n in deltas else w, base)
    return params, sum(_nbytes(d) for d, _ in deltas.values())


def decode_state(cfg, batch: int, kv: int, steps: int, key) -> G.DecodeState:
    """A generate decode state with `kv` valid cache slots (random K/V) and room for `steps`."""
    s = kv + steps + 1
    shape = (batch, s, cfg.num_key_value_heads, cfg.head_dim)
    ks = jax.random.split(key, 2 * cfg.num_hidden_layers)
    mk = jax.jit(lambda k: (jax.random.normal(k, shape, jnp.float32) * 0.5).astype(jnp.bfloat16))
    cache = M.KVCache(k=tuple(mk(ks[2 * i]) for i in range(cfg.num_hidden_layers)),
                      v=tuple(mk(ks[2 * i + 1]) for i in range(cfg.num_hidden_layers)),
                      valid=jnp.zeros((batch, s), bool).at[:, :kv].set(True),
                      length=jnp.asarray(kv, jnp.int32))
    return G.DecodeState(
        cache=cache, last=jnp.ones((batch,), jnp.int32),
        out=jnp.zeros((batch, steps + 1), jnp.int32), done=jnp.zeros((batch,), bool),
        lengths=jnp.ones((batch,), jnp.int32), step=jnp.ones((), jnp.int32),
        key=jax.random.PRNGKey(0), stop_ids=jnp.full((8,), -1, jnp.int32),
        pad_id=jnp.zeros((), jnp.int32))


@functools.cache
def _loop(cfg):
    return jax.jit(functools.partial(G._decode_loop, cfg=cfg, sampling=G.Sampling()))


def time_jax(params, cfg, batch, kv, steps, repeats, key) -> dict:
    loop = _loop(cfg)
    state = decode_state(cfg, batch, kv, steps, key)
    t0 = time.perf_counter()
    out = jax.block_until_ready(loop(params, state))
    compile_s = time.perf_counter() - t0
    assert int(out.step) == steps + 1, f"decode ran {int(out.step)} steps, expected {steps + 1}"
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(loop(params, state))
        ts.append(time.perf_counter() - t0)
    return {"ms": 1e3 * float(np.median(ts)) / steps, "compile_s": compile_s}


def engine_pools(base, method_key: str, t: int, key):
    """One engine delta pool holding T random fine-tunes of METHOD (every projection); bytes."""
    from deltajax.serve import engine as E

    m, deltas = random_deltas(base, method_key, t, key)
    leaves = tuple(E.LeafSpec(n, E.LINEAR, m, jax.tree.structure(a), E._avals(a))
                   for n, (_, a) in sorted(deltas.items()))
    spec = E.PoolSpec(leaves=leaves, capacity=t)
    arrays = {n: d for n, (d, _) in deltas.items()}
    return (arrays,), (spec,), sum(_nbytes(d) for d in arrays.values())


def time_engine(base, cfg, batch, kv, steps, repeats, key, method_key=None, t=0) -> dict:
    """ms/step of `engine._decode` run as `Engine` runs it: one call + one host read per token."""
    from deltajax.serve import engine as E

    pools, specs, dbytes = ((), (), 0) if method_key is None else engine_pools(
        base, method_key, t, key)
    max_len = max(FLAGS.max_len, kv + steps * (3 * repeats + 1) + 1)
    state = E.SlotState.create(cfg, batch, max_len, jnp.bfloat16)
    rows = np.arange(batch, dtype=np.int32)
    state = state.replace(
        pos=jnp.full((batch,), kv, jnp.int32), last=jnp.ones((batch,), jnp.int32),
        pool=jnp.full((batch,), 0 if t else -1, jnp.int32),
        index=jnp.asarray(rows % t if t else np.full(batch, -1, np.int32)))
    active = np.ones(batch, bool)
    k = FLAGS.decode_steps
    calls = max(1, steps // k)
    kw = dict(cfg=cfg, specs=specs, implementation="auto", interpret=False, steps=k)
    t0 = time.perf_counter()
    state, tok = E._decode(base, pools, state, active, **kw)
    np.asarray(tok)
    compile_s = time.perf_counter() - t0

    def timed(mode):  # sync: read each call's tokens at once; lookahead: one call late (the
        nonlocal state  # engine's default); async: only at the end (device time)
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            prev = None
            for _ in range(calls):
                state, tok = E._decode(base, pools, state, active, **kw)
                if mode == "sync":
                    np.asarray(tok)
                elif mode == "lookahead" and prev is not None:
                    np.asarray(prev)
                prev = tok
            np.asarray(prev)
            ts.append(time.perf_counter() - t0)
        return 1e3 * float(np.median(ts)) / (calls * k)

    primary = "lookahead" if FLAGS.lookahead else "sync"
    out = {"ms": timed(primary), "compile_s": compile_s, "dbytes": dbytes, "max_len": max_len,
           "host_mode": primary}
    if FLAGS.host_ab:
        for mode in ("sync", "lookahead", "async"):
            out[f"ms_{mode}"] = out["ms"] if mode == primary else timed(mode)
    return out


def weight_bytes(params, cfg) -> int:
    """bf16 bytes of every weight a decode step reads (embedding rows excluded unless tied)."""
    total = 0
    for n, w in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = jax.tree_util.keystr(n)
        if "embed_tokens" in name and not cfg.tie_word_embeddings:
            continue
        total += int(np.prod(w.shape)) * jnp.dtype(w.dtype).itemsize
    return total


def kv_bytes(cfg, batch, kv, steps) -> float:
    per_slot = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2
    return batch * per_slot * (kv + steps / 2)


# ------------------------------------------------------------------------------- torch peer


def torch_step_ms(cfg, batch, kv, steps) -> float | None:
    """Plain PyTorch bf16 Llama decode step in one CUDA graph (the peer), ms per step."""
    import torch
    import torch.nn.functional as F

    dev, dt = "cuda", torch.bfloat16
    h, f, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    nh, kh, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    g = torch.Generator(device=dev).manual_seed(0)

    def w(*s):
        return torch.randn(*s, device=dev, dtype=dt, generator=g) * 0.02

    layers = [dict(q=w(nh * hd, h), k=w(kh * hd, h), v=w(kh * hd, h), o=w(h, nh * hd),
                   gate=w(f, h), up=w(f, h), down=w(h, f), n1=torch.ones(h, device=dev, dtype=dt),
                   n2=torch.ones(h, device=dev, dtype=dt)) for _ in range(L)]
    emb, head, nf = w(cfg.vocab_size, h), w(cfg.vocab_size, h), torch.ones(h, device=dev, dtype=dt)
    s = kv + steps + 1
    kc = [torch.randn(batch, kh, s, hd, device=dev, dtype=dt) for _ in range(L)]
    vc = [torch.randn(batch, kh, s, hd, device=dev, dtype=dt) for _ in range(L)]
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, device=dev).float() / hd))
    tok = torch.ones(batch, dtype=torch.long, device=dev)
    pos = torch.full((1,), kv, dtype=torch.long, device=dev)
    slots = torch.arange(s, device=dev)

    def rms(x, wt):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)).to(dt) * wt

    def rope(x, cos, sin):
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return (x * cos + torch.cat([-x2, x1], -1) * sin).to(dt)

    def step():
        x = emb[tok][:, None, :]  # (b, 1, h)
        ang = pos.float()[:, None] * inv[None]
        emb_a = torch.cat([ang, ang], -1)
        cos, sin = emb_a.cos().to(dt), emb_a.sin().to(dt)
        mask = (slots <= pos)[None, None, None, :]
        for i, p in enumerate(layers):
            y = rms(x, p["n1"])
            q = (y @ p["q"].T).view(batch, 1, nh, hd).transpose(1, 2)
            k = (y @ p["k"].T).view(batch, 1, kh, hd).transpose(1, 2)
            v = (y @ p["v"].T).view(batch, 1, kh, hd).transpose(1, 2)
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            kc[i].index_copy_(2, pos, k)
            vc[i].index_copy_(2, pos, v)
            a = F.scaled_dot_product_attention(q, kc[i], vc[i], attn_mask=mask,
                                               enable_gqa=kh != nh)
            x = x + a.transpose(1, 2).reshape(batch, 1, nh * hd) @ p["o"].T
            y = rms(x, p["n2"])
            x = x + (F.silu(y @ p["gate"].T) * (y @ p["up"].T)) @ p["down"].T
        logits = rms(x, nf) @ head.T
        tok.copy_(logits[:, -1].float().argmax(-1))
        pos.add_(1)

    with torch.no_grad():
        st = torch.cuda.Stream()
        st.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(st):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(st)
        graph = torch.cuda.CUDAGraph()
        pos.fill_(kv)
        with torch.cuda.graph(graph):
            step()
        ts = []
        for _ in range(FLAGS.repeats):
            pos.fill_(kv)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                graph.replay()
            torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(ts)) / steps


# ------------------------------------------------------------------------------------ profile


def profile_top(params, cfg, batch, kv, steps, key, out_dir, top=25) -> list[str]:
    """Trace one timed call; return lines: top device ops by total time, and the busy fraction."""
    import glob
    import gzip

    loop = _loop(cfg)
    state = decode_state(cfg, batch, kv, steps, key)
    jax.block_until_ready(loop(params, state))
    jax.profiler.start_trace(out_dir)
    t0 = time.perf_counter()
    jax.block_until_ready(loop(params, state))
    wall = time.perf_counter() - t0
    jax.profiler.stop_trace()
    files = sorted(glob.glob(os.path.join(out_dir, "**", "*.trace.json.gz"), recursive=True))
    if not files:
        return ["(no trace file written)"]
    ev = json.load(gzip.open(files[-1]))
    events = ev["traceEvents"] if isinstance(ev, dict) else ev
    pids = {e["pid"]: e.get("args", {}).get("name", "") for e in events
            if e.get("ph") == "M" and e.get("name") == "process_name"}
    dev = [e for e in events if e.get("ph") == "X" and "/device:GPU" in pids.get(e.get("pid"), "")
           and "dur" in e]
    by: dict[str, list[float]] = {}
    for e in dev:
        by.setdefault(e["name"], []).append(e["dur"])
    # kernels on stream rows only (skip the per-op summary rows XLA also writes)
    busy = sum(sum(v) for v in by.values())
    lines = [f"traced wall {1e3 * wall:.2f} ms for {steps} steps; device events {len(dev)}, "
             f"sum of event time {busy / 1e3:.2f} ms (rows may double count: XLA writes op and "
             "kernel rows)"]
    for name, ds in sorted(by.items(), key=lambda kv_: -sum(kv_[1]))[:top]:
        lines.append(f"{sum(ds) / 1e3 / steps:8.3f} ms/step  {len(ds) / steps:6.1f}/step  "
                     f"{name[:110]}")
    return lines


# ---------------------------------------------------------------------------------------- main


def parse_row(r: str):
    parts = r.split(":")
    if parts[0] == "base" and len(parts) == 3:
        return None, 0, int(parts[1]), int(parts[2])
    if len(parts) == 4 and parts[1] in METHODS:
        return parts[1], int(parts[0]), int(parts[2]), int(parts[3])
    raise app.UsageError(f"--rows: bad row {r!r} (base:B:KV or T:METHOD:B:KV, METHOD in "
                         f"{sorted(METHODS)})")


def _isolated_rows(argv) -> tuple[list[dict], str, dict]:
    """Run this script once per --rows entry (fresh process each); the rows, device, bandwidths."""
    import subprocess
    import tempfile

    drop = ("--rows", "--out", "--json_out", "--isolate", "--noisolate", "--profile_dir")
    rest = [a for a in argv[1:] if a.split("=")[0] not in drop]
    results, device, bws = [], "", {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, r in enumerate(FLAGS.rows):
            js = os.path.join(tmp, f"row{i}.json")
            cmd = [sys.executable, os.path.abspath(__file__), *rest, f"--rows={r}",
                   f"--json_out={js}", "--noisolate"]
            if FLAGS.profile_dir and i == 0:
                cmd.append(f"--profile_dir={FLAGS.profile_dir}")
            print(f"[bench_decode] row {r}: fresh process", flush=True)
            subprocess.run(cmd, check=True)
            with open(js) as fh:
                d = json.load(fh)
            device = d["device"]
            for k, v in d["copy_bw"].items():
                bws.setdefault(k, []).append(v)
            results += d["rows"]
    return results, device, bws


def main(argv):
    del argv
    rows = [parse_row(r) for r in FLAGS.rows]
    if FLAGS.isolate and len(rows) > 1:
        results, device, bws = _isolated_rows(sys.argv)
        bw_text = ", ".join(f"{k} {min(v) / 1e9:.0f}–{max(v) / 1e9:.0f} GB/s"
                            for k, v in bws.items())
        _write_table(results, device, bw_text + " (one measurement per row's process; each "
                     "row's floor uses its own)", rows_isolated=True)
        return
    ops.DECODE_ATTENTION = FLAGS.attention
    ops.DENSE_MATMUL = FLAGS.dense
    cfg = M.ModelConfig(**SHAPES[FLAGS.shape])
    dev = jax.devices()[0]
    device = f"{dev.platform}: {getattr(dev, 'device_kind', dev)}"
    key = jax.random.PRNGKey(0)
    bw = C.copy_bandwidths()
    floor_bw = bw.pop("floor")
    print(f"[bench_decode] {device}; copy bandwidth " + ", ".join(
        f"{k} {v / 1e9:.0f} GB/s" for k, v in bw.items()), flush=True)
    base = build_params(cfg, key)
    wbytes = weight_bytes(base, cfg)
    results = []
    for i, (meth, t, b, kv) in enumerate(rows):
        if FLAGS.step == "engine":
            params = None
            r = time_engine(base, cfg, b, kv, FLAGS.steps, FLAGS.repeats, key, meth, t)
            dbytes = r["dbytes"]
            for mode in ("sync", "lookahead", "async"):
                if f"ms_{mode}" in r:
                    print(f"[bench_decode] engine {mode}: {r[f'ms_{mode}']:.3f} ms/step",
                          flush=True)
        else:
            params, dbytes = (base, 0) if meth is None else with_tenants(base, meth, t, b, key)
            if FLAGS.profile_dir and i == 0:
                for line in profile_top(params, cfg, b, kv, FLAGS.steps, key, FLAGS.profile_dir):
                    print("[profile] " + line, flush=True)
            r = time_jax(params, cfg, b, kv, FLAGS.steps, FLAGS.repeats, key)
        byts = wbytes + dbytes + kv_bytes(cfg, b, kv, FLAGS.steps)
        floor_ms = 1e3 * byts / floor_bw
        row = {"row": "base alone" if meth is None else f"{t} × {meth}", "batch": b, "kv": kv,
               "ms": r["ms"], "tok_s": b / (r["ms"] / 1e3), "bytes": byts,
               "floor_bw": floor_bw, "floor_ms": floor_ms, "pct_floor": 100 * floor_ms / r["ms"],
               "compile_s": r["compile_s"], "step": FLAGS.step, "max_len": r.get("max_len"),
               **{k: v for k, v in r.items() if k.startswith("ms_")}}
        if FLAGS.torch_peer and jax.default_backend() == "gpu" and meth is None:
            try:
                row["torch_ms"] = torch_step_ms(cfg, b, kv, FLAGS.steps)
                import torch

                torch.cuda.empty_cache()
            except Exception as e:  # noqa: BLE001 - report, do not hide
                print(f"[bench_decode] torch peer failed: {type(e).__name__}: {e}",
                      file=sys.stderr)
        results.append(row)
        print("[bench_decode] " + json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                                              for k, v in row.items()}), flush=True)
        del params
    bw_text = ", ".join(f"{k} {v / 1e9:.0f} GB/s" for k, v in bw.items())
    _write_table(results, device, bw_text + f"; floor = bytes / {floor_bw / 1e9:.0f} GB/s",
                 rows_isolated=False, copy_bw=bw)


def _write_table(results, device, bw_text, *, rows_isolated, copy_bw=None):
    cfg = M.ModelConfig(**SHAPES[FLAGS.shape])
    lines = [
        "# Decode step vs the memory floor",
        "",
        f"Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC. Device: {device}. "
        f"Command: `{' '.join(sys.argv)}`.",
        "",
        f"Model: {FLAGS.shape} shapes ({cfg.num_hidden_layers} layers, hidden "
        f"{cfg.hidden_size}, MLP {cfg.intermediate_size}, vocab {cfg.vocab_size}), bf16. "
        f"Copy bandwidth measured in this run: {bw_text}. The step: "
        + ("`serve.generate`'s decode loop, " f"{FLAGS.steps} steps per call"
           if FLAGS.step == "generate" else "the serving engine's `_decode` ("
           f"{FLAGS.decode_steps} steps per call, tokens read "
           f"{'one call late' if FLAGS.lookahead else 'after each call'}, {FLAGS.max_len}+ "
           "cache positions per slot, all slots active)")
        + f"; attention {FLAGS.attention}; dense "
        f"projections {FLAGS.dense}; rows "
        f"{'each in a fresh process' if rows_isolated else 'in one process'}; "
        f"XLA_FLAGS=`{os.environ.get('XLA_FLAGS', '')}`.",
        "",
        "| row | batch | KV | ms/step | tokens/s | bytes/step | floor ms | % of floor "
        "| PyTorch CUDA graph ms | ours / PyTorch speed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        tm = r.get("torch_ms")
        lines.append(
            f"| {r['row']} | {r['batch']} | {r['kv']} | {r['ms']:.3f} | {r['tok_s']:.0f} | "
            f"{r['bytes'] / 1e9:.2f} GB | {r['floor_ms']:.3f} | {r['pct_floor']:.0f} % | "
            + (f"{tm:.3f} ({100 * r['floor_ms'] / tm:.0f} % of floor) | {tm / r['ms']:.2f}× |"
               if tm else "– | – |"))
    text = "\n".join(lines) + "\n"
    print(text)
    if FLAGS.out:
        with open(FLAGS.out, "w") as fh:
            fh.write(text)
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as fh:
            json.dump({"device": device, "copy_bw": copy_bw or {}, "rows": results}, fh,
                      indent=1)


if __name__ == "__main__":
    app.run(main)
