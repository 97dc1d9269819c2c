"""Rank allocation across projection types by Bayesian optimization under a byte budget (Bolaco).

Paper: Bolaco (arXiv 2405.10616); code followed: `Dereck0602/Bolaco` `main_bbo.py` (openbox
GP optimizer over per-type kept ratios, the same in all layers, under a parameter constraint;
objective = held-out perplexity + 1e-3·KL to the original logits). Here:

* variables: one multiplier ρ_g per group of projection types, relative to the uniform rank at
  the target ratio α (log-uniform in [low, high]); default groups ``DEFAULT_GROUPS``:
  ρ_qk (q and k share, as in Bolaco), ρ_v, ρ_o, ρ_gate, ρ_up, ρ_down. Bolaco never compresses
  v_proj for weights; a delta compresses all seven, so v gets its own variable;
* budget: the exact stored bytes (bf16 factors, plus the bias in the pooled mode) of the
  uniform allocation at α. Each sample is *rescaled* to the budget: ranks
  r = clip(⌊c·ρ_g·α·nk/(n+k)⌋, 1, r_cap) with the largest c whose bytes fit (bisection), so every
  trial is feasible and spends (nearly) the whole budget; ρ is therefore scale-free;
* the uniform point (all ρ = 1, exactly the uniform ranks) is enqueued as the first trial, so
  the search returns it or something better on its objective;
* sampler: optuna's GPSampler (Gaussian-process BO; "tpe" and "random" also), seeded; objective
  values are memoized per rank allocation (different ρ often round to the same ranks).

Cheap trials: the eigenbasis of each matrix does not depend on the rank, so `factorize` computes
it once (kept to r_cap columns) and a trial only truncates it. `LMObjective` keeps every trial at
the same array shapes (columns ≥ r zeroed), so the model's forward compiles once.

Deliberate differences from the code: optuna instead of the vendored openbox; budget in true
bytes with rescaling instead of a constraint band on parameter counts; ρ relative to the uniform
rank (any per-type ratio is reachable) instead of absolute kept ratios in [0.2, 1].
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from deltajax import methods as methods_lib
from deltajax import model as M
from deltajax.containers import SCALE_DTYPES, DeltaLeaf
from deltajax.methods.featlowrank import FeatureLowRank, eigenbasis, factors
from deltajax.ops import DeltaWeight
from deltajax.tree import PROJ_PATTERN, PROJECTIONS, Rule, flatten, map_with_names

TYPES = PROJECTIONS
DEFAULT_GROUPS: dict[str, tuple[str, ...]] = {
    "qk": ("q_proj", "k_proj"), "v": ("v_proj",), "o": ("o_proj",), "gate": ("gate_proj",),
    "up": ("up_proj",), "down": ("down_proj",),
}


def proj_type(name: str) -> str:
    """'layers.3.self_attn.q_proj.weight' -> 'q_proj' (ValueError for other leaves)."""
    m = re.search(r"(\w+_proj)\.weight$", name)
    if m is None or m.group(1) not in TYPES:
        raise ValueError(f"{name!r} is not a decoder projection weight ({TYPES})")
    return m.group(1)


def _group_of(groups: Mapping[str, Sequence[str]]) -> dict[str, str]:
    out = {}
    for g, ts in groups.items():
        for t in ts:
            if t in out:
                raise ValueError(f"projection type {t!r} is in two groups ({out[t]!r}, {g!r})")
            out[t] = g
    return out


# ------------------------------------------------------------------------------------ budget


def matrix_bytes(n: int, k: int, r: int, *, bias: bool, itemsize: int = 2) -> int:
    """Stored bytes of one FeatureLowRank container: u (n, r), v (r, k) (+ bias (n,))."""
    return itemsize * (r * (n + k) + (n if bias else 0))


def total_bytes(shapes: Mapping[str, tuple[int, int]], ranks: Mapping[str, int], *,
                bias: bool, itemsize: int = 2) -> int:
    return sum(matrix_bytes(*shapes[nm], ranks[nm], bias=bias, itemsize=itemsize)
               for nm in shapes)


def uniform_ranks(shapes: Mapping[str, tuple[int, int]], ratio: float) -> dict[str, int]:
    """The uniform allocation at ratio α (`FeatureLowRank(ratio=α).rank_for`, = LowRank's)."""
    m = FeatureLowRank(ratio=ratio)
    return {nm: m.rank_for(*s) for nm, s in shapes.items()}


def allocate(shapes: Mapping[str, tuple[int, int]], rho: Mapping[str, float], *, ratio: float,
             budget: int, groups: Mapping[str, Sequence[str]] = DEFAULT_GROUPS,
             r_cap: Mapping[str, int] | None = None, bias: bool = False,
             itemsize: int = 2) -> dict[str, int]:
    """Ranks r = clip(⌊c·ρ_g·α·nk/(n+k)⌋, 1, cap) with the largest c whose bytes fit `budget`.

    Raises ValueError if even rank 1 everywhere exceeds the budget, or a type has no group.
    """
    names = list(shapes)
    gof = _group_of(groups)
    missing = sorted({proj_type(nm) for nm in names} - set(gof))
    if missing:
        raise ValueError(f"projection types {missing} are in no group of {sorted(groups)}")
    n = np.array([shapes[nm][0] for nm in names], np.float64)
    k = np.array([shapes[nm][1] for nm in names], np.float64)
    base = ratio * 16 * n * k / ((n + k) * 16)  # exactly `budget_rank`'s float (uniform: c=1)
    w = np.array([float(rho[gof[proj_type(nm)]]) for nm in names]) * base
    cap = np.minimum(n, k) if r_cap is None else np.array([r_cap[nm] for nm in names], np.float64)
    per_rank = itemsize * (n + k)
    fixed = itemsize * n.sum() if bias else 0.0

    def ranks_at(c):
        return np.clip(np.floor(c * w), 1, cap)

    def bytes_at(c):
        return fixed + float((ranks_at(c) * per_rank).sum())

    if bytes_at(0.0) > budget:
        raise ValueError(f"budget {budget} B is below rank 1 for every matrix ({bytes_at(0.0):.0f}"
                         " B)")
    lo, hi = 0.0, 1.0
    while bytes_at(hi) <= budget and hi < 1e6:
        lo, hi = hi, hi * 2
        if np.all(ranks_at(lo) >= cap):
            break
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if bytes_at(mid) <= budget:
            lo = mid
        else:
            hi = mid
    r = ranks_at(lo).astype(int)
    return {nm: int(x) for nm, x in zip(names, r)}


def ranks_by_type(ranks: Mapping[str, int]) -> dict[str, list[int]]:
    """{type: sorted distinct ranks} (one value per type when all layers share shapes)."""
    out: dict[str, set] = {}
    for nm, r in ranks.items():
        out.setdefault(proj_type(nm), set()).add(int(r))
    return {t: sorted(v) for t, v in sorted(out.items(), key=lambda kv: TYPES.index(kv[0]))}


# ---------------------------------------------------------------------------- factorization


@dataclasses.dataclass
class Factorization:
    """Per-matrix eigenbases (top r_cap eigenvectors of Σ_y) of a set of projection deltas."""

    method: FeatureLowRank
    deltas: dict[str, jax.Array]
    basis: dict[str, jax.Array]
    mu: dict[str, jax.Array | None]
    r_cap: dict[str, int]

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        return {nm: tuple(d.shape) for nm, d in self.deltas.items()}

    @property
    def bias(self) -> bool:
        return self.method.mode == "pooled"

    @property
    def itemsize(self) -> int:
        return jnp.dtype(SCALE_DTYPES[self.method.dtype]).itemsize

    def with_cap(self, ratio: float, max_factor: float = 8.0) -> Factorization:
        """The same bases kept to r_cap = min(n, k, ⌈max_factor·uniform rank at `ratio`⌉)
        (no recomputation; trials at a smaller budget then run at smaller shapes)."""
        uni = uniform_ranks(self.shapes, ratio)
        cap = {nm: int(min(*self.shapes[nm], math.ceil(max_factor * uni[nm]))) for nm in uni}
        bad = [nm for nm in cap if cap[nm] > self.r_cap[nm]]
        if bad:
            raise ValueError(f"{bad[0]}: cap {cap[bad[0]]} exceeds the stored basis width "
                             f"{self.r_cap[bad[0]]}; factorize with a larger ratio/max_factor")
        return Factorization(method=self.method, deltas=self.deltas,
                             basis={nm: u[:, :cap[nm]] for nm, u in self.basis.items()},
                             mu=self.mu, r_cap=cap)


@functools.partial(jax.jit, static_argnames=("mode", "r_cap"))
def _basis(d, stats, mode, r_cap):
    u, _, mu = eigenbasis(d, stats, mode)
    return u[:, :r_cap], mu


def factorize(deltas: Mapping, stats: Mapping, method: FeatureLowRank, *, ratio: float,
              max_factor: float = 8.0, names: Sequence[str] | None = None,
              r_cap: Mapping[str, int] | None = None, progress: bool = True,
              log: Callable[[str], None] | None = print) -> Factorization:
    """Eigenbases of every projection delta, once (rank-independent).

    Args:
      deltas: params-shaped tree or {name: Δ} of fp32 deltas.
      stats: {name: LinearStats} of each projection's inputs (e.g. `calibrate.collect_stats`,
        with `pool_size` for the pooled mode).
      method: the FeatureLowRank whose mode / dtype the search uses (its rank is ignored).
      ratio: target α; each basis keeps r_cap = min(n, k, ⌈max_factor·uniform rank⌉) columns,
        the most any allocation may give that matrix (or `r_cap` {name: width} given).
    """
    flat = flatten(deltas)
    names = [nm for nm in flat if re.search(PROJ_PATTERN, nm)] if names is None else list(names)
    missing = [nm for nm in names if nm not in stats]
    if missing:
        raise ValueError(f"no statistics for {len(missing)} projections, e.g. {missing[0]}")
    uni = uniform_ranks({nm: tuple(flat[nm].shape) for nm in names}, ratio)
    out = Factorization(method=method, deltas={}, basis={}, mu={}, r_cap={})
    t0 = time.perf_counter()
    for i, nm in enumerate(names):
        d = jnp.asarray(flat[nm], jnp.float32)
        n, k = d.shape
        cap = int(min(n, k, math.ceil(max_factor * uni[nm]) if r_cap is None else r_cap[nm]))
        out.deltas[nm] = d
        out.basis[nm], out.mu[nm] = _basis(d, stats[nm], method.mode, cap)
        out.r_cap[nm] = cap
        if progress and log is not None and (i + 1) % 35 == 0:
            log(f"[factorize] {i + 1}/{len(names)} matrices, {time.perf_counter() - t0:.0f} s")
    return out


@functools.partial(jax.jit, static_argnames=("dtype",))
def _masked_factors(d, u, mu, r, dtype):
    return factors(d, u, mu, r, SCALE_DTYPES[dtype])


def masked_containers(fact: Factorization, ranks: Mapping[str, int]) -> dict[str, DeltaLeaf]:
    """Rank-r containers at fixed (r_cap) shapes: columns ≥ r are zero (for fast trials)."""
    out = {}
    for nm, d in fact.deltas.items():
        r = int(ranks[nm])
        if r > fact.r_cap[nm]:
            raise ValueError(f"rank {r} of {nm} exceeds its basis width {fact.r_cap[nm]}")
        c = _masked_factors(d, fact.basis[nm], fact.mu[nm], jnp.int32(r), fact.method.dtype)
        out[nm] = DeltaLeaf(container=c, method=fact.method, shape=tuple(d.shape))
    return out


def compress_with_ranks(fact: Factorization, ranks: Mapping[str, int]) -> dict[str, DeltaLeaf]:
    """Exact-rank containers (the real stored arrays) for an allocation; each leaf's method is
    FeatureLowRank(rank=r, ...) so checkpoints record the rank."""
    out = {}
    dt = SCALE_DTYPES[fact.method.dtype]
    for nm, d in fact.deltas.items():
        r = int(ranks[nm])
        if r > fact.r_cap[nm]:
            raise ValueError(f"rank {r} of {nm} exceeds its basis width {fact.r_cap[nm]}")
        m = dataclasses.replace(fact.method, rank=r)
        c = factors(d, fact.basis[nm], fact.mu[nm], r, dt)
        out[nm] = DeltaLeaf(container=c, method=m, shape=tuple(d.shape))
    return out


def allocation_rules(ranks: Mapping[str, int], method: FeatureLowRank, *,
                     keep_other: bool = True) -> tuple[Rule, ...]:
    """Rules giving each projection type its searched rank (e.g. for `sequential_compress`).

    Requires one rank per type (all layers share shapes, as in every Llama-family model).
    """
    by = ranks_by_type(ranks)
    bad = {t: r for t, r in by.items() if len(r) != 1}
    if bad:
        raise ValueError(f"types with several ranks cannot become per-type rules: {bad}")
    rules = [Rule(rf"(^|\.){t}\.weight$", dataclasses.replace(method, rank=r[0]))
             for t, r in by.items()]
    return tuple(rules) + methods_lib.default_rules(method, keep_other=keep_other)[1:]


# ----------------------------------------------------------------------------- LM objective


@functools.partial(jax.jit, static_argnames=("cfg",))
def _ref_logprobs(params, tokens, cfg):
    logits, _ = M.forward(params, tokens, cfg)
    return jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _nll_kl(params, tokens, ref_lp, cfg):
    logits, _ = M.forward(params, tokens, cfg)
    lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1)[..., 0]
    kl = jnp.sum(jnp.exp(ref_lp) * (ref_lp - lp), axis=-1)
    return jnp.sum(nll), jnp.sum(kl), jnp.asarray(nll.size, jnp.float32)


