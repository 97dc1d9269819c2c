"""Calibration: layer-wise capture of linear inputs, Hessians / statistics, sequential compression.

    toks = calibration_windows(tok, "gsm8k_train.jsonl", num_windows=128, seq_len=2048)
    comp = sequential_compress(base, ft, cfg, toks, rules)      # {name: DeltaLeaf}

One decoder layer at a time: the hidden states of all windows enter the layer, the inputs of its
linears are captured batch by batch (memory: one layer's activations for one batch) and reduced
in fp32 into `LinearStats` — the GPTQ Hessian H = 2/n·XᵀX plus the per-channel mean and mean
square (variance, Wanda's ‖X_j‖₂) that DSnoT / DeltaDQ need. With ``true_sequential`` (default)
the sub-blocks [q,k,v] → [o] → [gate,up] → [down] are calibrated in order, each on inputs
recomputed with the already compressed sub-blocks; after the layer is done its outputs are
recomputed with the compressed layer and become the next layer's inputs (GPTQ's sequential mode).

Opt-in pooled statistics (``pool_size``, Bolaco's pooled covariance, arXiv 2405.10616,
`Dereck0602/Bolaco` `lib/layerwrapper.py`): the windows are split in consecutive pools of
``pool_size`` windows; ``LinearStats.pool_cov`` is the average over pools of the within-pool
unbiased covariance of x and ``pool_mean`` the average of the pool means. They are reduced in one
pass (a per-token weighted XᵀX plus per-pool sums; pool sizes come from the token mask up front).
Without ``pool_size`` nothing is computed or stored for them (the default for every existing
method: same results, memory and speed). Methods ask for them with a ``stats_pool_size``
attribute (`sequential_compress` reads it).

Weights used in the calibration forward: compressed projections are `base + decompress(delta)`,
projections not yet compressed are the fine-tune's, other leaves (norms, embeddings) are what the
compressed checkpoint will hold (`base + kept delta`, or the base when the rule drops them).
Everything under jit with fixed shapes (one compile per layer shape and tap), so it runs the same
on CPU, GPU or TPU; nothing is pulled to the host inside the loops.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from deltajax import data
from deltajax import model as M
from deltajax.containers import DeltaLeaf, LinearStats, compress_leaf
from deltajax.ops import DeltaWeight
from deltajax.progress import bar as tqdm  # process 0 only
from deltajax.tree import flatten, rule_for

_HI = jax.lax.Precision.HIGHEST

# (tap name, projections reading that input), in true-sequential order
# (fused Phi-3 qkv_proj / gate_up_proj read the same inputs as their parts)
SUBBLOCKS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.qkv_proj")),
    ("o", ("self_attn.o_proj",)),
    ("gate_up", ("mlp.gate_proj", "mlp.up_proj", "mlp.gate_up_proj")),
    ("down", ("mlp.down_proj",)),
)


def layer_projections(lp: dict, projs) -> list[str]:
    """The names of `projs` ("self_attn.q_proj", ...) that layer params `lp` has."""
    def has(path):
        node = lp
        for k in path.split("."):
            if not isinstance(node, dict) or k not in node:
                return False
            node = node[k]
        return True
    return [p for p in projs if has(p)]


def _zero_sums(k: int):
    z = jnp.zeros((k,), jnp.float32)
    return (jnp.zeros((k, k), jnp.float32), z, z, jnp.zeros((), jnp.float32))


def _add_sums(sums, x, tmask):
    """Add a batch of inputs x (b, t, k) with token mask (b, t) to raw sums."""
    xtx, s1, s2, n = sums
    xf = x.astype(jnp.float32).reshape(-1, x.shape[-1])
    m = tmask.reshape(-1, 1).astype(jnp.float32)
    xf = xf * m
    return (xtx + jnp.matmul(xf.T, xf, precision=_HI), s1 + xf.sum(0), s2 + (xf * xf).sum(0),
            n + m.sum())


def finalize(sums) -> LinearStats:
    xtx, s1, s2, n = sums
    nn = jnp.maximum(n, 1.0)
    return LinearStats(hessian=2.0 / nn * xtx, mean=s1 / nn, sq=s2 / nn, count=n)


def linear_stats(x: jax.Array, token_mask: jax.Array | None = None) -> LinearStats:
    """Statistics of one array of inputs (..., k) (tests, small problems)."""
    x3 = x.reshape(1, -1, x.shape[-1])
    m = jnp.ones(x3.shape[:2], bool) if token_mask is None else token_mask.reshape(1, -1)
    return finalize(_add_sums(_zero_sums(x.shape[-1]), x3, m))


# ------------------------------------------------------------------- pooled statistics (opt-in)


def pool_plan(token_mask, pool_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pools of consecutive windows: (pool id per window (N,), real tokens per pool (P,)).

    The last pool holds the remainder when N is not a multiple of `pool_size`.
    """
    if int(pool_size) < 1:
        raise ValueError(f"pool_size must be a positive number of windows, got {pool_size}")
    tm = np.asarray(token_mask, bool)
    ids = np.arange(tm.shape[0]) // int(pool_size)
    counts = np.bincount(ids, weights=tm.sum(1), minlength=int(ids.max()) + 1)
    return ids.astype(np.int32), counts.astype(np.float64)


