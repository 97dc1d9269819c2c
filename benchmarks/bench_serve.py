r"""Multi-tenant decode throughput and memory: one base + T compressed deltas in one batch.

  python benchmarks/bench_serve.py --out=benchmarks/serving.md

Model: Llama-2-7B shapes (32 layers, hidden 4096, MLP 11008, 32 heads, vocab 32000), bf16 random
base. Deltas: T tenants per method, each projection holding a container of exactly the structure
the method's `compress` produces for that shape (`jax.eval_shape`), filled with random codes and
scales on the device — decode speed and memory do not depend on the values, and compressing
T × 224 real 7B matrices would take the whole device budget. Every row of the batch names its
tenant (row i → tenant i mod T); the base matmul is shared (`multitenant.MultiTenantWeight`).

One decode step = embed + 32 layers (lax.scan over the stacked layers, attention over a
128-token KV cache, the 7 projections with their per-row deltas) + lm_head + argmax; timed as
the median of --steps jitted steps after warm-up. tokens/s = batch / step time. Memory = device
bytes in use after building the params (base + stacked deltas) and the KV cache.

Baseline (b), one dense model per fine-tune swapped in: the T fine-tunes do not fit on the device
together (T × 13.5 GB), so each tenant's rows are decoded by its own dense model after a
host→device copy of its weights. Its throughput is computed from measured parts:
batch / (Σ_t step_time_dense(rows of t) + T · swap_time / gen_len), i.e. one swap per tenant
per generation of --gen_len tokens (stated as such in the table).

% of copy floor: the bytes one decode step must read (the base weights, the deltas of the
min(T, batch) tenants present, the KV cache) at the device-to-device copy bandwidth measured in
the same run (`_common.copy_bandwidth`), as % of the measured step time.
"""

from __future__ import annotations

import statistics
import time

import _common as C
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from deltajax import cli
from deltajax import model as M
from deltajax.methods import make_method
from deltajax.serve.multitenant import MultiTenantWeight
from deltajax.tree import PROJ_PATTERN  # noqa: F401  (documentation: which leaves get deltas)

FLAGS = flags.FLAGS
flags.DEFINE_integer("layers", 32, "Decoder layers.")
flags.DEFINE_integer("hidden", 4096, "Hidden size.")
flags.DEFINE_integer("ffn", 11008, "MLP size.")
flags.DEFINE_integer("heads", 32, "Attention heads (= KV heads).")
flags.DEFINE_integer("vocab", 32000, "Vocabulary.")
flags.DEFINE_list("tenants", ["1", "4", "16", "64"], "Numbers of deltas T.")
flags.DEFINE_list("batches", ["1", "16", "64"], "Batch sizes.")
flags.DEFINE_list("methods", ["bitdelta", "deltacome"], "Methods (BitDelta, Delta-CoMe 1/16).")
flags.DEFINE_integer("cache_len", 128, "Tokens already in the KV cache.")
flags.DEFINE_integer("steps", 10, "Timed decode steps per configuration.")
flags.DEFINE_integer("gen_len", 128, "Generation length amortizing one dense swap per tenant.")
flags.DEFINE_float("max_seconds", 480.0, "Skip remaining configurations after this long.")
flags.DEFINE_string("out", "benchmarks/serving.md", "Markdown output ('' to skip).")
flags.DEFINE_string(
    "implementation",
    "auto",
    "MultiTenantWeight.implementation: 'auto' (the multi-tenant kernels where they apply), "
    "'pallas_gpu' (force them, incl. the Delta-CoMe stored-format kernels) or "
    "'xla' (the references / generic per-tenant fallback, for comparison).",
)

_PROJ = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"),
         ("self_attn", "o_proj"), ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))


