"""8-device CPU checks of parallel.sharding / parallel.sharded, run in a subprocess.

`tests/test_sharding.py` runs ``python tests/sharding_check.py OUT_DIR`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the flag must be set before jax is
imported, so it cannot run inside the single-device pytest process) and asserts on the JSON it
prints: sharded convert / compress / forward / generate against the unsharded results. Every
number is a measured difference, never a verdict computed here.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from tiny_pair import compress_deltas

from deltajax import delta, methods
from deltajax import model as M  # noqa: E402
from deltajax import tree as T
from deltajax.io import hf
from deltajax.methods import GPTQ, RTN, DeltaCoMe, LowRank  # noqa: E402
from deltajax.parallel import (
    sharded,
    sharding,  # noqa: E402
)
from deltajax.serve import generate as G  # noqa: E402
from deltajax.tree import Rule

# 4 heads of 32, 2 KV heads: on model:4 every projection shards and the row-parallel packed codes
# (K/4 = 32, 64) hold whole words and groups; on model:8 o_proj (K/8 = 16) falls back to GSPMD.
CFG = M.ModelConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                    tie_word_embeddings=True)


def _maxdiff(a, b) -> float:
    return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))


def _specs(tree) -> dict:
    return {n: str(x.sharding.spec) for n, x in T.flatten(tree).items()}


def _lap(t0):
    def lap(what):
        print(f"[sharding_check] {what} done at {time.perf_counter() - t0:.1f} s", file=sys.stderr,
              flush=True)
    return lap


def main(out_dir: str) -> dict:
    t0 = time.perf_counter()
    res: dict = {"devices": jax.device_count()}
    base = M.init_params(CFG, jax.random.PRNGKey(0), scale=0.1)
    ft = jax.tree.map(lambda w, k: w + 0.02 * jax.random.normal(k, w.shape), base,
                      jax.tree.unflatten(jax.tree.structure(base), list(jax.random.split(
                          jax.random.PRNGKey(1), len(jax.tree.leaves(base))))))
    tok = jax.random.randint(jax.random.PRNGKey(2), (2, 8), 0, CFG.vocab_size)
    mesh = sharding.make_mesh("data:2,model:4")

    lap = _lap(t0)
    # 1) convert: load an HF dir straight into shards == unsharded load
    src = os.path.join(out_dir, "hf")
    hf.export_hf(base, CFG, src, overwrite=True)
    ref = hf.load_params(src, CFG)
    got = hf.load_params(src, CFG, sharding=sharding.param_sharding_fn(mesh))
    res["load_maxdiff"] = max(_maxdiff(a, b) for a, b in zip(jax.tree.leaves(ref),
                                                              jax.tree.leaves(got)))
    res["load_specs"] = _specs(got)
    res["load_shard_shape_q"] = list(
        got["layers"][0]["self_attn"]["q_proj"]["weight"].addressable_shards[0].data.shape)

    lap("load")
    # 2) data-free compression spread over all 8 devices == compress_tree
    deltas = delta.extract(base, ft)
    res["compress"] = {}
    comps = {}
    deltas_sh = delta.extract(got, sharding.shard_params(ft, mesh))  # sharded like the base
    some = r"(q|o|gate|down)_proj\.weight$"  # both kinds, 3 shapes: fewer compiles
    for meth, rules in ((RTN(bits=4, group=32), methods.default_rules(RTN(bits=4, group=32))),
                        (LowRank(rank=8), (Rule(some, LowRank(rank=8)),)),
                        (DeltaCoMe(ratio=1 / 4, group=32),
                         (Rule(some, DeltaCoMe(ratio=1 / 4, group=32)),))):
        r = compress_deltas(deltas, rules, progress=False)
        s = sharded.compress_tree_sharded(deltas_sh, rules, mesh, progress=False)
        res["compress"][meth.name] = {
            "same_keys": sorted(r) == sorted(s),
            "decompress_maxdiff": max(_maxdiff(r[n].decompress(), s[n].decompress()) for n in r),
            "delta_scale": max(float(jnp.max(jnp.abs(r[n].decompress()))) for n in r),
        }
        comps[meth.name] = (r, s)

    lap("compress")
    # 3) forward: base + deltas sharded (shard_map kernels where the layout allows) == unsharded
    fwd = jax.jit(lambda p, t: M.forward(p, t, CFG)[0])
    res["forward"] = {}
    for name, (r, s) in comps.items():
        want = fwd(delta.attach(base, r), tok)
        entry = {}
        for spec in ("data:2,model:4", "data:1,model:8") if name == "rtn" else ("data:2,model:4",):
            m = sharding.make_mesh(spec)
            p = delta.attach(base, s, mesh=m)
            entry[spec] = {"logits_maxdiff": _maxdiff(want, fwd(p, tok)),
                           "coverage": sharded.kernel_coverage(p)}
        entry["logit_scale"] = float(jnp.max(jnp.abs(want)))
        res["forward"][name] = entry

    lap("forward")
    # 4) generate (prefill + while_loop decode, KV cache) sharded == unsharded, greedy tokens
    r, s = comps["rtn"]
    g_ref = G.generate_tokens(delta.attach(base, r), CFG, tok, max_new_tokens=6)
    g_sh = G.generate_tokens(delta.attach(base, s, mesh=mesh), CFG, tok, max_new_tokens=6)
    res["generate_equal"] = bool(np.array_equal(g_ref["tokens"], g_sh["tokens"]))
    res["generate_tokens"] = g_ref["tokens"].tolist()

    lap("generate")
    # 5) calibrated (GPTQ): windows over data, Hessians all-reduced by GSPMD == one device
    from deltajax.steps import calibrate

    ctok = jax.random.randint(jax.random.PRNGKey(3), (4, 16), 0, CFG.vocab_size)
    rules = methods.default_rules(GPTQ(bits=4, group=32))
    h_r, h_s = {}, {}
    r = calibrate.sequential_compress(base, ft, CFG, ctok, rules, batch_size=2, progress=False,
                                      on_stats=lambda k, st: h_r.setdefault(k, st.hessian))
    s = sharded.sequential_compress_sharded(
        base, ft, CFG, ctok, rules, mesh, batch_size=2, progress=False,
        on_stats=lambda k, st: h_s.setdefault(k, st.hessian))
    # GPTQ rounds against H: a code may flip on a float-rounding tie when H is summed in another
    # order, so compare H itself and the fraction of differing dequantized entries
    diff = [jnp.mean((r[n].decompress() != s[n].decompress()).astype(jnp.float32)) for n in r]
    res["calibrated"] = {
        "same_keys": sorted(r) == sorted(s),
        "n_leaves": len(r),
        "hessian_rel_maxdiff": max(_maxdiff(h_r[k], h_s[k]) / float(jnp.max(jnp.abs(h_r[k])))
                                   for k in h_r),
        "sharded_hessian_spec": str(next(iter(h_s.values())).sharding),
        "max_frac_entries_differing": max(float(d) for d in diff),
        "rel_frobenius_maxdiff": max(
            float(jnp.linalg.norm(r[n].decompress() - s[n].decompress())
                  / jnp.maximum(jnp.linalg.norm(r[n].decompress()), 1e-30)) for n in r),
    }
    lap("calibrated")
    res["seconds"] = time.perf_counter() - t0
    return res


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
