r"""Bolaco on a real pair: feature-based vs plain SVD at equal rank, BO vs uniform rank allocation.

  python benchmarks/bench_bolaco.py --base=smollm2 \
      --finetuned=~/.cache/deltajax/smollm2-gsm8k-ft --out=benchmarks/bolaco.md

1. At ratios α (default 1/16, 1/32, 1/64) and equal ranks: LowRank (plain SVD), FeatureLowRank
   uncentered (eigenvectors of Δ·H·Δᵀ) and pooled (Bolaco's pooled covariance + mean-correction
   bias): layer-output error on held-out GSM8K text (as `bench_quality.py`), held-out GSM8K and
   WikiText-2 perplexity.
2. At --bo_ratios: Bayesian optimization (`rank_search.search`, optuna GP) of per-type rank
   multipliers under the uniform allocation's byte budget, objective = ppl + 1e-3·KL(fine-tune ‖
   compressed) on --obj_windows held-out GSM8K windows *disjoint* from the evaluation windows;
   the uniform point is the first trial. Reports the allocation, objective and the separate
   held-out GSM8K / WikiText-2 perplexities.

Statistics: one pass of the fine-tune over --calib_windows windows of the GSM8K train split
(`calibrate.collect_stats`, pools of --pool_size windows); eigenbases computed once
(`rank_search.factorize`) and truncated for every rank. Writes a markdown file with date, device
and command.
"""

from __future__ import annotations

import time

import _common as C
import jax
import numpy as np
from absl import flags

from deltajax import accounting, cli, delta
from deltajax import data as D
from deltajax.io.resolve import load_model
from deltajax.methods import FeatureLowRank, Keep, LowRank
from deltajax.methods.featlowrank import output_error
from deltajax.steps import calibrate
from deltajax.steps import rank_search as RS
from deltajax.tree import PROJ_PATTERN, Rule, flatten

FLAGS = flags.FLAGS
flags.DEFINE_string("base", "smollm2", "Base model.")
flags.DEFINE_string("finetuned", None, "Fine-tuned model.", required=True)
flags.DEFINE_string("out", "benchmarks/bolaco.md", "Markdown output.")
flags.DEFINE_list("ratios", ["16", "32", "64"], "Part 1: 1/α values compared at equal rank.")
flags.DEFINE_list("bo_ratios", ["32", "64"], "Part 2: 1/α budgets of the BO search.")
flags.DEFINE_integer("trials", 24, "BO trials per budget (the first is the uniform point).")
flags.DEFINE_string("sampler", "gp", "optuna sampler: gp | tpe | random.")
flags.DEFINE_string("bo_mode", "uncentered", "FeatureLowRank mode searched by BO.")
flags.DEFINE_float("max_factor", 8.0, "Most rank a type may get, in units of its uniform rank.")
flags.DEFINE_integer("seed", 0, "Sampler seed.")
flags.DEFINE_integer("calib_windows", 16, "Calibration windows (GSM8K train split).")
flags.DEFINE_integer("calib_seq_len", 256, "Tokens per calibration window.")
flags.DEFINE_integer("pool_size", 4, "Windows per pool of the pooled covariance.")
flags.DEFINE_integer("eval_windows", 8, "Windows per perplexity evaluation.")
flags.DEFINE_integer("eval_seq_len", 256, "Tokens per window.")
flags.DEFINE_integer("obj_windows", 2, "Held-out GSM8K windows of the BO objective (disjoint "
                     "from the evaluation windows).")


