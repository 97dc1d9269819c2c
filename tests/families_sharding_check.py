"""8-device CPU check of a dense (Gemma 2) and a MoE (Mixtral) family, run in a subprocess.

`tests/test_families.py::test_families_sharded_over_8_devices` runs
``python tests/families_sharding_check.py DIR...`` (tiny HF model directories) with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` and asserts on the JSON it prints:
sharded load, sharded RTN compression and sharded forward with the attached delta against the
unsharded results. Every number is a measured difference, never a verdict computed here.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from deltajax import delta, methods  # noqa: E402
from deltajax import model as M  # noqa: E402
from deltajax.io import hf  # noqa: E402
from deltajax.methods import RTN  # noqa: E402
from deltajax.parallel import sharded, sharding  # noqa: E402


def _maxdiff(a, b) -> float:
    return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))


def check(path: str) -> dict:
    cfg = hf.load_config(path)
    mesh = sharding.make_mesh("data:2,model:4")
    base = hf.load_params(path, cfg)
    base_sh = hf.load_params(path, cfg, sharding=sharding.param_sharding_fn(mesh))
    rng = np.random.default_rng(0)
    ft = jax.tree.map(lambda w: w + 0.02 * rng.standard_normal(w.shape).astype(np.float32), base)
    rules = methods.default_rules(RTN(bits=4, group=16))
    comp = delta.compress(base, ft, rules, progress=False)
    comp_sh = sharded.compress_tree_sharded(
        delta.extract(base_sh, sharding.shard_params(ft, mesh)), rules, mesh, progress=False)
    tok = jnp.asarray(np.random.default_rng(1).integers(3, cfg.vocab_size, (2, 12)))
    fwd = jax.jit(lambda p, t: M.forward(p, t, cfg)[0])
    want = fwd(delta.attach(base, comp), tok)
    got = fwd(delta.attach(base, comp_sh, mesh=mesh), tok)
    sharded_names = [n for n, x in hf.ckpt_lib.flatten_params(base_sh).items()
                     if "model" in str(x.sharding.spec)]
    return {
        "model_type": cfg.model_type,
        "load_maxdiff": max(_maxdiff(a, b) for a, b in zip(jax.tree.leaves(base),
                                                           jax.tree.leaves(base_sh))),
        "n_sharded_leaves": len(sharded_names),
        "expert_leaves_sharded": sum(".experts." in n for n in sharded_names),
        "same_keys": sorted(comp) == sorted(comp_sh),
        "decompress_maxdiff": max(_maxdiff(comp[n].decompress(), comp_sh[n].decompress())
                                  for n in comp if hasattr(comp[n], "decompress")),
        "logits_maxdiff": _maxdiff(want, got),
        "delta_effect": _maxdiff(want, fwd(base, tok)),
    }


if __name__ == "__main__":
    print(json.dumps({"devices": jax.device_count(),
                      "results": [check(p) for p in sys.argv[1:]]}))