def _pool_weights(pool_ids, counts) -> tuple[np.ndarray, np.ndarray]:
    """Per-window token weight 1/(P·(n_p−1)) and per-pool coefficient n_p/((n_p−1)·P).

    Pools with fewer than 2 tokens have no covariance and are left out (P counts the others).
    """
    ok = counts >= 2
    p_eff = max(int(ok.sum()), 1)
    wpool = np.where(ok, 1.0 / (p_eff * np.maximum(counts - 1, 1)), 0.0)
    coef = np.where(ok, counts / (np.maximum(counts - 1, 1) * p_eff), 0.0)
    return wpool[pool_ids].astype(np.float32), coef.astype(np.float32)


def _zero_pool_sums(k: int, num_pools: int):
    return (jnp.zeros((k, k), jnp.float32), jnp.zeros((num_pools, k), jnp.float32))


def _add_pool_sums(psums, x, tmask, pool_ids, wtok):
    """Add a batch (b, t, k) to the pooled sums: Σ w_p·x xᵀ and per-pool Σ x."""
    wxtx, s1p = psums
    xf = x.astype(jnp.float32) * tmask[..., None].astype(jnp.float32)
    ws = (wtok[:, None, None] * xf).reshape(-1, x.shape[-1])
    s1p = s1p.at[pool_ids].add(xf.sum(1))
    return (wxtx + jnp.matmul(ws.T, xf.reshape(-1, x.shape[-1]), precision=_HI), s1p)


def _finalize_pooled(st: LinearStats, psums, counts, coef) -> LinearStats:
    """Σ_pool = Σ_t w_t x xᵀ − Σ_p coef_p μ_p μ_pᵀ; μ_pool = mean over (non-empty) pools of μ_p."""
    wxtx, s1p = psums
    cnt = jnp.asarray(counts, jnp.float32)
    mu = s1p / jnp.maximum(cnt, 1.0)[:, None]
    c = jnp.asarray(coef, jnp.float32)
    cov = wxtx - jnp.matmul(mu.T * c, mu, precision=_HI)
    cov = 0.5 * (cov + cov.T)
    used = (cnt >= 2).astype(jnp.float32)
    pmean = (used[:, None] * mu).sum(0) / jnp.maximum(used.sum(), 1.0)
    return st.replace(pool_cov=cov, pool_mean=pmean)


def pooled_linear_stats(x: jax.Array, token_mask: jax.Array | None = None, *,
                        pool_size: int = 32) -> LinearStats:
    """`linear_stats` of inputs x (N windows, L, k) plus Bolaco's pooled statistics (tests)."""
    if x.ndim != 3:
        raise ValueError(f"pooled statistics need inputs (windows, tokens, k), got {x.shape}")
    tm = jnp.ones(x.shape[:2], bool) if token_mask is None else jnp.asarray(token_mask, bool)
    ids, counts = pool_plan(tm, pool_size)
    wtok, coef = _pool_weights(ids, counts)
    st = finalize(_add_sums(_zero_sums(x.shape[-1]), x, tm))
    ps = _add_pool_sums(_zero_pool_sums(x.shape[-1], len(counts)), x, tm, jnp.asarray(ids),
                        jnp.asarray(wtok))
    return _finalize_pooled(st, ps, counts, coef)


# ------------------------------------------------------------------------------ calibration data


def calibration_windows(tok, path=None, *, num_windows: int = 64, seq_len: int = 256,
                        split: str = "train") -> np.ndarray:
    """`num_windows` windows of `seq_len` tokens of a text file (jsonl or raw), int32 (n, L).

    GSM8K-style jsonl files use the `split` rule of `deltajax.data` (the held-out problems are
    never used for calibration). Default file: the GSM8K training split.
    """
    path = path or data.default_file("gsm8k_train")
    return data.token_windows(tok, data.read_texts(path, split=split), seq_len, num_windows)


