r"""Compare compression methods on a real base / fine-tune pair at several true ratios.

  python scripts/bench_quality.py --base=smollm2 \
      --finetuned=~/.cache/deltajax/smollm2-gsm8k-ft --out=benchmarks/quality.md

For each method configuration: linear-layer and whole-checkpoint ratio (exact accounting), mean
relative reconstruction error of the projection deltas, held-out GSM8K perplexity, WikiText-2
perplexity, and the fraction of the fine-tune's GSM8K-perplexity gain kept
((ppl_base − ppl_method) / (ppl_base − ppl_ft)). Writes a markdown table with date, device and
command.
"""

from __future__ import annotations

import datetime
import sys
import time

import jax
import numpy as np
from absl import app, flags

from deltajax import calibrate, delta
from deltajax import data as D
from deltajax import eval as E
from deltajax.models_io import load_model
from deltajax.pipeline import compress_loaded

FLAGS = flags.FLAGS
flags.DEFINE_string("base", "smollm2", "Base model.")
flags.DEFINE_string("finetuned", None, "Fine-tuned model.", required=True)
flags.DEFINE_string("out", "benchmarks/quality.md", "Markdown output.")
flags.DEFINE_integer("eval_windows", 16, "Windows per perplexity evaluation.")
flags.DEFINE_integer("eval_seq_len", 256, "Tokens per window.")
flags.DEFINE_list("only", [], "Run only these row labels (or label prefixes).")
flags.DEFINE_integer("calib_windows", 32, "Calibration windows (GSM8K train split) for methods "
                     "that calibrate (Delta-CoMe, GPTQ).")
flags.DEFINE_integer("calib_seq_len", 256, "Tokens per calibration window.")

ROWS = [
    ("BitDelta (1 bit, mean|Δ| scale)", {"name": "bitdelta"}),
    ("RTN 2-bit g128", {"name": "rtn", "bits": 2, "group": 128}),
    ("RTN 1-bit g128 sym", {"name": "rtn", "bits": 1, "group": 128, "sym": True}),
    ("LowRank α=1/16", {"name": "lowrank", "ratio": 1 / 16}),
    ("LowRank α=1/32", {"name": "lowrank", "ratio": 1 / 32}),
    ("LowRank α=1/64", {"name": "lowrank", "ratio": 1 / 64}),
    ("LowRank α=1/128", {"name": "lowrank", "ratio": 1 / 128}),
    ("DARE 16x (p=0.9375)", {"name": "dare", "p": 1 - 1 / 16}),
    ("DARE 32x", {"name": "dare", "p": 1 - 1 / 32}),
    ("DARE 64x", {"name": "dare", "p": 1 - 1 / 64}),
    ("DARE 128x", {"name": "dare", "p": 1 - 1 / 128}),
    ("Delta-CoMe α=1/16 data-free", {"name": "deltacome", "ratio": 1 / 16}, 0),
    ("Delta-CoMe α=1/16", {"name": "deltacome", "ratio": 1 / 16}),
    ("Delta-CoMe α=1/32", {"name": "deltacome", "ratio": 1 / 32}),
    ("Delta-CoMe α=1/64", {"name": "deltacome", "ratio": 1 / 64}),
    ("Delta-CoMe α=1/128", {"name": "deltacome", "ratio": 1 / 128}),
    ("GPTQ 2-bit g128", {"name": "gptq", "bits": 2, "group": 128}),
]