class LMObjective:
    """objective(ranks) = ppl + kl_weight·KL(reference ‖ compressed) on fixed token windows.

    Args:
      base: base params with the non-projection deltas already applied (e.g. `delta.merge` of
        the kept leaves), so only the projections change between trials.
      cfg: model config. fact: `factorize` result. tokens: (n, L) windows (held out from the
        calibration text). reference: params of the fine-tune (its logits are the KL target).
      batch_size: windows per forward.
    """

    def __init__(self, base, cfg, fact: Factorization, tokens, reference, *,
                 kl_weight: float = 1e-3, batch_size: int = 4):
        self.base, self.cfg, self.fact, self.kl_weight = base, cfg, fact, kl_weight
        toks = np.asarray(tokens, np.int32)
        if toks.shape[0] % batch_size:
            raise ValueError(f"objective windows ({toks.shape[0]}) must be a multiple of "
                             f"batch_size ({batch_size})")
        self.batches = [jnp.asarray(toks[s:s + batch_size])
                        for s in range(0, toks.shape[0], batch_size)]
        self.ref = [_ref_logprobs(reference, b, cfg) for b in self.batches]

    def evaluate(self, ranks: Mapping[str, int]) -> dict:
        comp = masked_containers(self.fact, ranks)  # projections only: applied on the fly
        params = map_with_names(
            lambda n, w: DeltaWeight(base=w, delta=comp[n]) if n in comp else w, self.base)
        nll = kl = cnt = 0.0
        for b, ref in zip(self.batches, self.ref):
            a, k, c = _nll_kl(params, b, ref, self.cfg)
            nll, kl, cnt = nll + float(a), kl + float(k), cnt + float(c)
        ppl = math.exp(nll / cnt)
        return {"ppl": ppl, "kl": kl / cnt, "objective": ppl + self.kl_weight * kl / cnt}

    def __call__(self, ranks: Mapping[str, int]) -> float:
        return self.evaluate(ranks)["objective"]