# ------------------------------------------------------------------------------- layer forwards


def _masks(cfg, b, t, token_mask, kind=None):
    positions = jnp.maximum(jnp.cumsum(token_mask, axis=1, dtype=jnp.int32) - 1, 0)
    amask = M._attn_mask(cfg, jnp.arange(t), jnp.arange(t), token_mask, kind)
    return positions, amask


@functools.partial(jax.jit, static_argnames=("cfg", "tap", "kind"))
def _tap_sums(cfg, lp, h, token_mask, sums, tap, kind=None):
    positions, amask = _masks(cfg, *h.shape[:2], token_mask, kind)
    taps: dict = {}
    M.decoder_layer(cfg, lp, h, positions, amask, taps=taps, kind=kind)
    return _add_sums(sums, taps[tap], token_mask)


@functools.partial(jax.jit, static_argnames=("cfg", "tap_list", "kind"))
def _all_tap_sums(cfg, lp, h, token_mask, sums, tap_list, kind=None):
    positions, amask = _masks(cfg, *h.shape[:2], token_mask, kind)
    taps: dict = {}
    M.decoder_layer(cfg, lp, h, positions, amask, taps=taps, kind=kind)
    return tuple(_add_sums(s, taps[t], token_mask) for s, t in zip(sums, tap_list))


@functools.partial(jax.jit, static_argnames=("cfg", "tap_list", "kind"))
def _all_tap_pool_sums(cfg, lp, h, token_mask, sums, psums, pool_ids, wtok, tap_list,
                       kind=None):
    positions, amask = _masks(cfg, *h.shape[:2], token_mask, kind)
    taps: dict = {}
    M.decoder_layer(cfg, lp, h, positions, amask, taps=taps, kind=kind)
    return (tuple(_add_sums(s, taps[t], token_mask) for s, t in zip(sums, tap_list)),
            tuple(_add_pool_sums(p, taps[t], token_mask, pool_ids, wtok)
                  for p, t in zip(psums, tap_list)))


@functools.partial(jax.jit, static_argnames=("cfg", "kind"))
def _layer_out(cfg, lp, h, token_mask, kind=None):
    positions, amask = _masks(cfg, *h.shape[:2], token_mask, kind)
    return M.decoder_layer(cfg, lp, h, positions, amask, kind=kind)[0]


def _batches(n: int, batch_size: int):
    for s in range(0, n, batch_size):
        yield slice(s, min(s + batch_size, n))


def capture_layer_stats(cfg, lp, hidden, token_mask, *, taps: Sequence[str],
                        batch_size: int = 8, pool_size: int | None = None,
                        kind: str | None = None) -> dict[str, LinearStats]:
    """{tap: LinearStats} of layer `lp`'s linear inputs over all windows of `hidden` (N, L, D).

    kind: the layer's attention kind (`cfg.layer_kind(i)`; needed where the model mixes kinds).
    pool_size: also reduce Bolaco's pooled statistics over pools of this many windows
    (`LinearStats.pool_cov` / `pool_mean`); None (default): not computed.
    """
    n = hidden.shape[0]
    dims = {"qkv": cfg.hidden_size, "o": cfg.num_attention_heads * cfg.head_dim,
            "gate_up": cfg.hidden_size, "down": cfg.intermediate_size}
    sums = tuple(_zero_sums(dims[t]) for t in taps)
    if pool_size is None:
        for sl in _batches(n, batch_size):
            sums = _all_tap_sums(cfg, lp, hidden[sl], token_mask[sl], sums, tuple(taps), kind)
        return {t: finalize(s) for t, s in zip(taps, sums)}
    ids, counts = pool_plan(token_mask, pool_size)
    wtok, coef = _pool_weights(ids, counts)
    ids, wtok = jnp.asarray(ids), jnp.asarray(wtok)
    psums = tuple(_zero_pool_sums(dims[t], len(counts)) for t in taps)
    for sl in _batches(n, batch_size):
        sums, psums = _all_tap_pool_sums(cfg, lp, hidden[sl], token_mask[sl], sums, psums,
                                         ids[sl], wtok[sl], tuple(taps), kind)
    return {t: _finalize_pooled(finalize(s), p, counts, coef)
            for t, s, p in zip(taps, sums, psums)}