def _cfg():
    return M.ModelConfig(vocab_size=FLAGS.vocab, hidden_size=FLAGS.hidden,
                         intermediate_size=FLAGS.ffn, num_hidden_layers=FLAGS.layers,
                         num_attention_heads=FLAGS.heads, num_key_value_heads=FLAGS.heads,
                         head_dim=FLAGS.hidden // FLAGS.heads)


def _method(name):
    return make_method("deltacome", ratio=1 / 16) if name == "deltacome" else make_method(name)


def _stack_layers(layers):
    """Stack per-layer dicts leaf by leaf, freeing each layer's copy as it goes."""
    names = jax.tree_util.tree_structure(layers[0])
    cols = [jax.tree.leaves(lp) for lp in layers]
    layers.clear()
    out = []
    for j in range(len(cols[0])):
        out.append(jnp.stack([c[j] for c in cols]))
        for c in cols:
            c[j] = None
    return jax.tree.unflatten(names, out)


def build(cfg, method_name, t, batch, key):
    """(stacked layers, top-level params): base bf16 + T random deltas per projection."""
    base = M.init_params(cfg, key, jnp.bfloat16)
    top = {k: v for k, v in base.items() if k != "layers"}
    layers = _stack_layers(base.pop("layers"))
    if method_name == "dense":
        return layers, top
    m = _method(method_name)
    ids = jnp.broadcast_to(jnp.arange(batch, dtype=jnp.int32) % t, (cfg.num_hidden_layers, batch))
    for j, (blk, p) in enumerate(_PROJ):
        w = layers[blk][p]["weight"]  # (L, out, in)
        abstract = jax.eval_shape(lambda d: m.compress(d),
                                  jax.ShapeDtypeStruct(w.shape[1:], jnp.float32))
        stacked = C.random_like(jax.random.fold_in(key, j), abstract, (cfg.num_hidden_layers, t))
        layers[blk][p]["weight"] = MultiTenantWeight(base=w, deltas=stacked, tenant_ids=ids,
                                                     method=m, num_tenants=t,
                                                     implementation=FLAGS.implementation)
    return layers, top


def make_step(cfg):
    def step(layers, top, tok, ck, cv, valid, write_at):
        b = tok.shape[0]
        valid = jax.lax.dynamic_update_slice(valid, jnp.ones((b, 1), bool), (0, write_at))
        pos = jnp.sum(valid, axis=1, dtype=jnp.int32)[:, None] - 1
        mask = M._attn_mask(cfg, write_at + jnp.arange(1), jnp.arange(valid.shape[1]), valid)
        h = M.embed(top, tok, cfg=cfg)

        def body(h, xs):
            lp, k, v = xs
            h, (k, v) = M.decoder_layer(cfg, lp, h, pos, mask, (k, v), write_at)
            return h, (k, v)

        h, (ck, cv) = jax.lax.scan(body, h, (layers, ck, cv))
        logits = M.unembed(cfg, top, h)
        return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)[:, None], ck, cv, valid

    return jax.jit(step, donate_argnums=(3, 4))


def _mem():
    st = jax.devices()[0].memory_stats() or {}
    return st.get("bytes_in_use", 0) / 2**30


def time_decode(cfg, layers, top, batch):
    step = make_step(cfg)
    s = FLAGS.cache_len + FLAGS.steps + 8
    shape = (cfg.num_hidden_layers, batch, s, cfg.num_key_value_heads, cfg.head_dim)
    ck = jnp.zeros(shape, jnp.bfloat16)
    cv = jnp.zeros(shape, jnp.bfloat16)
    valid = jnp.zeros((batch, s), bool).at[:, : FLAGS.cache_len].set(True)
    tok = jnp.ones((batch, 1), jnp.int32)
    mem = _mem()
    (tok, ck, cv, valid), compile_s = C.timed(step, layers, top, tok, ck, cv, valid,
                                              jnp.int32(FLAGS.cache_len))
    times = []
    for i in range(FLAGS.steps):  # the cache is donated: each step feeds the next (no re-use)
        (tok, ck, cv, valid), t = C.timed(step, layers, top, tok, ck, cv, valid,
                                          jnp.int32(FLAGS.cache_len + 1 + i))
        times.append(t)
    return statistics.median(times), mem, compile_s


def _nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def kv_bytes(cfg, batch: int) -> int:
    """Bytes of the KV cache a decode step reads (bf16 K and V of --cache_len tokens)."""
    return (2 * 2 * cfg.num_hidden_layers * batch * FLAGS.cache_len * cfg.num_key_value_heads
            * cfg.head_dim)


def step_bytes(layers, top, t: int, batch: int) -> int:
    """Bytes one decode step must read: base weights, the deltas of the min(T, batch) tenants
    in the batch (the stacked deltas hold T), the KV cache."""
    mt = [x for x in jax.tree.leaves(layers, is_leaf=lambda v: isinstance(v, MultiTenantWeight))
          if isinstance(x, MultiTenantWeight)]
    deltas = sum(_nbytes(w.deltas) for w in mt)
    base = _nbytes(top) + _nbytes(layers) - deltas - sum(_nbytes(w.tenant_ids) for w in mt)
    return base + deltas * min(t, batch) // max(t, 1)


