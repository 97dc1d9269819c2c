"""The delta steps, one public function each: extract, compress, attach, merge.

    deltas = extract(base, finetuned)                         # fp32 Δ per leaf, checked
    comp = compress(base, finetuned, RTN(bits=4))             # {name: DeltaLeaf}, packed
    comp = compress(base, finetuned, DeltaCoMe(), cfg=cfg, calib=tokens)   # calibrated
    comp = compress(base, finetuned, config, cfg=cfg, tokenizer=tok, mesh=mesh)  # run config
    comp = compress("/hf/base", "/hf/ft", RTN(bits=4))        # streamed, one tensor at a time
    params = attach(base, comp)                 # projections carry Δ, applied on the fly
    params = attach(base, [comp_a, comp_b], tenants=[0, 1, -1])   # one fine-tune per batch row
    params = attach(base, comp, mesh=mesh)      # tensor parallel (delta kernels under shard_map)
    dense = merge(base, comp)                   # plain arrays (for HF export)

Variants of a step are arguments of its one function: calibration (`calib=`), a device mesh
(`mesh=`), streaming from checkpoint directories (paths instead of params), many tenants
(a list of deltas + `tenants=`). Names are `deltajax.tree`'s dotted leaf names.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from deltajax import accounting, data
from deltajax.config import RunConfig, as_run_config
from deltajax.containers import DeltaLeaf, compress_leaf
from deltajax.errors import BudgetError, NonFiniteError
from deltajax.methods import Method, default_rules
from deltajax.ops import DeltaWeight
from deltajax.parallel import sharded
from deltajax.progress import bar as tqdm  # process 0 only
from deltajax.serve import multitenant
from deltajax.steps import calibrate
from deltajax.tree import Rule, flatten, is_linear, map_with_names, matrix_type, rule_for
from pallas_kernels.quant_matmul import mosaic_gpu as _mosaic_gpu


class DeltaError(ValueError):
    """Base and fine-tuned params (or a delta and its base) do not fit together."""


class NonFiniteDeltaError(DeltaError, NonFiniteError):
    """The delta of some leaves holds NaN/Inf (`name`: the first of them)."""


# -------------------------------------------------------------------------------------- extract


@jax.jit
def _sub(ft, base):
    return jax.tree.map(lambda a, b: a.astype(jnp.float32) - b.astype(jnp.float32), ft, base)


def check_pair(base, finetuned, *, base_cfg=None, ft_cfg=None) -> None:
    """Raise DeltaError listing every config field, key or shape that differs."""
    problems = []
    if base_cfg is not None and ft_cfg is not None and base_cfg != ft_cfg:
        a, b = dataclasses.asdict(base_cfg), dataclasses.asdict(ft_cfg)
        problems += [f"config.{k}: base {a[k]!r} vs fine-tune {b.get(k)!r}"
                     for k in a if a[k] != b.get(k)]
    fb, ff = flatten(base), flatten(finetuned)
    problems += [f"missing in fine-tune: {k}" for k in fb if k not in ff]
    problems += [f"extra in fine-tune: {k}" for k in ff if k not in fb]
    problems += [f"shape of {k}: base {tuple(fb[k].shape)} vs fine-tune {tuple(ff[k].shape)}"
                 for k in fb if k in ff and tuple(fb[k].shape) != tuple(ff[k].shape)]
    if problems:
        raise DeltaError("base and fine-tune do not match:\n  " + "\n  ".join(problems))


@jax.jit
def _leaf_stats(d):
    return jax.tree.map(lambda x: jnp.stack([jnp.all(x == 0), jnp.all(jnp.isfinite(x))]), d)


def delta_report(deltas) -> dict[str, list[str]]:
    """{'zero': leaves whose delta is exactly 0, 'nonfinite': leaves with NaN/Inf}."""
    stats = {k: np.asarray(v) for k, v in flatten(_leaf_stats(deltas)).items()}
    zero = [k for k, v in stats.items() if v[0]]
    bad = [k for k, v in stats.items() if not v[1]]
    return {"zero": zero, "nonfinite": bad}


def extract(base, finetuned, *, base_cfg=None, ft_cfg=None, allow_nonfinite: bool = False):
    """Δ = fine-tuned − base per leaf, in fp32 (the subtraction itself is jitted).

    Raises DeltaError on mismatched configs, keys or shapes, and on NaN/Inf deltas (listing the
    leaves) unless `allow_nonfinite`.
    """
    check_pair(base, finetuned, base_cfg=base_cfg, ft_cfg=ft_cfg)
    deltas = _sub(finetuned, base)
    rep = delta_report(deltas)
    if rep["nonfinite"] and not allow_nonfinite:
        raise NonFiniteDeltaError("NaN/Inf in the delta of: " + ", ".join(rep["nonfinite"]),
                                  name=rep["nonfinite"][0])
    return deltas


# ------------------------------------------------------------------------------------ compress


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Plan:
    rules: tuple
    method: Method | None  # the main (projection) method, for reports
    seed: int = 0
    keep_other: bool = True
    calib_windows: int = 0
    calib_seq_len: int = 256
    calib_data: str | None = None
    calib_batch_size: int = 8
    true_sequential: bool = True
    distill_steps: int = 0


def _plan(spec, keep_other: bool) -> _Plan:
    """A `Method`, a sequence of `Rule`s or a run config (`config.RunConfig`, or a mapping of
    its fields such as the rows of configs/eval_sweep.py) as one plan."""
    if isinstance(spec, Method):
        return _Plan(rules=tuple(default_rules(spec, keep_other=keep_other)), method=spec,
                     keep_other=keep_other)
    if isinstance(spec, (tuple, list)) and all(isinstance(r, Rule) for r in spec):
        methods = [r.method for r in spec if r.method is not None and r.method.on_the_fly]
        return _Plan(rules=tuple(spec), method=methods[0] if methods else None)
    if isinstance(spec, (RunConfig, Mapping)) or hasattr(spec, "to_dict"):
        c = as_run_config(spec, where="compress")
        m = c.method
        return _Plan(rules=tuple(default_rules(m, keep_other=c.keep_other)), method=m,
                     seed=c.seed, keep_other=c.keep_other,
                     calib_windows=c.calib_windows if m.needs_stats else 0,
                     calib_seq_len=c.calib_seq_len, calib_data=c.calib_data,
                     calib_batch_size=c.calib_batch_size, true_sequential=c.true_sequential,
                     distill_steps=c.distill_steps)
    raise TypeError(f"compress: expected a Method, a sequence of Rules or a RunConfig, got "
                    f"{type(spec).__name__}")


def check_budgets(method, shapes) -> None:
    """Refuse, before any weight is read, a budget some matrix of the model cannot meet.

    Args:
      method: what `compress` takes: a `Method`, a sequence of `Rule`s or a run config.
      shapes: a `ModelConfig` (its parameter shapes) or {leaf name: shape}.

    Raises:
      errors.BudgetError: naming the method, how many matrices fail, one of them with its shape,
        and the smallest ratio that works for every matrix (`min_ratio`).
    """
    from deltajax.io.params_ckpt import expected_shapes

    if not isinstance(shapes, Mapping):
        shapes = expected_shapes(shapes)
    rules = _plan(method, True).rules
    bad = []
    for name, shape in shapes.items():
        r = rule_for(name, rules)
        if r is None or r.method is None:
            continue
        try:
            r.method.validate(tuple(shape))
        except BudgetError as e:
            bad.append((name, tuple(shape), e))
    if not bad:
        return
    need = [e.min_ratio for _, _, e in bad if e.min_ratio is not None]
    worst = max(need) if len(need) == len(bad) else None
    if worst is not None:  # the example: the matrix needing the largest ratio
        bad.sort(key=lambda b: -b[2].min_ratio)
    name, shape, first = bad[0]
    raise BudgetError(f"{len(bad)} of the model's matrices cannot meet the budget, e.g. {name} "
                      f"{shape}: {first}", min_ratio=worst)


def _compress_tree(deltas, rules, *, key, stats=None, progress=True) -> dict[str, DeltaLeaf]:
    flat = flatten(deltas)
    out = {}
    for name, d in tqdm(flat.items(), desc="compress", disable=not progress, leave=False):
        r = rule_for(name, rules)
        if r is None or r.method is None:
            continue
        st = None if stats is None else stats.get(name)
        if r.method.needs_stats and st is None and not r.method.data_free_ok:
            raise ValueError(f"method {r.method.name!r} needs calibration statistics for {name}: "
                             "pass calib= (token windows) and cfg=")
        out[name] = compress_leaf(r.method, name, d, key=key, stats=st)
    return out


def _is_path(x) -> bool:
    return isinstance(x, (str, os.PathLike))


def compress(
    base, finetuned, method, *, cfg=None, calib=None, tokenizer=None, mesh=None,
    stats: Mapping | None = None, key: jax.Array | None = None, keep_other: bool = True,
    progress: bool = True, log: Callable[[str], None] | None = None,
) -> dict[str, DeltaLeaf]:
    """Compress the delta finetuned − base: the one compression door.

    Args:
      base, finetuned: params trees of one architecture (`load_model`), or two HF checkpoint
        directories (then data-free rules are streamed one tensor at a time: host memory stays
        near one tensor of each checkpoint plus the output).
      method: a `Method` (the projections; other leaves by `methods.default_rules`), a sequence
        of `tree.Rule`s, or a `config.RunConfig` (`configs/*.py`: ``method``, ``keep_other``,
        ``seed``, ``calib_*``, ``true_sequential``, ``distill_steps``; a mapping of those fields
        with a method dict, e.g. a sweep row, is converted by `config.from_dict`).
      cfg: the model config (needed to calibrate or distill: they run the model).
      calib: calibration token windows (N, L) for methods that use statistics (None: data-free
        modes). With a run config and `tokenizer`, its ``calib_windows`` × ``calib_seq_len``
        windows of ``calib_data`` (default: GSM8K train) are built when `calib` is None.
      tokenizer: for a run config's calibration / distillation text.
      mesh: a `jax.sharding.Mesh`: data-free methods spread the matrices over its devices,
        calibrated ones shard the windows over ``data``; outputs laid out like their base.
      stats: {name: `LinearStats`} given directly (data-free pass, no model run).
      key: PRNG key (per-leaf keys are folded from the leaf name); default from the config's
        seed (0).
      keep_other: with a `Method`: keep a bf16 delta of embeddings, norms and biases (False: the
        base value is used for them).
      progress, log: progress bars; a line logger (default: silent).

    Returns:
      {name: DeltaLeaf} for every leaf whose rule compresses it, in tree order.
    """
    log = log or (lambda s: None)
    plan = _plan(method, keep_other)
    key = jax.random.PRNGKey(plan.seed) if key is None else key
    if _is_path(base) or _is_path(finetuned):
        if not (_is_path(base) and _is_path(finetuned)):
            raise TypeError("compress: pass both base and finetuned as params, or both as paths")
        return _compress_streaming(base, finetuned, plan.rules, key=key, progress=progress)
    check_pair(base, finetuned)
    check_budgets(plan.rules, {n: tuple(getattr(x, "base", x).shape)
                               for n, x in flatten(base).items()})
    deltas = extract(base, finetuned)
    zero = delta_report(deltas)["zero"]
    if zero:
        log(f"[compress] {len(zero)} leaves have no delta (identical to base), e.g. {zero[0]}")
    calibrated = any(r.method is not None and r.method.needs_stats for r in plan.rules)
    if calib is None and calibrated and plan.calib_windows > 0 and stats is None:
        if tokenizer is None:
            raise ValueError(f"{plan.method.name} calibrates on text: pass tokenizer= (or calib= "
                             "token windows, or set calib_windows=0 for its data-free mode)")
        calib = calibrate.calibration_windows(tokenizer, plan.calib_data,
                                              num_windows=plan.calib_windows,
                                              seq_len=plan.calib_seq_len)
    if calib is not None and calibrated:
        if cfg is None:
            raise ValueError("compress: calibration runs the model: pass cfg= (the ModelConfig)")
        calib = np.asarray(calib)
        log(f"[compress] calibrating on {calib.shape[0]} windows × {calib.shape[1]} tokens, "
            "layer by layer")
        kw = dict(key=key, deltas=deltas, batch_size=plan.calib_batch_size,
                  true_sequential=plan.true_sequential, progress=progress, log=log)
        if mesh is not None:
            comp = sharded.sequential_compress_sharded(base, finetuned, cfg, calib, plan.rules,
                                                       mesh, **kw)
        else:
            comp = calibrate.sequential_compress(base, finetuned, cfg, calib, plan.rules, **kw)
    else:
        if calibrated and stats is None:
            log("[compress] no calibration data: methods that calibrate run their data-free mode")
        if mesh is not None and stats is None:
            comp = sharded.compress_tree_sharded(deltas, plan.rules, mesh, key=key,
                                                 progress=progress)
        else:
            comp = _compress_tree(deltas, plan.rules, key=key, stats=stats, progress=progress)
    if plan.distill_steps > 0:
        from deltajax.steps.bitdelta_distill import distill_scales

        if not any(leaf.method.distillable for leaf in comp.values()):
            raise ValueError("compress: distill_steps > 0 but no compressed leaf has a "
                             "distillable method (BitDelta)")
        if tokenizer is None or cfg is None:
            raise ValueError("compress: distillation needs tokenizer= and cfg=")
        toks, _ = data.training_sequences(
            tokenizer, plan.calib_data or str(data.default_file("gsm8k_train")),
            plan.calib_seq_len, loss_on_prompt=True,
            max_sequences=max(plan.calib_windows, 64))
        comp, _ = distill_scales(base, finetuned, comp, cfg, toks, steps=plan.distill_steps,
                                 log=log)
    return comp


def _compress_streaming(base_dir, ft_dir, rules, *, key, progress: bool = True,
                        allow_nonfinite: bool = False) -> dict[str, DeltaLeaf]:
    """Data-free rules over two HF directories, one tensor of each at a time, layer by layer."""
    from deltajax.io import hf, tensor_io

    base_dir, ft_dir = Path(base_dir), Path(ft_dir)
    cfg, ft_cfg = hf.load_config(base_dir), hf.load_config(ft_dir)
    if cfg != ft_cfg:
        check_pair({}, {}, base_cfg=cfg, ft_cfg=ft_cfg)
    needs = sorted({r.method.name for r in rules if r.method is not None and r.method.needs_stats
                    and not r.method.data_free_ok})
    if needs:
        raise ValueError(f"compress: streaming from directories is data-free only; {needs} need "
                         "calibration: load the models (load_model) and pass calib=")
    rb, _ = hf.scan_tensors(base_dir, cfg)  # validates every header first
    rf, _ = hf.scan_tensors(ft_dir, ft_cfg)
    missing = sorted(set(rb) ^ set(rf))
    if missing:
        raise DeltaError("base and fine-tune checkpoints hold different tensors: "
                         + ", ".join(missing[:8]))
    check_budgets(rules, {n: tuple(t.shape) for n, t in rb.items()})
    groups: dict[str, list[str]] = {}
    for name in rb:
        g = ".".join(name.split(".")[:2]) if name.startswith("layers.") else "other"
        groups.setdefault(g, []).append(name)
    out, bad = {}, []
    for g in tqdm(list(groups), desc="compress (streaming)", unit="layer", disable=not progress):
        for name in groups[g]:
            r = rule_for(name, rules)
            if r is None or r.method is None:
                continue
            b = tensor_io.read_tensor(rb[name])
            f = tensor_io.read_tensor(rf[name])
            d = jnp.asarray(f, jnp.float32) - jnp.asarray(b, jnp.float32)
            del b, f
            if not allow_nonfinite and not bool(jnp.all(jnp.isfinite(d))):
                bad.append(name)
                continue
            out[name] = compress_leaf(r.method, name, d, key=key)
    if bad:
        raise NonFiniteDeltaError("NaN/Inf in the delta of: " + ", ".join(bad), name=bad[0])
    return out


def report(base, deltas, compressed: Mapping[str, DeltaLeaf], *, seconds: float | None = None
           ) -> tuple[str, dict]:
    """(markdown, accounting): the accounting table, the nominal budget and the per-matrix-type
    relative error ‖Δ−Δ̂‖/‖Δ‖ of a compressed delta."""
    shapes = {n: tuple(getattr(x, "base", x).shape) for n, x in flatten(base).items()}
    acc = accounting.account(compressed, shapes)
    rel = relative_errors(deltas, compressed)
    by_type = errors_by_type({n: e for n, e in rel.items() if compressed[n].method.on_the_fly})
    lines = [accounting.format_table(acc)]
    notes = sorted({leaf.method.budget_note() for leaf in compressed.values()} - {None})
    for note in notes:
        lines += ["", f"{note}; true linear-layer ratio {acc['linear_ratio']:.2f}x"]
    lines += ["", "| matrix type | relative error ‖Δ−Δ̂‖/‖Δ‖ |", "|---|---:|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in sorted(by_type.items())]
    if seconds is not None:
        lines += ["", f"compressed in {seconds:.1f} s"]
    return "\n".join(lines), acc


# -------------------------------------------------------------------------------- attach/merge


@jax.jit
def _add(base, d):
    return (base.astype(jnp.float32) + d).astype(base.dtype)


def _check_compressed_fits(base, compressed) -> None:
    flat = flatten(base)
    problems = [f"delta for unknown leaf {n}" for n in compressed if n not in flat]
    problems += [f"shape of {n}: base {tuple(flat[n].shape)} vs delta {leaf.shape}"
                 for n, leaf in compressed.items()
                 if n in flat and tuple(flat[n].shape) != tuple(leaf.shape)]
    if problems:
        raise DeltaError("compressed delta does not fit this base:\n  " + "\n  ".join(problems))


def _attach_one(base, compressed, *, on_the_fly: bool, prepare) -> Any:
    _check_compressed_fits(base, compressed)
    if prepare not in (True, False, "auto"):
        raise ValueError(f"attach: prepare must be True, False or 'auto', got {prepare!r}")
    do_prepare = prepare is True or (prepare == "auto" and _mosaic_gpu.on_hopper())

    def f(name, w):
        leaf = compressed.get(name)
        if leaf is None:
            return w
        if on_the_fly and is_linear(name) and leaf.method.on_the_fly:
            if do_prepare:
                leaf = leaf.serving_form(w.dtype)
            return DeltaWeight(base=w, delta=leaf)
        if not leaf.method.mergeable:
            raise DeltaError(f"{name}: a {leaf.method.name} delta with an output bias cannot be "
                             "merged into a weight; attach it on the fly")
        return _add(w, leaf.decompress())

    return map_with_names(f, base)


def attach(base, deltas, *, tenants: Sequence[int] | jax.Array | None = None, mesh=None,
           prepare: bool | str = "auto", other: str = "error", implementation: str = "auto",
           interpret: bool = False):
    """Params whose linear projections carry compressed deltas, applied on the fly.

    Args:
      base: the base params tree.
      deltas: one compressed delta `{name: DeltaLeaf}` (`compress` / `load_delta`), or a list of
        them (many fine-tunes of this base in one batch).
      tenants: with a list of deltas, the fine-tune index of each batch row (-1: the bare base);
        also settable later with `serve.multitenant.with_tenants` (no recompilation).
      mesh: a `jax.sharding.Mesh`: the base laid out by `parallel.sharding.PARAM_RULES`, the
        deltas consistently, and delta matmuls run per shard under `shard_map` where the
        container is in its kernel layout (one delta only).
      prepare: convert 4/8-bit group-128 `QuantizedMatrix` deltas (RTN, GPTQ) to the Mosaic GPU
        kernel's layout ("auto": on a Hopper GPU only; True: always, the reference elsewhere).
      other: with a list of deltas, what to do with deltas of non-linear leaves (norms, biases,
        embeddings): "error" | "base" | "per_row" (`serve.multitenant.attach`).
      implementation, interpret: kernel choice of the multi-tenant paths.

    Non-projection deltas of a single delta (embeddings, norms, biases) are merged into the base.
    """
    if isinstance(deltas, Mapping):
        if tenants is not None:
            raise ValueError("attach: tenants= needs a list of deltas (one per fine-tune)")
        if mesh is not None:
            # stored layouts only: the shard rules are written for them (not the Hopper layout)
            base, deltas = sharded.place(base, deltas, mesh)
            params = _attach_one(base, deltas, on_the_fly=True, prepare=False)
            return sharded.shard_map_deltas(params, mesh)
        return _attach_one(base, deltas, on_the_fly=True, prepare=prepare)
    deltas = list(deltas)
    if mesh is not None:
        raise NotImplementedError("attach: several deltas on a mesh (multi-tenant tensor "
                                  "parallelism) is not implemented; attach one delta per mesh")
    for d in deltas:
        _check_compressed_fits(base, d)
    return multitenant.attach(base, deltas, other=other, tenant_ids=tenants,
                              implementation=implementation, interpret=interpret)


def merge(base, compressed: Mapping[str, DeltaLeaf]):
    """Dense params base + decompressed delta (in the base dtype), e.g. for HF export."""
    return _attach_one(base, compressed, on_the_fly=False, prepare=False)


# ------------------------------------------------------------------------------------- errors


def relative_errors(deltas, compressed: Mapping[str, DeltaLeaf]) -> dict[str, float]:
    """‖Δ − Δ̂‖_F / ‖Δ‖_F per compressed leaf (an affine container by its matrix part)."""
    flat = flatten(deltas)
    return {n: float(_rel_err(flat[n].astype(jnp.float32), leaf))
            for n, leaf in compressed.items()}


@jax.jit
def _rel_err(d, leaf):
    dh = leaf.method.linear_part(leaf.container)
    return jnp.linalg.norm(d - dh) / jnp.maximum(jnp.linalg.norm(d), 1e-30)


def errors_by_type(rel: Mapping[str, float]) -> dict[str, float]:
    """Mean relative error per matrix type (q_proj, ..., down_proj, other)."""
    groups: dict[str, list[float]] = {}
    for n, e in rel.items():
        groups.setdefault(matrix_type(n), []).append(e)
    return {k: float(np.mean(v)) for k, v in groups.items()}


__all__ = ["BudgetError", "DeltaError", "NonFiniteDeltaError", "NonFiniteError", "attach",
           "check_budgets", "check_pair", "compress", "delta_report", "errors_by_type",
           "extract", "merge", "relative_errors", "report"]