def layer_forward(cfg, lp, hidden, token_mask, *, batch_size: int = 8,
                  kind: str | None = None) -> jax.Array:
    return jnp.concatenate([_layer_out(cfg, lp, hidden[sl], token_mask[sl], kind)
                            for sl in _batches(hidden.shape[0], batch_size)])


# --------------------------------------------------------------------------- sequential compress


def _set(tree: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        tree = tree[p]
    tree[parts[-1]] = value


def _get(tree: dict, dotted: str):
    for p in dotted.split("."):
        tree = tree[p]
    return tree


def _copy_layer(lp):
    return jax.tree.map(lambda x: x, lp)


def _dense(base_w, leaf: DeltaLeaf):
    return (base_w.astype(jnp.float32) + leaf.decompress()).astype(base_w.dtype)


def _calib_weight(base_w, leaf: DeltaLeaf):
    """Weight of a compressed projection in the calibration forward: dense base + Δ̂, or, for a
    container that cannot be merged into a bias-free weight (``method.mergeable`` False, e.g. an
    output bias), the base with the delta applied on the fly."""
    if leaf.method.mergeable:
        return _dense(base_w, leaf)
    return DeltaWeight(base=base_w, delta=leaf)


def sequential_compress(
    base: Mapping,
    finetuned: Mapping,
    cfg: M.ModelConfig,
    tokens: np.ndarray | jax.Array,
    rules: Iterable,
    *,
    token_mask: np.ndarray | jax.Array | None = None,
    key: jax.Array | None = None,
    batch_size: int = 8,
    true_sequential: bool = True,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    on_stats: Callable[[str, LinearStats], None] | None = None,
    deltas: Mapping | None = None,
    pool_size: int | None = None,
) -> dict[str, DeltaLeaf]:
    """Compress the delta finetuned − base leaf by leaf, calibrating methods that need statistics.

    Args:
      base, finetuned: params trees of the same config (checked by the caller, e.g. `extract`).
      tokens: (N, L) int calibration windows; token_mask (N, L) marks real tokens (default all).
      rules: `deltajax.delta.Rule`s; methods with `needs_stats` get `stats=LinearStats` of their
        input, the others are compressed data-free up front.
      key: PRNG key (per-leaf keys are folded from the name, as in `compress_tree`).
      batch_size: windows per forward (memory: one layer's activations for this many windows).
      true_sequential: calibrate [q,k,v] → [o] → [gate,up] → [down] in order on inputs recomputed
        with the compressed sub-blocks (else one capture per layer).
      on_stats: optional callback(name_prefix, stats) e.g. to keep statistics for analysis.
      deltas: the already extracted fp32 deltas (`delta.extract`), if the caller has them (else
        each leaf's delta is computed when it is compressed).
      pool_size: also capture pooled statistics over pools of this many windows; default: the
        ``stats_pool_size`` a calibrated rule's method asks for (None for most methods: not
        computed).

    Returns {name: DeltaLeaf} for every leaf whose rule compresses it (like `compress_tree`).
    """
    rules = list(rules)
    key = jax.random.PRNGKey(0) if key is None else key
    log = log or (lambda s: None)
    tokens = jnp.asarray(tokens, jnp.int32)
    tmask = (jnp.ones(tokens.shape, bool) if token_mask is None
             else jnp.asarray(token_mask, bool))
    fb, ff = flatten(base), flatten(finetuned)
    out: dict[str, DeltaLeaf] = {}

    fd = None if deltas is None else flatten(deltas)

    def delta_of(name):
        if fd is not None:
            return fd[name]
        return ff[name].astype(jnp.float32) - fb[name].astype(jnp.float32)

    # 1) data-free leaves first (everything whose method does not need statistics)
    calibrated = []
    for name in fb:
        r = rule_for(name, rules)
        if r is None or r.method is None:
            continue
        if r.method.needs_stats:
            calibrated.append(name)
        else:
            out[name] = compress_leaf(r.method, name, delta_of(name), key=key)
    log(f"[calibrate] {len(out)} leaves data-free, {len(calibrated)} calibrated")
    if calibrated and cfg.num_experts:
        raise ValueError(
            f"calibrated methods are not implemented for mixture-of-experts models "
            f"({cfg.model_type}: expert inputs depend on the routing); use a data-free method "
            f"for {calibrated[:2]} ...")

    # the model the calibration runs: compressed where known, fine-tune elsewhere
    def current(name):
        if name in out:
            return _calib_weight(fb[name], out[name])
        # not yet compressed: the fine-tune; never compressed (no rule): the base, as in `merge`
        return ff[name] if name in cal_set else fb[name]

    cal_set = set(calibrated)
    if pool_size is None:
        asked = {rule_for(n, rules).method.stats_pool_size for n in calibrated}
        asked.discard(None)
        if len(asked) > 1:
            raise ValueError(f"calibrated rules ask for different stats_pool_size {sorted(asked)}; "
                             "pass pool_size= explicitly")
        pool_size = asked.pop() if asked else None
    cur_top = jax.tree.map(lambda x: x, {k: v for k, v in finetuned.items() if k != "layers"})
    for name in fb:
        if not name.startswith("layers."):
            _set(cur_top, name, current(name))
    hidden = M.embed(cur_top, tokens, cfg=cfg)
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.num_hidden_layers), desc="calibrate+compress", unit="layer",
               disable=not progress)
    for i in bar:
        prefix = f"layers.{i}."
        lp = _copy_layer(finetuned["layers"][i])
        for name in fb:
            if name.startswith(prefix):
                _set(lp, name[len(prefix):], current(name))
        groups = [(tap, [p for p in projs if f"{prefix}{p}.weight" in cal_set])
                  for tap, projs in SUBBLOCKS]
        groups = [(t, ps) for t, ps in groups if ps]
        if true_sequential:
            for tap, projs in groups:
                st = capture_layer_stats(cfg, lp, hidden, tmask, taps=(tap,),
                                         batch_size=batch_size, pool_size=pool_size,
                                         kind=cfg.layer_kind(i))[tap]
                _compress_group(lp, prefix, projs, st, rules, delta_of, fb, out, key, on_stats)
        elif groups:
            stats = capture_layer_stats(cfg, lp, hidden, tmask, taps=[t for t, _ in groups],
                                        batch_size=batch_size, pool_size=pool_size,
                                        kind=cfg.layer_kind(i))
            for tap, projs in groups:
                _compress_group(lp, prefix, projs, stats[tap], rules, delta_of, fb, out, key,
                                on_stats)
        hidden = layer_forward(cfg, lp, hidden, tmask, batch_size=batch_size,
                               kind=cfg.layer_kind(i))
        if progress:
            bar.set_postfix(s=f"{time.perf_counter() - t0:.0f}")
    leftovers = [n for n in calibrated if n not in out]
    if leftovers:
        raise ValueError("calibrated rules matched leaves outside the decoder projections (no "
                         f"calibration input is captured for them): {leftovers[:4]}")
    return {n: out[n] for n in fb if n in out}


