r"""DSnoT on a real pair: sparse deltas (initial mask vs + DSnoT) and base-weight pruning at 60 %.

  python benchmarks/bench_dsnot.py --base=smollm2 \
      --finetuned=~/.cache/deltajax/smollm2-gsm8k-ft --out=benchmarks/dsnot.md

Part 1 (delta): at each sparsity, each initial mask (magnitude, Wanda, DARE-style random) alone
and refined by DSnoT (the original's rule, and the `expected_sq` rule); every projection delta
is sparsified at the same per-row sparsity. Reports the true linear / whole ratio (mask + values
counted), the layer-output error ‖X(Δ−Δ̂)ᵀ‖/‖XΔᵀ‖ on held-out GSM8K text (as
`bench_quality.py`), held-out GSM8K and WikiText-2 perplexity. Calibration statistics are those
of the fine-tune's own projection inputs on GSM8K *train* windows, collected once
(`calibrate.collect_stats`) and shared by all rows.

Part 2 (base weights, the paper's use): SmolLM2's own projections pruned to 60 % unstructured
(row-wise) sparsity, Wanda vs Wanda + DSnoT (attention only = the original default, and all
projections), layer-wise (`deltajax.steps.prune.prune_model`); WikiText-2 perplexity, dense too.
Writes a markdown table with date, device and command (rewritten after every row).
"""

from __future__ import annotations

import time

import _common as C
import jax
import numpy as np
from absl import flags

from deltajax import accounting, cli, delta
from deltajax import data as D
from deltajax.eval import metrics
from deltajax.io.resolve import load_model
from deltajax.methods.dsnot import DSnoT
from deltajax.steps import calibrate, prune
from deltajax.tree import flatten

FLAGS = flags.FLAGS
flags.DEFINE_string("base", "smollm2", "Base model.")
flags.DEFINE_string("finetuned", None, "Fine-tuned model (part 1; empty: skip part 1).")
flags.DEFINE_string("out", "benchmarks/dsnot.md", "Markdown output.")
flags.DEFINE_integer("eval_windows", 16, "Windows per perplexity evaluation.")
flags.DEFINE_integer("eval_seq_len", 256, "Tokens per evaluation window.")
flags.DEFINE_integer("calib_windows", 32, "Calibration windows (GSM8K train split).")
flags.DEFINE_integer("calib_seq_len", 256, "Tokens per calibration window.")
flags.DEFINE_list("sparsities", ["0.9", "0.95", "0.97"], "Delta sparsities (part 1).")
flags.DEFINE_list("inits", ["magnitude", "wanda"], "Initial masks at every sparsity (part 1).")
flags.DEFINE_list("random_at", ["0.95"], "Sparsities at which the random (DARE-style) init is "
                  "also run.")
flags.DEFINE_list("variants", ["init", "dsnot", "dsnot_esq"], "Per init: 'init' (initial mask "
                  "alone), 'dsnot' (original stop rule, all projections), 'dsnot_esq' "
                  "(expected_sq stop rule, all projections).")
flags.DEFINE_bool("ppl", True, "Compute perplexities in part 1 (else output error only).")
flags.DEFINE_bool("part2", True, "Run part 2 (base-weight pruning at --base_sparsity).")
flags.DEFINE_float("base_sparsity", 0.6, "Sparsity of the base-weight pruning (part 2).")
flags.DEFINE_integer("max_cycles", 50, "DSnoT max cycles.")

VARIANTS = {"init": dict(refine=False), "dsnot": dict(refine=True),
            "dsnot_esq": dict(refine=True, stop_rule="expected_sq")}