def main(argv):
    cli.no_extra_args(argv)
    t_start = time.perf_counter()
    with cli.about("base"):
        base, cfg, tok, _ = load_model(FLAGS.base)
    with cli.about("finetuned"):
        ft, ft_cfg, _, _ = load_model(FLAGS.finetuned)
        delta.check_pair(base, ft, base_cfg=cfg, ft_cfg=ft_cfg)
    deltas = delta.extract(base, ft)
    L = FLAGS.eval_seq_len
    held = D.read_texts(D.default_file("gsm8k_heldout"), split="heldout")
    gsm_all = D.token_windows(tok, held, L, FLAGS.eval_windows + FLAGS.obj_windows)
    if gsm_all.shape[0] < FLAGS.eval_windows + FLAGS.obj_windows:
        raise ValueError("held-out GSM8K text too short for the requested windows")
    gsm, obj_toks = gsm_all[:FLAGS.eval_windows], gsm_all[FLAGS.eval_windows:]
    wiki = D.token_windows(tok, D.read_texts(D.default_file("wikitext2")), L, FLAGS.eval_windows)
    calib = calibrate.calibration_windows(tok, num_windows=FLAGS.calib_windows,
                                          seq_len=FLAGS.calib_seq_len)

    # non-projection leaves keep a bf16 delta, as in every compressed checkpoint here
    kept = delta.compress(base, ft, (Rule(PROJ_PATTERN, None), Rule(r".*", Keep())),
                          progress=False)
    base_kept = delta.merge(base, kept)
    shapes = {n: tuple(x.shape) for n, x in flatten(base).items()}
    pb, pf = C.perplexities(base, cfg, gsm, wiki), C.perplexities(ft, cfg, gsm, wiki)
    print(f"base {pb}, fine-tune {pf} ({time.perf_counter() - t_start:.0f} s)", flush=True)
    stats = calibrate.collect_stats(ft, cfg, calib, pool_size=FLAGS.pool_size, batch_size=8,
                                    progress=True)
    held_stats = calibrate.collect_stats(ft, cfg, gsm[: max(4, FLAGS.eval_windows // 2)],
                                         batch_size=4)
    print(f"statistics done ({time.perf_counter() - t_start:.0f} s)", flush=True)

    ratios = [1 / float(r) for r in FLAGS.ratios]
    bo_ratios = [1 / float(r) for r in FLAGS.bo_ratios]
    top = max(ratios + bo_ratios)
    flat = flatten(deltas)
    proj = [n for n in flat if n in held_stats]
    # basis widths: every part-1 rank and every BO cap (eigendecomposition once per matrix)
    need = [RS.uniform_ranks({n: shapes[n] for n in proj}, a) for a in ratios]
    need += [{n: int(np.ceil(FLAGS.max_factor * r)) for n, r in
              RS.uniform_ranks({n: shapes[n] for n in proj}, a).items()} for a in bo_ratios]
    r_cap = {n: min(min(shapes[n]), max(d[n] for d in need)) for n in proj}
    facts = {}
    for mode in ("uncentered", "pooled"):
        t0 = time.perf_counter()
        facts[mode] = RS.factorize(deltas, stats, FeatureLowRank(mode=mode,
                                   pool_size=FLAGS.pool_size), ratio=top, names=proj,
                                   r_cap=r_cap)
        print(f"factorize {mode}: {time.perf_counter() - t0:.0f} s", flush=True)
    out_err_fn = jax.jit(output_error)

    def out_err(comp):
        return float(np.mean([float(out_err_fn(flat[n], leaf.container, held_stats[n]))
                              for n, leaf in comp.items()]))

    def full(comp):
        return {**kept, **comp}

    rows, uniform_cache = [], {}
    for a in ratios:
        uni = RS.uniform_ranks(facts["uncentered"].shapes, a)
        t0 = time.perf_counter()
        lr = delta.compress(base, ft, LowRank(ratio=a), progress=False)
        lr = {n: v for n, v in lr.items() if n in uni}
        cands = {"LowRank (SVD)": (lr, True),
                 "FeatLowRank uncentered": (RS.compress_with_ranks(facts["uncentered"], uni),
                                            True),
                 "FeatLowRank pooled + bias": (RS.compress_with_ranks(facts["pooled"], uni),
                                               False)}
        for label, (comp, mergeable) in cands.items():
            t1 = time.perf_counter()
            oe = out_err(comp)
            if mergeable:
                pc = C.perplexities(delta.merge(base_kept, comp), cfg, gsm, wiki)
            else:  # the bias cannot be merged: on the fly, at the fixed masked shapes
                pc = C.perplexities(delta.attach(base_kept, RS.masked_containers(
                    facts["pooled"].with_cap(top, 1.0), uni)), cfg, gsm, wiki)
            acc = accounting.account(full(comp), shapes)
            rows.append((f"1/{1 / a:.0f}", label, acc["linear_ratio"], oe, pc[0], pc[1],
                         (pb[0] - pc[0]) / (pb[0] - pf[0])))
            if label == "FeatLowRank uncentered":
                uniform_cache[a] = (pc, acc["linear_ratio"])
            print(f"{rows[-1]} ({time.perf_counter() - t1:.0f} s)", flush=True)
        print(f"ratio 1/{1 / a:.0f} done ({time.perf_counter() - t0:.0f} s)", flush=True)

    bo_rows = []
    _write(rows, bo_rows, locals())  # partial results first (part 1)
    for a in bo_ratios:
        fact = facts[FLAGS.bo_mode].with_cap(a, FLAGS.max_factor)
        obj = RS.LMObjective(base_kept, cfg, fact, obj_toks, ft, batch_size=obj_toks.shape[0])
        res = RS.search(obj, fact.shapes, ratio=a, n_trials=FLAGS.trials, seed=FLAGS.seed,
                        sampler=FLAGS.sampler, r_cap=fact.r_cap, bias=fact.bias,
                        itemsize=fact.itemsize)
        comp = RS.compress_with_ranks(fact, res.ranks)
        acc = accounting.account(full(comp), shapes)
        if fact.method.mergeable:
            pc = C.perplexities(delta.merge(base_kept, comp), cfg, gsm, wiki)
        else:
            pc = C.perplexities(delta.attach(base_kept, RS.masked_containers(fact, res.ranks)),
                                cfg, gsm, wiki)
        if a in uniform_cache and FLAGS.bo_mode == "uncentered":
            pu, ru = uniform_cache[a]
        else:
            uc = RS.compress_with_ranks(fact, res.uniform_ranks)
            ru = accounting.account(full(uc), shapes)["linear_ratio"]
            pu_params = (delta.merge(base_kept, uc) if fact.method.mergeable else
                         delta.attach(base_kept, RS.masked_containers(fact, res.uniform_ranks)))
            pu = C.perplexities(pu_params, cfg, gsm, wiki)
        bo_rows.append((a, res, acc["linear_ratio"], pc, ru, pu))
        print(f"BO 1/{1 / a:.0f}: {res.ranks_by_type} objective {res.objective:.4f} vs uniform "
              f"{res.uniform_objective:.4f}; held-out {pc} vs uniform {pu} "
              f"({res.seconds:.0f} s)", flush=True)
        _write(rows, bo_rows, locals())


def _write(rows, bo_rows, v):
    """Write the markdown of what is measured so far (`v`: main's locals)."""
    calib, gsm, wiki, held_stats, obj_toks = (v["calib"], v["gsm"], v["wiki"], v["held_stats"],
                                              v["obj_toks"])
    pb, pf, L = v["pb"], v["pf"], v["L"]
    total = time.perf_counter() - v["t_start"]
    lines = C.header("Bolaco: feature-based low rank and Bayesian rank allocation on a real pair", [
        f"- total {total / 60:.1f} min",
        f"- base: {FLAGS.base}; fine-tune: {FLAGS.finetuned}",
        f"- statistics: one pass of the fine-tune over {calib.shape[0]} × {calib.shape[1]} "
        f"tokens of the GSM8K train split (not sequential), pooled covariance over pools of "
        f"{FLAGS.pool_size} windows",
        f"- evaluation: held-out GSM8K (last 500 problems) {gsm.shape[0]} windows × {L} tokens; "
        f"WikiText-2 {wiki.shape[0]} windows; output error = mean over projections of "
        "‖X(Δ−Δ̂)ᵀ − b‖/‖XΔᵀ‖ (b = stored bias, pooled mode only) with X the fine-tune's inputs "
        f"on {held_stats[next(iter(held_stats))].count:.0f} held-out GSM8K tokens",
        "- ratios are exact stored bytes (bf16 factors, bias) of the projections vs a 16-bit "
        "delta; embeddings / norms keep a bf16 delta in every row",
        "",
        f"Base: GSM8K ppl {pb[0]:.3f}, WikiText-2 {pb[1]:.3f}. Fine-tune: GSM8K {pf[0]:.3f}, "
        f"WikiText-2 {pf[1]:.3f}.",
        "",
        "## 1. Feature-based vs plain SVD at equal rank",
        "",
        "| α | method | linear ratio | output error | GSM8K ppl | WikiText-2 ppl | gain kept |",
        "|---|---|---:|---:|---:|---:|---:|",
    ])
    for r in rows:
        lines.append(f"| {r[0]} | {r[1]} | {r[2]:.2f}x | {r[3]:.4f} | {r[4]:.3f} | {r[5]:.3f} | "
                     f"{100 * r[6]:.1f}% |")
    lines += [
        "",
        f"## 2. BO allocation vs uniform at the same byte budget (mode {FLAGS.bo_mode})",
        "",
        f"optuna {FLAGS.sampler} sampler, seed {FLAGS.seed}, {FLAGS.trials} trials (trial 1 = "
        f"uniform); objective = ppl + 1e-3·KL(fine-tune ‖ compressed) on {obj_toks.shape[0]} "
        f"held-out GSM8K windows disjoint from the {gsm.shape[0]} evaluation windows; "
        f"multipliers ρ ∈ [0.25, 4] per group (qk, v, o, gate, up, down), ranks rescaled to the "
        f"budget, at most {FLAGS.max_factor:g}× a type's uniform rank.",
        "",
        "| budget | allocation | ranks q/k/v/o/gate/up/down | linear ratio | objective | "
        "GSM8K ppl (separate) | WikiText-2 ppl | gain kept |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for a, res, ratio_bo, pc, ru, pu in bo_rows:
        def rk(ranks):
            by = RS.ranks_by_type(ranks)
            return "/".join("·".join(map(str, v)) for v in by.values())

        lines.append(f"| 1/{1 / a:.0f} | uniform | {rk(res.uniform_ranks)} | {ru:.2f}x | "
                     f"{res.uniform_objective:.4f} | {pu[0]:.3f} | {pu[1]:.3f} | "
                     f"{100 * (pb[0] - pu[0]) / (pb[0] - pf[0]):.1f}% |")
        rho = ", ".join(f"{g} {v:.2f}" for g, v in res.rho.items())
        lines.append(f"| 1/{1 / a:.0f} | BO (ρ: {rho}) | {rk(res.ranks)} | {ratio_bo:.2f}x | "
                     f"{res.objective:.4f} | {pc[0]:.3f} | {pc[1]:.3f} | "
                     f"{100 * (pb[0] - pc[0]) / (pb[0] - pf[0]):.1f}% |")
    lines += ["", "Search time per budget: " + ", ".join(
        f"1/{1 / a:.0f}: {res.seconds:.0f} s ({sum(not t['cached'] for t in res.trials)} "
        "distinct allocations evaluated)" for a, res, *_ in bo_rows)]
    text = "\n".join(lines) + "\n"
    C.write_markdown(FLAGS.out, text)
    print(text)


if __name__ == "__main__":
    cli.run(main)