def _compress_group(lp, prefix, projs, st, rules, delta_of, fb, out, key, on_stats):
    if on_stats is not None:
        on_stats(prefix + "+".join(p.split(".")[-1] for p in projs), st)
    for p in projs:
        name = f"{prefix}{p}.weight"
        r = rule_for(name, rules)
        out[name] = compress_leaf(r.method, name, delta_of(name), key=key, stats=st)
        _set(lp, f"{p}.weight", _calib_weight(fb[name], out[name]))


def collect_stats(params: Mapping, cfg: M.ModelConfig, tokens, *, token_mask=None,
                  batch_size: int = 8, progress: bool = False,
                  pool_size: int | None = None) -> dict[str, LinearStats]:
    """Input statistics of every projection of `params` (run as is), keyed by weight name.

    Projections sharing an input (q/k/v, gate/up) share one `LinearStats`. Used to measure the
    layer-output error of compressed deltas on held-out text (`eval.output_errors`), and as
    one-pass (not sequential) calibration statistics. pool_size: also Bolaco's pooled statistics.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    tmask = jnp.ones(tokens.shape, bool) if token_mask is None else jnp.asarray(token_mask, bool)
    hidden = M.embed(params, tokens, cfg=cfg)
    out = {}
    for i in tqdm(range(cfg.num_hidden_layers), desc="statistics", unit="layer",
                  disable=not progress):
        lp = params["layers"][i]
        # MoE layers: no statistics for the experts (their inputs depend on the routing)
        taps = tuple(t for t, projs in SUBBLOCKS if layer_projections(lp, projs))
        st = capture_layer_stats(cfg, lp, hidden, tmask, taps=taps, batch_size=batch_size,
                                 pool_size=pool_size, kind=cfg.layer_kind(i))
        for tap, projs in SUBBLOCKS:
            for p in layer_projections(lp, projs):
                out[f"layers.{i}.{p}.weight"] = st[tap]
        hidden = layer_forward(cfg, lp, hidden, tmask, batch_size=batch_size,
                               kind=cfg.layer_kind(i))
    return out