def main(argv):
    cli.no_extra_args(argv)
    cfg = _cfg()
    dev = jax.devices()[0]
    bw = C.copy_bandwidth()
    print(f"copy bandwidth {C.fmt_bandwidth(bw)}", flush=True)
    batches = [int(b) for b in FLAGS.batches]
    tenants = [int(t) for t in FLAGS.tenants]
    t_begin = time.perf_counter()
    rows, dense_step = [], {}
    # base alone (also the dense model each swapped-in fine-tune would run)
    layers, top = build(cfg, "dense", 1, 1, jax.random.PRNGKey(0))
    base_bytes = sum(x.nbytes for x in jax.tree.leaves((layers, top)))
    needed = sorted(set(batches) | {max(1, b // t) for b in batches for t in tenants})
    for b in needed:
        dense_step[b], mem, c = time_decode(cfg, layers, top, b)
        print(f"dense b={b}: {1e3 * dense_step[b]:.2f} ms/step (compile {c:.0f} s)", flush=True)
        if b in batches:
            floor = C.pct_of_floor(step_bytes(layers, top, 1, b) + kv_bytes(cfg, b),
                                   dense_step[b], bw)
            rows.append(("base alone", 0, b, b / dense_step[b], mem, floor, ""))
    # host -> device swap of one dense model
    host = jax.device_get((layers, top))
    del layers, top
    swap_s = C.timed(jax.device_put, host)[1]
    del host
    print(f"swap of one dense model ({base_bytes / 2**30:.1f} GiB): {swap_s:.2f} s", flush=True)
    for t in tenants:
        for b in batches:
            per = [len(range(i, b, t)) for i in range(min(t, b))]
            denom = (sum(dense_step[max(1, r)] for r in per if r)
                     + min(t, b) * swap_s / FLAGS.gen_len)
            rows.append(("dense per fine-tune, swapped (computed)", t, b, b / denom, float("nan"),
                         float("nan"),
                         f"{min(t, b)} swaps of {swap_s:.2f} s per {FLAGS.gen_len} tokens"))
    for name in FLAGS.methods:
        for t in tenants:
            if time.perf_counter() - t_begin > FLAGS.max_seconds:
                rows.append((name, t, 0, float("nan"), float("nan"), float("nan"),
                             "skipped: time budget"))
                continue
            try:
                layers, top = build(cfg, name, t, max(batches), jax.random.PRNGKey(1))
            except Exception as e:  # noqa: BLE001 (report OOM and go on)
                rows.append((name, t, 0, float("nan"), float("nan"), float("nan"),
                             f"build failed: {e!s:.60}"))
                continue
            for b in batches:
                if time.perf_counter() - t_begin > FLAGS.max_seconds:
                    rows.append((name, t, b, float("nan"), float("nan"), float("nan"),
                                 "skipped: time budget"))
                    continue
                lb = jax.tree.map(lambda x: x, layers)
                ids = jnp.arange(b, dtype=jnp.int32) % t
                def set_ids(x, ids=ids):
                    if not isinstance(x, MultiTenantWeight):
                        return x
                    return x.replace(tenant_ids=jnp.broadcast_to(
                        ids, x.tenant_ids.shape[:1] + ids.shape))

                lb = jax.tree.map(set_ids, lb, is_leaf=lambda x: isinstance(x, MultiTenantWeight))
                try:
                    st, mem, c = time_decode(cfg, lb, top, b)
                except Exception as e:  # noqa: BLE001
                    rows.append((name, t, b, float("nan"), float("nan"), float("nan"),
                                 f"failed: {e!s:.60}"))
                    continue
                note = f"{100 * dense_step[b] / st:.0f}% of base alone"
                floor = C.pct_of_floor(step_bytes(lb, top, t, b) + kv_bytes(cfg, b), st, bw)
                rows.append((name, t, b, b / st, mem, floor, note))
                print(f"{name} T={t} b={b}: {1e3 * st:.2f} ms/step, {mem:.1f} GiB, {note} "
                      f"(compile {c:.0f} s)", flush=True)
            del layers, top
    from pallas_kernels.lowrank_delta_matmul import stored_gpu

    on_gpu = dev.platform == "gpu"
    stored_path = FLAGS.implementation == "pallas_gpu" or (
        FLAGS.implementation == "auto" and on_gpu and stored_gpu.AUTO_ON_GPU
    )
    lines = C.header("Multi-tenant decode: one base + T compressed deltas in one batch", [
        f"- copy bandwidth (device-to-device copy, read + write, this run): "
        f"{C.fmt_bandwidth(bw)}; % of copy floor = bytes a step must read (base, the deltas of "
        "the tenants in the batch, KV cache) / bandwidth / measured step time",
        f"- model: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, MLP "
        f"{cfg.intermediate_size}, vocab {cfg.vocab_size}, bf16 ({base_bytes / 2**30:.1f} GiB); "
        f"decode step with a {FLAGS.cache_len}-token KV cache, median of {FLAGS.steps} steps; "
        "row i uses tenant i mod T; random codes/scales in the exact container structure",
        "- BitDelta: sign bits + one scale per matrix (sign_matmul_multitenant kernel). "
        "Delta-CoMe α=1/16: bands of packed V/U factors, "
        + (
            "served by the stored-format multi-tenant kernels (stored_gpu, two segment-sorted "
            "launches per band)"
            if stored_path
            else "served by the generic per-tenant fallback (T× the delta work)"
        )
        + f" (implementation={FLAGS.implementation!r})",
        "- target: 16 fine-tunes in a batch of 16 ≥ 70% of base-alone tokens/s with base + "
        "16 × 1/16 of its memory",
        "",
    ])

    def cell(v, spec):
        return "" if np.isnan(v) else f"{v:{spec}}"

    lines += C.table(["serving", "T", "batch", "tokens/s", "device GiB", "% of copy floor",
                      "note"],
                     [(name, t, b, cell(tps, ".1f"), cell(mem, ".1f"), cell(fl, ".0f"), note)
                      for name, t, b, tps, mem, fl, note in rows], align="lrrrrrl")
    text = "\n".join(lines) + "\n"
    print(text)
    C.write_markdown(FLAGS.out, text)


if __name__ == "__main__":
    cli.run(main)
