"""End-to-end steps shared by the scripts: compress a base/fine-tune pair, report, save."""

from __future__ import annotations

import time
from collections.abc import Mapping

import jax
import numpy as np

from deltajax import accounting, data, delta, delta_checkpoint
from deltajax.methods import method_from_config
from deltajax.methods.bitdelta import BitDelta
from deltajax.models_io import load_model


def _cfg_dict(c) -> dict:
    return c.to_dict() if hasattr(c, "to_dict") else dict(c)


def calibration_tokens(tok, config, n: int | None = None) -> np.ndarray:
    path = config.get("calib_data") or str(data.default_file("gsm8k_train"))
    seq = int(config.get("calib_seq_len", 128))
    toks, _ = data.training_sequences(tok, path, seq, loss_on_prompt=True,
                                      max_sequences=n or int(config.get("calib_windows", 64)))
    return toks


def compress_loaded(base, ft, cfg, config: Mapping, *, tok=None, log=print) -> dict:
    """Compress the delta of loaded params; returns {'compressed', 'rules', 'deltas', 'report'...}."""
    config = _cfg_dict(config)
    method = method_from_config(config["method"])
    rules = delta.default_rules(method, keep_other=config.get("keep_other", True))
    t0 = time.perf_counter()
    deltas = delta.extract(base, ft)
    rep = delta.delta_report(deltas)
    if rep["zero"]:
        log(f"[compress] {len(rep['zero'])} leaves have no delta (identical to base), e.g. "
            f"{rep['zero'][0]}")
    key = jax.random.PRNGKey(int(config.get("seed", 0)))
    comp = delta.compress_tree(deltas, rules, key=key)
    t_compress = time.perf_counter() - t0
    distill_losses = None
    if isinstance(method, BitDelta) and int(config.get("distill_steps", 0)) > 0:
        if tok is None:
            raise ValueError("BitDelta distillation needs a tokenizer for calibration text")
        from deltajax.methods.bitdelta_distill import distill_scales

        toks = calibration_tokens(tok, config)
        comp, distill_losses = distill_scales(base, ft, comp, cfg, toks,
                                              steps=int(config["distill_steps"]), log=log)
    shapes = {n: tuple(x.shape) for n, x in delta.flatten(base).items()}
    acc = accounting.account(comp, shapes)
    rel = delta.relative_errors(deltas, comp)
    by_type = delta.errors_by_type({n: e for n, e in rel.items()
                                    if not comp[n].method.name == "keep"})
    lines = [accounting.format_table(acc), "", "| matrix type | relative error ‖Δ−Δ̂‖/‖Δ‖ |",
             "|---|---:|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in sorted(by_type.items())]
    return {"compressed": comp, "rules": rules, "deltas": deltas, "accounting": acc,
            "rel_by_type": by_type, "report": "\n".join(lines), "seconds": t_compress,
            "distill_losses": distill_losses, "method": method}


def compress_pair(base_spec: str, ft_spec: str, config, *, out: str | None = None,
                  overwrite: bool = False, log=print) -> dict:
    """Load a base and a fine-tune, compress their delta, optionally save it to `out`."""
    if out is not None:
        from deltajax.checkpoint import check_destination

        check_destination(out, overwrite)  # fail before the expensive work
    base, cfg, tok, _ = load_model(base_spec)
    ft, ft_cfg, ft_tok, _ = load_model(ft_spec)
    delta.check_pair(base, ft, base_cfg=cfg, ft_cfg=ft_cfg)
    res = compress_loaded(base, ft, cfg, config, tok=tok or ft_tok, log=log)
    if out is not None:
        res["out"] = delta_checkpoint.save_delta(
            res["compressed"], out, cfg=cfg, base_params=base, rules=res["rules"],
            overwrite=overwrite, extra={"config": _cfg_dict(config), "base": base_spec,
                                        "finetuned": ft_spec})
    return res