# ------------------------------------------------------------------------------------ search


@dataclasses.dataclass
class SearchResult:
    rho: dict[str, float]  # best multipliers per group
    ranks: dict[str, int]  # best allocation per matrix
    objective: float
    uniform_ranks: dict[str, int]
    uniform_objective: float
    budget_bytes: int
    bytes: int  # of the best allocation
    trials: list[dict]  # number, rho, ranks_by_type, objective, bytes, seconds
    seconds: float

    @property
    def ranks_by_type(self) -> dict[str, list[int]]:
        return ranks_by_type(self.ranks)


def _sampler(name: str, seed: int, n_startup: int):
    import optuna

    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=n_startup)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"sampler must be 'gp', 'tpe' or 'random', got {name!r}")


def search(objective: Callable[[dict[str, int]], float], shapes: Mapping[str, tuple[int, int]],
           *, ratio: float, n_trials: int = 30, seed: int = 0,
           groups: Mapping[str, Sequence[str]] = DEFAULT_GROUPS, low: float = 0.25,
           high: float = 4.0, sampler: str = "gp", n_startup: int = 10,
           r_cap: Mapping[str, int] | None = None, bias: bool = False, itemsize: int = 2,
           log: Callable[[str], None] | None = print) -> SearchResult:
    """Minimize `objective(ranks)` over per-group multipliers under the uniform-α byte budget.

    The first trial is the uniform allocation (all ρ = 1). Deterministic for a fixed seed and a
    deterministic objective. Groups whose types do not occur in `shapes` are dropped.
    """
    import optuna

    if not 0 < low <= 1 <= high:
        raise ValueError(f"need 0 < low <= 1 <= high so that the uniform point is in the space, "
                         f"got [{low}, {high}]")
    present = {proj_type(nm) for nm in shapes}
    groups = {g: ts for g, ts in groups.items() if present & set(ts)}
    uni = uniform_ranks(shapes, ratio)
    if r_cap is not None:
        uni = {nm: min(r, r_cap[nm]) for nm, r in uni.items()}
    budget = total_bytes(shapes, uni, bias=bias, itemsize=itemsize)
    cache: dict[tuple, float] = {}
    trials: list[dict] = []
    t0 = time.perf_counter()

    def run(trial):
        rho = {g: trial.suggest_float(f"rho_{g}", low, high, log=True) for g in groups}
        ranks = allocate(shapes, rho, ratio=ratio, budget=budget, groups=groups, r_cap=r_cap,
                         bias=bias, itemsize=itemsize)
        key = tuple(ranks[nm] for nm in shapes)
        t1 = time.perf_counter()
        cached = key in cache
        if not cached:
            cache[key] = float(objective(ranks))
        val = cache[key]
        nbytes = total_bytes(shapes, ranks, bias=bias, itemsize=itemsize)
        rec = {"number": trial.number, "rho": rho, "ranks_by_type": ranks_by_type(ranks),
               "objective": val, "bytes": nbytes, "seconds": time.perf_counter() - t1,
               "cached": cached}
        trials.append(rec)
        trial.set_user_attr("ranks", list(key))
        if log is not None:
            best = min(t["objective"] for t in trials)
            rs = " ".join(f"{t.split('_')[0]}:{'/'.join(map(str, r))}"
                          for t, r in rec["ranks_by_type"].items())
            log(f"[bo] trial {trial.number + 1}/{n_trials} ranks {rs} bytes "
                f"{nbytes / budget:.3f}·budget objective {val:.4f} (best {best:.4f}) "
                f"{rec['seconds']:.1f} s{' (cached)' if cached else ''}")
        return val

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize",
                                sampler=_sampler(sampler, seed, min(n_startup, n_trials)))
    study.enqueue_trial({f"rho_{g}": 1.0 for g in groups})
    study.optimize(run, n_trials=n_trials)
    best = study.best_trial
    ranks = dict(zip(shapes, best.user_attrs["ranks"]))
    return SearchResult(
        rho={g: best.params[f"rho_{g}"] for g in groups}, ranks=ranks, objective=best.value,
        uniform_ranks=uni, uniform_objective=trials[0]["objective"], budget_bytes=budget,
        bytes=total_bytes(shapes, ranks, bias=bias, itemsize=itemsize), trials=trials,
        seconds=time.perf_counter() - t0)
