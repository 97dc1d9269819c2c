r"""DeltaDQ vs DARE at the same true ratio on a real base / fine-tune pair.

  python benchmarks/bench_deltadq.py --base=smollm2 \
      --finetuned=~/.cache/deltajax/smollm2-gsm8k-ft --out=benchmarks/deltadq.md

For each ratio (16x, 32x, 64x, 128x against a 16-bit delta by default): DeltaDQ (calibrated
group-size search, `calib_windows` windows of the GSM8K train split) and DARE with p = 1 − 1/ratio
(bf16 kept values + seed). Columns as `bench_quality.py`: exact linear-layer ratio, output error
on held-out GSM8K text, held-out GSM8K ppl, WikiText-2 ppl, gain kept; plus DeltaDQ's kept
fraction and the group sizes the search chose. The table is rewritten after every row.
"""

from __future__ import annotations

import collections
import time

import _common as C
import numpy as np
from absl import flags

from deltajax import accounting, cli, delta
from deltajax import data as D
from deltajax.eval import metrics
from deltajax.io.resolve import load_model
from deltajax.steps import calibrate
from deltajax.tree import flatten

FLAGS = flags.FLAGS
flags.DEFINE_string("base", "smollm2", "Base model (name or HF directory).")
flags.DEFINE_string("finetuned", None, "Fine-tuned model (HF directory).", required=True)
flags.DEFINE_string("out", "benchmarks/deltadq.md", "Markdown output.")
flags.DEFINE_list("ratios", ["16", "32", "64", "128"], "Compression ratios vs a 16-bit delta.")
flags.DEFINE_integer("bits", 2, "DeltaDQ bits per kept value (the method default).")
flags.DEFINE_integer("qgroup", 64, "DeltaDQ quantization group (kept values per scale).")
flags.DEFINE_list("methods", ["deltadq", "dare"], "Methods to run: deltadq, deltadq_free "
                  "(data-free group search), dare.")
flags.DEFINE_integer("eval_windows", 16, "Windows per perplexity evaluation.")
flags.DEFINE_integer("eval_seq_len", 256, "Tokens per window.")
flags.DEFINE_integer("calib_windows", 16, "DeltaDQ calibration windows (GSM8K train split).")
flags.DEFINE_integer("calib_seq_len", 256, "Tokens per calibration window.")
flags.DEFINE_list("reference_ppl", [], "Skip evaluating base and fine-tune: their perplexities "
                  "from an earlier run on the same windows, as base_gsm8k,base_wiki,ft_gsm8k,"
                  "ft_wiki.")


def _groups(comp) -> str:
    cnt = collections.Counter()
    keep = []
    for leaf in comp.values():
        c = leaf.container
        if hasattr(c, "choice"):
            cnt[leaf.method.chosen_group(c)] += 1
            keep.append(c.keep / c.k)
    if not keep:
        return "", ""
    return (f"{100 * np.mean(keep):.2f}%",
            ", ".join(f"{g}:{n}" for g, n in sorted(cnt.items())))


