"""End-to-end steps shared by the scripts: compress a base/fine-tune pair, report, save."""

from __future__ import annotations

import time
from collections.abc import Mapping

import jax
import numpy as np

from deltajax import accounting, data, delta
from deltajax.io import delta_ckpt as delta_checkpoint
from deltajax.io.resolve import load_model
from deltajax.methods import method_from_config
from deltajax.methods.bitdelta import BitDelta


def _cfg_dict(c) -> dict:
    return c.to_dict() if hasattr(c, "to_dict") else dict(c)


def calibration_tokens(tok, config, n: int | None = None) -> np.ndarray:
    path = config.get("calib_data") or str(data.default_file("gsm8k_train"))
    seq = int(config.get("calib_seq_len", 128))
    toks, _ = data.training_sequences(tok, path, seq, loss_on_prompt=True,
                                      max_sequences=n or int(config.get("calib_windows", 64)))
    return toks


def compress_loaded(base, ft, cfg, config: Mapping, *, tok=None, log=print, mesh=None) -> dict:
    """Compress the delta of loaded params; returns a dict of results.

    With a `jax.sharding.Mesh` (`parallel.sharding.make_mesh`), data-free methods distribute the
    matrices over its devices (`sharded.compress_tree_sharded`) and calibrated methods run with
    the calibration windows sharded over ``data`` (`sharded.sequential_compress_sharded`).
    """
    config = _cfg_dict(config)
    method = method_from_config(config["method"])
    rules = delta.default_rules(method, keep_other=config.get("keep_other", True))
    if method.name == "dsnot" and not config.get("refine_mlp", True):
        # the original DSnoT's default: MLP projections keep their initial mask
        from deltajax.methods import dsnot

        rules = dsnot.rules(method, refine_mlp=False, keep_other=config.get("keep_other", True))
    t0 = time.perf_counter()
    deltas = delta.extract(base, ft)
    rep = delta.delta_report(deltas)
    if rep["zero"]:
        log(f"[compress] {len(rep['zero'])} leaves have no delta (identical to base), e.g. "
            f"{rep['zero'][0]}")
    key = jax.random.PRNGKey(int(config.get("seed", 0)))
    n_cal = int(config.get("calib_windows", 64))
    if method.needs_stats and n_cal > 0:
        if tok is None:
            raise ValueError(f"{method.name} calibrates on text: a tokenizer is needed (or set "
                             "calib_windows=0 for its data-free mode)")
        from deltajax.steps import calibrate

        toks = calibrate.calibration_windows(
            tok, config.get("calib_data") or None, num_windows=n_cal,
            seq_len=int(config.get("calib_seq_len", 256)))
        log(f"[compress] calibrating {method.name} on {toks.shape[0]} windows × {toks.shape[1]} "
            "tokens, layer by layer")
        kw = dict(key=key, deltas=deltas, batch_size=int(config.get("calib_batch_size", 8)),
                  true_sequential=bool(config.get("true_sequential", True)))
        if mesh is not None:
            from deltajax.parallel import sharded

            comp = sharded.sequential_compress_sharded(base, ft, cfg, toks, rules, mesh, **kw)
        else:
            comp = calibrate.sequential_compress(base, ft, cfg, toks, rules, **kw)
    else:
        if method.needs_stats:
            log(f"[compress] {method.name}: no calibration data (calib_windows=0), data-free mode")
        if mesh is not None:
            from deltajax.parallel import sharded

            comp = sharded.compress_tree_sharded(deltas, rules, mesh, key=key)
        else:
            comp = delta.compress_tree(deltas, rules, key=key)
    t_compress = time.perf_counter() - t0
    distill_losses = None
    if isinstance(method, BitDelta) and int(config.get("distill_steps", 0)) > 0:
        if tok is None:
            raise ValueError("BitDelta distillation needs a tokenizer for calibration text")
        from deltajax.steps.bitdelta_distill import distill_scales

        toks = calibration_tokens(tok, config)
        comp, distill_losses = distill_scales(base, ft, comp, cfg, toks,
                                              steps=int(config["distill_steps"]), log=log)
    shapes = {n: tuple(x.shape) for n, x in delta.flatten(base).items()}
    acc = accounting.account(comp, shapes)
    rel = delta.relative_errors(deltas, comp)
    by_type = delta.errors_by_type({n: e for n, e in rel.items()
                                    if not comp[n].method.name == "keep"})
    lines = [accounting.format_table(acc)]
    if getattr(method, "ratio", None) is not None and getattr(method, "rank", None) is None:
        lines += ["", f"nominal α = 1/{1 / method.ratio:.4g} (budget: "
                  f"{getattr(method, 'budget', 'nominal')}); true linear-layer ratio "
                  f"{acc['linear_ratio']:.2f}x"]
    lines += ["", "| matrix type | relative error ‖Δ−Δ̂‖/‖Δ‖ |",
             "|---|---:|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in sorted(by_type.items())]
    return {"compressed": comp, "rules": rules, "deltas": deltas, "accounting": acc,
            "rel_by_type": by_type, "report": "\n".join(lines), "seconds": t_compress,
            "distill_losses": distill_losses, "method": method}


def compress_pair(base_spec: str, ft_spec: str, config, *, out: str | None = None,
                  overwrite: bool = False, log=print, mesh=None) -> dict:
    """Load a base and a fine-tune, compress their delta, optionally save it to `out`.

    With `mesh`, both models are loaded straight into their shards (`sharding.PARAM_RULES`) and
    compressed on the mesh (see `compress_loaded`).
    """
    if out is not None:
        from deltajax.io.params_ckpt import check_destination

        check_destination(out, overwrite)  # fail before the expensive work
    if mesh is None:
        base, cfg, tok, _ = load_model(base_spec)
        ft, ft_cfg, ft_tok, _ = load_model(ft_spec)
    else:
        from deltajax.parallel.sharding import load_model_sharded

        base, cfg, tok, _ = load_model_sharded(base_spec, mesh)
        ft, ft_cfg, ft_tok, _ = load_model_sharded(ft_spec, mesh)
    delta.check_pair(base, ft, base_cfg=cfg, ft_cfg=ft_cfg)
    res = compress_loaded(base, ft, cfg, config, tok=tok or ft_tok, log=log, mesh=mesh)
    if out is not None and jax.process_count() > 1:
        # multi-host: every process needs the whole (small) compressed delta to write it
        from jax.experimental import multihost_utils

        res["compressed"] = {n: leaf.replace(container=multihost_utils.process_allgather(
            leaf.container, tiled=True)) for n, leaf in res["compressed"].items()}
    if out is not None:
        res["out"] = delta_checkpoint.save_delta(
            res["compressed"], out, cfg=cfg, base_params=base, rules=res["rules"],
            overwrite=overwrite, extra={"config": _cfg_dict(config), "base": base_spec,
                                        "finetuned": ft_spec})
    return res


def compress_checkpoint(base_dir, ft_dir, rules, *, key=None, progress: bool = True,
                        allow_nonfinite: bool = False) -> dict:
    """Compress a base / fine-tune pair of HF directories one tensor at a time.

    Host memory stays near one tensor of each checkpoint plus the compressed output, so a 7B pair
    compresses on a small host. Data-free methods only (calibrated methods need activations:
    use the layer-wise calibration pipeline). Progress: a per-layer bar with ETA.
    Returns {name: DeltaLeaf}, equal to `compress_tree(extract(base, ft), rules)`.
    """
    from pathlib import Path

    import jax.numpy as jnp
    from tqdm.auto import tqdm

    from deltajax.io import hf, tensor_io

    base_dir, ft_dir = Path(base_dir), Path(ft_dir)
    cfg, ft_cfg = hf.load_config(base_dir), hf.load_config(ft_dir)
    if cfg != ft_cfg:
        delta.check_pair({}, {}, base_cfg=cfg, ft_cfg=ft_cfg)
    rb, _ = hf._scan(base_dir, cfg)  # validates every header first
    rf, _ = hf._scan(ft_dir, ft_cfg)
    groups: dict[str, list[str]] = {}
    for name in rb:
        g = ".".join(name.split(".")[:2]) if name.startswith("layers.") else "other"
        groups.setdefault(g, []).append(name)
    out, bad = {}, []
    key = jax.random.PRNGKey(0) if key is None else key
    for g in tqdm(list(groups), desc="compress (streaming)", unit="layer", disable=not progress):
        for name in groups[g]:
            r = delta.rule_for(name, rules)
            if r is None or r.method is None:
                continue
            b = tensor_io.read_tensor(rb[name])
            f = tensor_io.read_tensor(rf[name])
            d = jnp.asarray(f, jnp.float32) - jnp.asarray(b, jnp.float32)
            del b, f
            if not allow_nonfinite and not bool(jnp.all(jnp.isfinite(d))):
                bad.append(name)
                continue
            out[name] = delta.compress_leaf(r.method, name, d, key=key)
    if bad:
        raise delta.DeltaError("NaN/Inf in the delta of: " + ", ".join(bad))
    return out