def main(argv):
    del argv
    base, cfg, tok, _ = load_model(FLAGS.base)
    ft, _, _, _ = load_model(FLAGS.finetuned)
    held = D.read_texts(D.default_file("gsm8k_heldout"), split="heldout")
    gsm = D.token_windows(tok, held, FLAGS.eval_seq_len, FLAGS.eval_windows)
    wiki = D.token_windows(tok, D.read_texts(D.default_file("wikitext2")), FLAGS.eval_seq_len,
                           FLAGS.eval_windows)

    def ppl(p):
        return (E.perplexity(p, cfg, gsm, progress=False)["ppl"],
                E.perplexity(p, cfg, wiki, progress=False)["ppl"])

    pb, pf = ppl(base), ppl(ft)
    print(f"base {pb}, fine-tune {pf}")
    # layer-output error on held-out text: inputs of every projection of the fine-tune
    held_stats = calibrate.collect_stats(ft, cfg, gsm[: max(4, FLAGS.eval_windows // 2)],
                                         batch_size=4)
    rows = []
    for label, m, *calib in ROWS:
        if FLAGS.only and not any(label.startswith(o) for o in FLAGS.only):
            continue
        t0 = time.perf_counter()
        n_cal = calib[0] if calib else FLAGS.calib_windows
        res = compress_loaded(base, ft, cfg, {
            "method": m, "keep_other": True, "seed": 0, "calib_windows": n_cal,
            "calib_seq_len": FLAGS.calib_seq_len, "calib_batch_size": 8},
            tok=tok, log=lambda *_: None)
        out_err = float(np.mean(list(E.output_errors(res["deltas"], {
            n: leaf for n, leaf in res["compressed"].items() if n in held_stats},
            held_stats).values())))
        # merge == attach (tested); dense params share one compiled forward across methods
        pc = ppl(delta.merge(base, res["compressed"]))
        acc = res["accounting"]
        err = float(np.mean(list(res["rel_by_type"].values())))
        gain = (pb[0] - pc[0]) / (pb[0] - pf[0])
        rows.append((label, acc["linear_ratio"], acc["total_ratio"], acc["linear_bits_per_param"],
                     err, out_err, pc[0], pc[1], gain))
        print(f"{label}: {rows[-1][1:]} ({time.perf_counter() - t0:.0f} s)", flush=True)
    dev = jax.devices()[0]
    lines = [
        "# Quality of delta compression methods on a real pair",
        "",
        f"- date: {datetime.date.today().isoformat()}; device: {dev.platform} "
        f"({getattr(dev, 'device_kind', '')}); jax {jax.__version__}",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- base: {FLAGS.base}; fine-tune: {FLAGS.finetuned}",
        f"- held-out GSM8K: last 500 problems of gsm8k_train.jsonl, {gsm.shape[0]} windows x "
        f"{gsm.shape[1]} tokens; WikiText-2: first {wiki.shape[0]} windows of the raw test set",
        "- ratios are exact (every code word, scale, zero, factor, value and seed byte counted) "
        "against a 16-bit delta; 'whole' also counts the bf16 delta kept for embeddings and "
        "norms",
        "",
        f"Base: GSM8K ppl {pb[0]:.3f}, WikiText-2 ppl {pb[1]:.3f}. Fine-tune: GSM8K ppl "
        f"{pf[0]:.3f}, WikiText-2 ppl {pf[1]:.3f}.",
        "",
        "- rel. error: mean over projections of ‖Δ−Δ̂‖/‖Δ‖; output error: mean of "
        "‖X(Δ−Δ̂)ᵀ‖/‖XΔᵀ‖ with X each projection's inputs in the fine-tune on held-out GSM8K "
        f"({held_stats[next(iter(held_stats))].count:.0f} tokens)",
        f"- calibrated methods (Delta-CoMe, GPTQ): {FLAGS.calib_windows} windows × "
        f"{FLAGS.calib_seq_len} tokens of the GSM8K train split, true-sequential",
        "",
        "| method | linear ratio | whole ratio | bits/param | rel. error | output error "
        "| GSM8K ppl | WikiText-2 ppl | gain kept |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r[0]} | {r[1]:.2f}x | {r[2]:.2f}x | {r[3]:.3f} | {r[4]:.3f} | "
                     f"{r[5]:.3f} | {r[6]:.3f} | {r[7]:.3f} | {100 * r[8]:.1f}% |")
    text = "\n".join(lines) + "\n"
    with open(FLAGS.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    app.run(main)