def main(argv):
    cli.no_extra_args(argv)
    t_start = time.perf_counter()
    with cli.about("base"):
        base, cfg, tok, _ = load_model(FLAGS.base)
    with cli.about("finetuned"):
        ft, ft_cfg, _, _ = load_model(FLAGS.finetuned)
        delta.check_pair(base, ft, base_cfg=cfg, ft_cfg=ft_cfg)
    held = D.read_texts(D.default_file("gsm8k_heldout"), split="heldout")
    gsm = D.token_windows(tok, held, FLAGS.eval_seq_len, FLAGS.eval_windows)
    wiki = D.token_windows(tok, D.read_texts(D.default_file("wikitext2")), FLAGS.eval_seq_len,
                           FLAGS.eval_windows)

    if FLAGS.reference_ppl:
        ref = [float(v) for v in FLAGS.reference_ppl]
        if len(ref) != 4:
            raise ValueError(f"--reference_ppl needs 4 values, got {FLAGS.reference_ppl}")
        pb, pf = (ref[0], ref[1]), (ref[2], ref[3])
    else:
        pb, pf = C.perplexities(base, cfg, gsm, wiki), C.perplexities(ft, cfg, gsm, wiki)
    print(f"base {pb}, fine-tune {pf} ({time.perf_counter() - t_start:.0f} s)", flush=True)
    deltas = delta.extract(base, ft)
    shapes = {n: tuple(x.shape) for n, x in flatten(base).items()}
    held_stats = calibrate.collect_stats(ft, cfg, gsm[: max(4, FLAGS.eval_windows // 2)],
                                         batch_size=4)
    rows = []
    for r in FLAGS.ratios:
        ratio = float(r)
        for meth in FLAGS.methods:
            t0 = time.perf_counter()
            if meth == "dare":
                label, m, n_cal = f"DARE {r}x (p=1-1/{r})", {"name": "dare",
                                                              "p": 1 - 1 / ratio}, 0
            elif meth in ("deltadq", "deltadq_free"):
                m = {"name": "deltadq", "ratio": 1 / ratio, "bits": FLAGS.bits,
                     "qgroup": FLAGS.qgroup}
                n_cal = FLAGS.calib_windows if meth == "deltadq" else 0
                label = (f"DeltaDQ 1/{r}, {FLAGS.bits}-bit"
                         + ("" if n_cal else ", data-free"))
            else:
                raise ValueError(f"unknown method {meth!r} in --methods")
            comp = delta.compress(base, ft, {
                "method": m, "keep_other": True, "seed": 0, "calib_windows": n_cal,
                "calib_seq_len": FLAGS.calib_seq_len, "calib_batch_size": 8},
                cfg=cfg, tokenizer=tok, progress=False)
            out_err = float(np.mean(list(metrics.output_errors(deltas, {
                n: leaf for n, leaf in comp.items() if n in held_stats},
                held_stats).values())))
            pc = C.perplexities(delta.merge(base, comp), cfg, gsm, wiki)
            acc = accounting.account(comp, shapes)
            gain = (pb[0] - pc[0]) / (pb[0] - pf[0])
            keep, groups = _groups(comp)
            rows.append((label, acc["linear_ratio"], acc["total_ratio"], out_err, pc[0], pc[1],
                         gain, keep, groups))
            print(f"{label}: {rows[-1][1:]} ({time.perf_counter() - t0:.0f} s)", flush=True)
            _write(rows, pb, pf, gsm, wiki, held_stats, time.perf_counter() - t_start)


def _write(rows, pb, pf, gsm, wiki, held_stats, seconds):
    lines = C.header("DeltaDQ vs DARE at the same true ratio (real pair)", [
        f"- wall time: {seconds:.0f} s so far",
        f"- base: {FLAGS.base}; fine-tune: {FLAGS.finetuned}",
        f"- held-out GSM8K: last 500 problems of gsm8k_train.jsonl, {gsm.shape[0]} windows x "
        f"{gsm.shape[1]} tokens; WikiText-2: first {wiki.shape[0]} windows of the raw test set",
        "- ratios are exact (every code word incl. padding, scale, zero, value, seed and "
        "group-choice byte counted) against a 16-bit delta; 'whole' also counts the bf16 delta "
        "kept for embeddings and norms",
        f"- DeltaDQ: {FLAGS.bits}-bit codes of the kept values, bf16 scale (+ zero) per "
        f"{FLAGS.qgroup} kept values, mask from an 8-byte seed, group size searched per matrix "
        f"on {FLAGS.calib_windows} windows x {FLAGS.calib_seq_len} tokens of the GSM8K train "
        "split (true-sequential); 'groups' = chosen group size: number of matrices",
        "- output error: mean over projections of ‖X(Δ−Δ̂)ᵀ‖/‖XΔᵀ‖ with X each projection's "
        f"inputs in the fine-tune on held-out GSM8K ({held_stats[next(iter(held_stats))].count:.0f}"
        " tokens); gain kept = (ppl_base − ppl) / (ppl_base − ppl_ft) on held-out GSM8K",
        "",
        f"Base: GSM8K ppl {pb[0]:.3f}, WikiText-2 ppl {pb[1]:.3f}. Fine-tune: GSM8K ppl "
        f"{pf[0]:.3f}, WikiText-2 ppl {pf[1]:.3f}.",
        "",
    ])
    lines += C.table(
        ["method", "linear ratio", "whole ratio", "output error", "GSM8K ppl", "WikiText-2 ppl",
         "gain kept", "kept", "groups"],
        [(r[0], f"{r[1]:.2f}x", f"{r[2]:.2f}x", f"{r[3]:.3f}", f"{r[4]:.3f}", f"{r[5]:.3f}",
          f"{100 * r[6]:.1f}%", r[7], r[8]) for r in rows], align="lrrrrrrrl")
    C.write_markdown(FLAGS.out, lines)


if __name__ == "__main__":
    cli.run(main)