def main(argv):
    cli.no_extra_args(argv)
    t_start = time.perf_counter()
    with cli.about("base"):
        base, cfg, tok, _ = load_model(FLAGS.base)
    held = D.read_texts(D.default_file("gsm8k_heldout"), split="heldout")
    gsm = D.token_windows(tok, held, FLAGS.eval_seq_len, FLAGS.eval_windows)
    wiki = D.token_windows(tok, D.read_texts(D.default_file("wikitext2")), FLAGS.eval_seq_len,
                           FLAGS.eval_windows)
    calib = calibrate.calibration_windows(tok, num_windows=FLAGS.calib_windows,
                                          seq_len=FLAGS.calib_seq_len)
    head = C.header("DSnoT (training-free sparse-mask refinement) on SmolLM2", [
        f"- base: {FLAGS.base}; fine-tune: {FLAGS.finetuned}",
        f"- evaluation: held-out GSM8K (last 500 problems) and WikiText-2 test, "
        f"{gsm.shape[0]} windows x {gsm.shape[1]} tokens each; calibration: {calib.shape[0]} "
        f"windows x {calib.shape[1]} tokens of the GSM8K train split",
        f"- DSnoT: max {FLAGS.max_cycles} cycles, threshold 0.1 in per-2048-token-sequence units, "
        "γ = 1 (the original's defaults); 'dsnot' = the original stop rule, 'dsnot_esq' = a swap "
        "only when it lowers ε² + Σ_pruned W²·Var (ours)",
        "",
    ])
    sections: dict[str, list[str]] = {}

    def write():
        C.write_markdown(FLAGS.out, head + [ln for s in sections.values() for ln in s])

    if FLAGS.finetuned:
        with cli.about("finetuned"):
            ft, ft_cfg, _, _ = load_model(FLAGS.finetuned)
            delta.check_pair(base, ft, base_cfg=cfg, ft_cfg=ft_cfg)
        deltas = delta.extract(base, ft)
        shapes = {n: tuple(x.shape) for n, x in flatten(base).items()}
        print("statistics: calibration and held-out", flush=True)
        cal_stats = calibrate.collect_stats(ft, cfg, calib, batch_size=8)
        held_stats = calibrate.collect_stats(ft, cfg, gsm[: max(4, FLAGS.eval_windows // 2)],
                                             batch_size=4)
        pb, pf = ((C.perplexities(base, cfg, gsm, wiki), C.perplexities(ft, cfg, gsm, wiki))
                  if FLAGS.ppl else ((float("nan"),) * 2,) * 2)
        sec = sections["delta"] = [
            "## 1. Sparse delta (every projection at the same per-row sparsity)",
            "",
            f"Base: GSM8K ppl {pb[0]:.3f}, WikiText-2 ppl {pb[1]:.3f}. Fine-tune: GSM8K ppl "
            f"{pf[0]:.3f}, WikiText-2 ppl {pf[1]:.3f}. Output error: mean over the 210 "
            "projections of ‖X(Δ−Δ̂)ᵀ‖/‖XΔᵀ‖, X = the fine-tune's inputs on held-out GSM8K. "
            "Values stored in bf16; mask as a 1-bit bitmap or uint16 indices, whichever is "
            "smaller.",
            "",
            "| sparsity | init | variant | linear ratio | whole ratio | output error "
            "| GSM8K ppl | WikiText-2 ppl | mean swaps/row (attn) |",
            "|---:|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for sp in [float(s) for s in FLAGS.sparsities]:
            inits = list(FLAGS.inits) + (["random"] if any(abs(sp - float(r)) < 1e-9
                                                            for r in FLAGS.random_at) else [])
            for init in inits:
                for var in FLAGS.variants:
                    t0 = time.perf_counter()
                    m = DSnoT(sparsity=sp, init=init, max_cycles=FLAGS.max_cycles,
                              **VARIANTS[var])
                    comp = delta.compress(base, ft, m, stats=cal_stats, progress=False)
                    acc = accounting.account(comp, shapes)
                    oe = metrics.output_errors(deltas, {n: v for n, v in comp.items()
                                                  if n in held_stats}, held_stats)
                    out_err = float(np.mean(list(oe.values())))
                    swaps = _mean_swaps(m, deltas, cal_stats) if m.refine else 0.0
                    pc = (C.perplexities(delta.merge(base, comp), cfg, gsm, wiki) if FLAGS.ppl
                          else (float("nan"),) * 2)
                    sec.append(f"| {sp:.2f} | {init} | {var} | {acc['linear_ratio']:.2f}x | "
                               f"{acc['total_ratio']:.2f}x | {out_err:.4f} | {pc[0]:.3f} | "
                               f"{pc[1]:.3f} | {swaps:.1f} |")
                    print(sec[-1], f"({time.perf_counter() - t0:.0f} s)", flush=True)
                    write()
        del ft, deltas, cal_stats, held_stats
    if FLAGS.part2:
        s = FLAGS.base_sparsity
        sec = sections["base"] = [
            "",
            f"## 2. Base weights pruned to {100 * s:.0f} % (row-wise unstructured, every decoder "
            "projection; the paper's use)",
            "",
            "Layer-wise: statistics from one forward of the still-dense layer, outputs "
            "recomputed with the pruned layer for the next (`deltajax.steps.prune.prune_model`). "
            "|ε|: mean per-row expected output error per token of the attention projections "
            "(q_proj) before → after.",
            "",
            "| model | WikiText-2 ppl | GSM8K ppl | q_proj mean abs ε | seconds |",
            "|---|---:|---:|---:|---:|",
        ]
        pd = C.perplexities(base, cfg, gsm, wiki)
        sec.append(f"| dense | {pd[1]:.3f} | {pd[0]:.3f} | – | – |")
        write()
        runs = [("Wanda", dict(refine=False)),
                ("Wanda + DSnoT (attention only, original default)", dict(refine=True)),
                ("Wanda + DSnoT (all projections)", dict(refine=True, refine_mlp=True)),
                ("Wanda + DSnoT expected_sq (all projections)",
                 dict(refine=True, refine_mlp=True, stop_rule="expected_sq"))]
        for label, kw in runs:
            pp, rep = prune.prune_model(base, cfg, calib, sparsity=s, init="wanda",
                                        max_cycles=FLAGS.max_cycles, progress=False, **kw)
            pc = C.perplexities(pp, cfg, gsm, wiki)
            sec.append(f"| {label} | {pc[1]:.3f} | {pc[0]:.3f} | {rep['eps0']['q_proj']:.4g} → "
                       f"{rep['eps']['q_proj']:.4g} | {rep['seconds']:.0f} |")
            print(sec[-1], flush=True)
            write()
    sections["end"] = ["", f"Total wall time {time.perf_counter() - t_start:.0f} s."]
    write()
    print(open(FLAGS.out).read())


def _mean_swaps(m: DSnoT, deltas, stats) -> float:
    """Mean number of swaps per row over the attention projections (diagnostic)."""
    flat = flatten(deltas)
    swaps = jax.jit(lambda d, s: m.compute_mask(d, stats=s)[1].swaps)
    out = []
    for name, st in stats.items():
        if "self_attn" in name:
            out.append(float(np.mean(np.asarray(swaps(flat[name], st)))))
    return float(np.mean(out))


if __name__ == "__main__":
    cli.run(main)
