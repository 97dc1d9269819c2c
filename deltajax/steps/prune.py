"""Pruning a model's own projection weights layer by layer: Wanda / magnitude init + DSnoT.

The paper's own use of DSnoT (arXiv 2310.08915; code ``zyxxmu/DSnoT``, ``lib/prune.py:
prune_DSnoT``), see ../shared/METHODS.md §5:

    pruned, report = prune_model(params, cfg, tokens, sparsity=0.6, init="wanda", refine=True)

Layer-wise propagation as in the original: the calibration hidden states enter decoder layer i;
the input statistics of all its linears (mean, variance, mean square: ``calibrate.LinearStats``)
come from **one** forward of the still-dense layer (not true-sequential); every projection is
pruned to ⌊s·k⌋ zeros per row (initial mask, optionally refined by `dsnot_refine`); then the
layer's outputs are recomputed with the pruned weights and feed layer i+1. Embeddings, norms and
the output head are not pruned. ``refine_mlp=False`` (default) refines only the attention
projections, as the original's ``--skip_layer mlp``; MLP projections keep the initial mask.

Invariant (tested): every row of every projection has exactly ⌊s·k⌋ zeros (the weights that
were already zero can be kept, as in the original); other leaves are unchanged. Where we differ:
statistics use our pooled variance (see `deltajax.methods.dsnot`); calibration windows and their
length are the caller's (the paper: 128 × 2048 tokens of C4).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from deltajax import model as M
from deltajax.methods.dsnot import INITS, STOP_RULES, initial_mask, refine_with_info
from deltajax.progress import bar as tqdm  # process 0 only
from deltajax.steps import calibrate

MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@functools.partial(jax.jit, static_argnames=("sparsity", "init", "refine", "max_cycles",
                                             "pow_of_var", "stop_rule"))
def prune_matrix(w, stats: calibrate.LinearStats, key, *, sparsity: float, init: str,
                 refine: bool, max_cycles: int = 50, threshold: float = 0.1,
                 threshold_seq_len: float = 2048.0, pow_of_var: float = 1.0,
                 stop_rule: str = "threshold"):
    """(pruned w in its dtype, keep-mask, per-row |ε| before, after) of one (out, in) weight."""
    keep = initial_mask(w, sparsity=sparsity, init=init, sq=stats.sq, key=key)
    wf = w.astype(jnp.float32)
    eps0 = jnp.sum(jnp.where(keep, 0.0, wf * stats.mean[None, :]), axis=1)
    eps = eps0
    if refine:
        keep, info = refine_with_info(w, keep, stats.mean, stats.var, stats.sq,
                                      max_cycles=max_cycles, threshold=threshold,
                                      threshold_seq_len=threshold_seq_len,
                                      pow_of_var=pow_of_var, stop_rule=stop_rule)
        eps = info.eps
    return jnp.where(keep, w, jnp.zeros_like(w)), keep, jnp.abs(eps0), jnp.abs(eps)


def _get(tree, dotted):
    for p in dotted.split("."):
        tree = tree[p]
    return tree


def _set(tree, dotted, value):
    parts = dotted.split(".")
    for p in parts[:-1]:
        tree = tree[p]
    tree[parts[-1]] = value


def prune_model(
    params: dict, cfg: M.ModelConfig, tokens, *, sparsity: float = 0.6, init: str = "wanda",
    refine: bool = True, refine_mlp: bool = False, max_cycles: int = 50,
    threshold: float = 0.1, threshold_seq_len: float = 2048.0, pow_of_var: float = 1.0,
    stop_rule: str = "threshold", token_mask=None, key: jax.Array | None = None,
    batch_size: int = 8, progress: bool = True, log: Callable[[str], None] | None = None,
) -> tuple[dict, dict]:
    """Prune every decoder projection of `params` to `sparsity` (row-wise) with optional DSnoT.

    Args:
      params: model params (dense arrays).
      cfg: its config.
      tokens: (N, L) int calibration windows (token_mask (N, L): real tokens, default all).
      sparsity: fraction of each row set to zero (the paper: 0.6).
      init: initial mask, "wanda" (paper), "magnitude" or "random".
      refine: run DSnoT on the initial mask (False: the initial method alone).
      refine_mlp: also refine the MLP projections (False = the original default).
      max_cycles, threshold, threshold_seq_len, pow_of_var, stop_rule: see `dsnot_refine`.
      key: PRNG key of the "random" init (folded per layer and projection).
      batch_size: windows per layer forward.

    Returns:
      (pruned params, report) with report = {"sparsity": fraction of zeros over the pruned
      projections, "eps0" / "eps": mean per-row |ε| (per token) before / after refinement by
      projection type, "seconds"}.
    """
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {INITS}")
    if stop_rule not in STOP_RULES:
        raise ValueError(f"unknown stop_rule {stop_rule!r}; choose one of {STOP_RULES}")
    log = log or (lambda s: None)
    key = jax.random.PRNGKey(0) if key is None else key
    tokens = jnp.asarray(tokens, jnp.int32)
    tmask = jnp.ones(tokens.shape, bool) if token_mask is None else jnp.asarray(token_mask, bool)
    out = jax.tree.map(lambda x: x, params)
    if cfg.num_experts:
        raise ValueError(f"prune: mixture-of-experts models ({cfg.model_type}) are not supported")
    hidden = M.embed(params, tokens, cfg=cfg)
    zeros = total = 0
    eps_by: dict[str, list] = {}
    t0 = time.perf_counter()
    taps = tuple(t for t, _ in calibrate.SUBBLOCKS)
    for i in tqdm(range(cfg.num_hidden_layers), desc="prune", unit="layer", disable=not progress):
        lp = out["layers"][i]
        stats = calibrate.capture_layer_stats(cfg, lp, hidden, tmask, taps=taps,
                                              batch_size=batch_size, kind=cfg.layer_kind(i))
        for j, (tap, projs) in enumerate(calibrate.SUBBLOCKS):
            for jj, p in enumerate(calibrate.layer_projections(lp, projs)):
                w = _get(lp, f"{p}.weight")
                do = refine and (refine_mlp or p not in MLP)
                wp, keep, e0, e1 = prune_matrix(
                    w, stats[tap], jax.random.fold_in(key, 16 * i + 4 * j + jj),
                    sparsity=sparsity, init=init, refine=do, max_cycles=max_cycles,
                    threshold=threshold, threshold_seq_len=threshold_seq_len,
                    pow_of_var=pow_of_var, stop_rule=stop_rule)
                _set(lp, f"{p}.weight", wp)
                zeros += int(np.sum(~np.asarray(keep)))
                total += keep.size
                t = p.split(".")[-1]
                eps_by.setdefault(t, []).append((float(jnp.mean(e0)), float(jnp.mean(e1))))
        hidden = calibrate.layer_forward(cfg, lp, hidden, tmask, batch_size=batch_size,
                                          kind=cfg.layer_kind(i))
        log(f"[prune] layer {i} done ({time.perf_counter() - t0:.0f} s)")
    report = {
        "sparsity": zeros / max(total, 1),
        "eps0": {t: float(np.mean([a for a, _ in v])) for t, v in eps_by.items()},
        "eps": {t: float(np.mean([b for _, b in v])) for t, v in eps_by.items()},
        "seconds": time.perf_counter() - t0,
    }
    return out, report
