r"""Quality of compressed deltas: perplexities, GSM8K accuracy, KL, errors -> JSON + markdown.

  python scripts/eval.py --base=smollm2 --finetuned=~/.cache/deltajax/smollm2-gsm8k-ft \
      --delta=out/dc16,out/rtn4 --out=out/eval.md
  python scripts/eval.py --base=smollm2 --finetuned=~/.cache/deltajax/smollm2-gsm8k-ft \
      --sweep=configs/eval_sweep.py --out=benchmarks/quality.md

For the base, the fine-tune, every saved delta (`--delta`, made by scripts/compress.py; a delta
saved for another base is refused) and every row of a sweep config (compressed on the fly):
WikiText-2 perplexity, held-out perplexity on the fine-tune's domain (GSM8K: the last 500
problems of gsm8k_train.jsonl, never trained on), greedy GSM8K exact-match accuracy on held-out
problems (± binomial s.e.), KL(fine-tune ‖ compressed) per token, per-matrix relative
reconstruction error, true linear / whole ratios, and the fraction of the fine-tune's gain kept.
Writes the markdown table (`--out`), the JSON beside it (same name, .json) and PNG plots
(spectra of the deltas, error vs bits per parameter, Delta-CoMe's bands) beside the table.
"""

from __future__ import annotations

import datetime
import json
import sys
import time
from pathlib import Path

import jax
from absl import app, flags

from deltajax import cli, delta
from deltajax import data as D
from deltajax.errors import check_local_path
from deltajax.eval import harness as E
from deltajax.eval import plots
from deltajax.io.resolve import load_model
from deltajax.serve import generate as G

FLAGS = flags.FLAGS
flags.DEFINE_string("base", "smollm2", "Base model: 'smollm2', an HF dir or a converted ckpt.")
flags.DEFINE_string("finetuned", None, "The fine-tuned model (HF dir or converted ckpt).")
flags.DEFINE_list("delta", [], "Saved compressed deltas to evaluate (comma-separated dirs).")
flags.DEFINE_string("sweep", None, "Sweep config (get_config() -> [(label, method dict, "
                    "options)]), e.g. configs/eval_sweep.py: compress on the fly and evaluate.")
flags.DEFINE_list("only", [], "Sweep: run only rows whose label starts with one of these.")
flags.DEFINE_string("out", "out/eval.md", "Markdown output; the JSON and PNGs go beside it.")
flags.DEFINE_bool("overwrite", False, "Replace an existing --out report (and its JSON).")
flags.DEFINE_bool("plots", True, "Write PNG plots beside the table.")
flags.DEFINE_bool("resume", False, "Keep rows already in the output JSON (same settings) and "
                  "evaluate only the missing ones.")
flags.DEFINE_integer("gsm8k_problems", 200, "Held-out GSM8K problems for accuracy (0: skip).")
flags.DEFINE_integer("gen_batch", 64, "Prompts per generation batch (fixed shape).")
flags.DEFINE_integer("max_new_tokens", 256, "Generated tokens at most per problem.")
flags.DEFINE_bool("stop_blank_line", False, "Also stop a row at a blank line (GSM8K answers "
                  "have none; saves time on CPU, may cut a base model's paragraphs).")
flags.DEFINE_integer("wiki_windows", 16, "WikiText-2 windows for perplexity.")
flags.DEFINE_integer("domain_windows", 16, "Held-out GSM8K windows for perplexity and KL.")
flags.DEFINE_integer("seq_len", 256, "Tokens per perplexity / KL window.")
flags.DEFINE_integer("batch_size", 4, "Windows per perplexity / KL batch.")
flags.DEFINE_integer("calib_windows", 32, "Calibration windows (GSM8K train split) for methods "
                     "that calibrate; a row's own calib_windows wins (0: data-free).")
flags.DEFINE_integer("calib_seq_len", 256, "Tokens per calibration window.")
flags.DEFINE_string("ft_recipe", "scripts/finetune.py --base=smollm2 --steps=60 "
                    "--batch_size=4 --seq_len=192 --lr=1e-4 --warmup_steps=6 (AdamW, linear "
                    "warmup + cosine, clip 1.0, fp32, loss on answers only, data order seed 0, "
                    "GSM8K train minus its last 500 problems)",
                    "How the fine-tune was made (stated in the report).")
flags.DEFINE_bool("progress", True, "Progress bars.")
flags.DEFINE_string("render", None, "Only re-render the markdown and plots of a saved JSON "
                    "report (no model is run); --finetuned, if loadable, gives the spectra plot.")
flags.DEFINE_string("render_meta", "{}", "With --render: JSON object of meta fields to fill in "
                    "where the saved report lacks them (date, device, command, stop_ids).")
flags.DEFINE_string("notes", None, "A markdown file appended below the table (reading notes).")
flags.DEFINE_float("time_budget_s", 0, "Sweep: start no new row after this many seconds (0: no "
                   "limit); the JSON is saved after every row, so --resume can finish later.")


def _settings() -> dict:
    return {k: getattr(FLAGS, k) for k in (
        "base", "finetuned", "gsm8k_problems", "gen_batch", "max_new_tokens", "stop_blank_line",
        "wiki_windows", "domain_windows", "seq_len", "calib_windows", "calib_seq_len")}


def _check_out(*, keep: Path | None = None) -> None:
    """--out before any work: never an input (or inside one), writable, and an existing report
    only replaced with --overwrite (or --resume, which extends it; `keep`: the JSON that
    --render re-renders in place)."""
    with cli.about("out"):
        check_local_path(FLAGS.out, "report")
    out_md = Path(FLAGS.out).expanduser()
    out_json = out_md.with_suffix(".json")
    if out_md.suffix == ".json":
        raise app.UsageError(f"--out={FLAGS.out}: give the markdown path (the JSON is written "
                             "beside it with the suffix .json)")
    from deltajax.io import params_ckpt
    from deltajax.io.resolve import model_path

    inputs = [model_path(FLAGS.base), model_path(FLAGS.finetuned), *FLAGS.delta, FLAGS.sweep,
              FLAGS.notes]
    with cli.about("out"):
        for p in (out_md, out_json):
            params_ckpt.check_not_input(p, [i for i in inputs if i], what="--out")
            if p.is_dir():
                raise IsADirectoryError(f"{p} is a directory; --out is the report's .md path")
        params_ckpt.check_writable(out_md)
    if FLAGS.overwrite or FLAGS.resume:
        return
    same = keep is not None and out_json.resolve() == keep.resolve()
    existing = [str(p) for p in (out_md, out_json) if p.exists() and not same]
    if existing:
        raise FileExistsError(f"--out: {' and '.join(existing)} exist(s); pass --overwrite to "
                              "replace the report (or --resume to extend it)")


def main(argv):
    cli.no_extra_args(argv)
    if FLAGS.render:
        _check_out(keep=Path(FLAGS.render).expanduser())
        _render()
        return
    if FLAGS.finetuned is None:
        raise app.UsageError("--finetuned is required")
    if not FLAGS.delta and not FLAGS.sweep:
        raise app.UsageError("give --delta=dir1,dir2 and/or --sweep=configs/eval_sweep.py")
    for p in FLAGS.delta:
        if not Path(p).expanduser().exists():
            raise FileNotFoundError(f"--delta: {p} does not exist")
    for name, lo in (("seq_len", 2), ("batch_size", 1), ("gen_batch", 1), ("max_new_tokens", 1),
                     ("gsm8k_problems", 0), ("calib_seq_len", 2), ("calib_windows", 0)):
        if getattr(FLAGS, name) < lo:
            raise app.UsageError(f"--{name} must be >= {lo}, got {getattr(FLAGS, name)}")
    _check_out()
    with cli.about("sweep"):
        rows_cfg = E.load_sweep(FLAGS.sweep) if FLAGS.sweep else []
    out_md = Path(FLAGS.out)
    out_json = out_md.with_suffix(".json")
    settings = _settings()
    previous = []
    if FLAGS.resume and out_json.exists():
        old = json.loads(out_json.read_text())
        if old.get("meta", {}).get("settings") != settings:
            raise ValueError(f"--resume: {out_json} was made with other settings "
                             f"({old.get('meta', {}).get('settings')}), not {settings}")
        previous = old["rows"]
        print(f"[eval] resuming: {len(previous)} rows from {out_json}")

    with cli.about("base"):
        base, cfg, tok, _ = load_model(FLAGS.base)
    with cli.about("finetuned"):
        ft, ft_cfg, ft_tok, _ = load_model(FLAGS.finetuned)
        delta.check_pair(base, ft, base_cfg=cfg, ft_cfg=ft_cfg)
    tok = tok or ft_tok
    if tok is None:
        raise ValueError("neither the base nor the fine-tune directory has a tokenizer")
    held_ex = D.gsm8k_examples(D.default_file("gsm8k_heldout"), "heldout")
    held_txt = D.read_texts(D.default_file("gsm8k_heldout"), split="heldout")
    domain = D.token_windows(tok, held_txt, FLAGS.seq_len, FLAGS.domain_windows)
    wiki = D.token_windows(tok, D.read_texts(D.default_file("wikitext2")), FLAGS.seq_len,
                           FLAGS.wiki_windows)
    # accuracy on the held-out problems from the end of the split; the perplexity windows come
    # from its start, so the two never share a problem while both fit in the 500
    problems = held_ex[len(held_ex) - min(FLAGS.gsm8k_problems, len(held_ex)):] \
        if FLAGS.gsm8k_problems > 0 else []
    stops = G.default_stop_ids(tok) + (E.blank_line_stop_ids(tok) if FLAGS.stop_blank_line
                                       else [])
    ev = E.Evaluator(base, ft, cfg, tok, wiki_tokens=wiki, domain_tokens=domain,
                     gsm8k_examples=problems, batch_size=FLAGS.batch_size,
                     gen_batch=FLAGS.gen_batch, max_new_tokens=FLAGS.max_new_tokens,
                     stop_ids=stops, progress=FLAGS.progress)
    dev = jax.devices()[0]
    meta = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": f"{dev.platform} ({getattr(dev, 'device_kind', '')})",
        "jax": jax.__version__,
        "command": "python " + " ".join(sys.argv),
        "settings": settings,
        "stop_ids": stops,
        "finetune_recipe": FLAGS.ft_recipe,
        "gsm8k_problems_used": len(problems),
    }
    done = {r["label"] for r in previous}
    rows = list(previous)
    with cli.about("delta"):
        rows += E.evaluate_saved(ev, [p for p in FLAGS.delta if str(p) not in done])
    skipped = []

    def save_partial(all_rows):
        out_json.parent.mkdir(parents=True, exist_ok=True)
        E.write_text_atomic(out_json, json.dumps(E._jsonable({
            "meta": {**meta, "partial": True}, "base": ev.base_metrics,
            "finetune": ev.ft_metrics, "rows": all_rows}), indent=1, allow_nan=False))

    if rows_cfg:
        todo = [r for r in rows_cfg if r[0] not in done]
        deadline = time.time() + FLAGS.time_budget_s if FLAGS.time_budget_s > 0 else None
        finished = []

        def on_row(r):
            finished.append(r)
            save_partial(rows + finished)

        new, skipped = E.run_sweep(ev, todo, only=FLAGS.only, defaults={
            "calib_windows": FLAGS.calib_windows, "calib_seq_len": FLAGS.calib_seq_len},
            on_row=on_row, deadline=deadline)
        rows += new
        order = {r[0]: i for i, r in enumerate(rows_cfg)}
        rows.sort(key=lambda r: order.get(r["label"], -1))

    report = {"meta": meta, "base": ev.base_metrics, "finetune": ev.ft_metrics, "rows": rows,
              "skipped": skipped}
    spectra = E.delta_spectra(delta.extract(base, ft)) if FLAGS.plots and rows else None
    _write(report, out_md, out_json, spectra, f"the evaluated pair ({FLAGS.finetuned})")


def _render() -> None:
    src = Path(FLAGS.render)
    if not src.is_file():
        raise FileNotFoundError(f"--render: {src} not found")
    report = json.loads(src.read_text())
    for k in ("meta", "base", "finetune", "rows"):
        if k not in report:
            raise ValueError(f"--render: {src} has no {k!r}")
    fill = json.loads(FLAGS.render_meta)
    report["meta"] = {**fill, **{k: v for k, v in report["meta"].items() if v is not None}}
    report["meta"].pop("partial", None)
    report.setdefault("skipped", [])
    if FLAGS.sweep:  # rows of the sweep that the saved report lacks
        have = {r["label"] for r in report["rows"]} | {s["label"] for s in report["skipped"]}
        report["skipped"] += [{"label": r[0], "reason": "not run"}
                              for r in E.load_sweep(FLAGS.sweep) if r[0] not in have]
    spectra, source = None, None
    if FLAGS.plots and FLAGS.finetuned:
        with cli.about("base"):
            base, cfg, _, _ = load_model(FLAGS.base)
        with cli.about("finetuned"):
            ft, ft_cfg, _, _ = load_model(FLAGS.finetuned)
            delta.check_pair(base, ft, base_cfg=cfg, ft_cfg=ft_cfg)
        spectra, source = E.delta_spectra(delta.extract(base, ft)), FLAGS.finetuned
    out_md = Path(FLAGS.out)
    _write(report, out_md, out_md.with_suffix(".json"), spectra, source)


def _header(report) -> list[str]:
    meta, st = report["meta"], report["meta"]["settings"]
    b, f = report["base"], report["finetune"]
    n = meta.get("gsm8k_problems_used", b.get("gsm8k_n", 0))
    acc_line = (f"- GSM8K accuracy: greedy, exact match of the number after `####` (answer "
                f"extraction: `####`, 'The answer is', last number; `$`, commas, trailing `.` "
                f"ignored), prompt `Question: ...\\nAnswer: ` (the fine-tune's format), "
                f"{n} held-out problems (the last {n} of the 500), ≤ {st['max_new_tokens']} "
                f"new tokens, stop tokens {meta.get('stop_ids')}; ± is the binomial standard "
                "error" if n else "- GSM8K accuracy: not measured")
    dom_tok = st["domain_windows"] * st["seq_len"]
    lines = [
        "# Quality of delta compression methods on a real pair",
        "",
        f"- date: {meta.get('date')}; device: {meta.get('device')}; jax "
        f"{meta.get('jax', jax.__version__)}",
        f"- command: `{meta.get('command')}`",
        f"- base: {st['base']}; fine-tune: {st['finetuned']}",
        f"- fine-tune recipe: `{meta.get('finetune_recipe', FLAGS.ft_recipe)}`",
        "- held-out split: the last 500 problems of gsm8k_train.jsonl (never trained on; "
        "calibration uses the other problems)",
        f"- domain ppl and KL: {st['domain_windows']} windows × {st['seq_len']} tokens "
        f"({dom_tok} tokens) from the start of the held-out problems (question + answer text); "
        "KL = Σ_v p_ft log(p_ft / p_compressed) per token, averaged",
        f"- WikiText-2 ppl: the first {st['wiki_windows']} windows × {st['seq_len']} tokens of "
        "the raw test set",
        acc_line,
        f"- calibrated methods: {st['calib_windows']} windows × {st['calib_seq_len']} tokens of "
        "the GSM8K train split, true-sequential (rows marked data-free use none)",
        "- ratios are TRUE (every stored byte: codes with padding, scales, zeros, factors, "
        "values, masks, seeds) against a 16-bit delta; 'linear' over the projections, 'whole' "
        "also counts the bf16 delta kept for embeddings and norms",
        "- rel. error = mean over projections of ‖Δ−Δ̂‖_F/‖Δ‖_F (per matrix in the JSON); gain "
        "kept = (m_compressed − m_base) / (m_ft − m_base) for GSM8K accuracy and domain ppl; "
        "n/a where the fine-tune moves the metric by less than 1 % of the base's perplexity "
        "(1 accuracy point), n.s. where its accuracy gain is within 2 standard errors",
        "",
        f"Base: WikiText-2 {b['wikitext2_ppl']:.3f}, domain ppl {b['domain_ppl']:.3f}, KL to FT "
        f"{b['kl']:.4f}" + (f", GSM8K {100 * b['gsm8k_acc']:.2f}% ± {100 * b['gsm8k_stderr']:.2f}"
                            if n else "")
        + f". Fine-tune: WikiText-2 {f['wikitext2_ppl']:.3f}, domain ppl "
        f"{f['domain_ppl']:.3f}" + (f", GSM8K {100 * f['gsm8k_acc']:.2f}% ± "
                                    f"{100 * f['gsm8k_stderr']:.2f}" if n else "") + ".",
    ]
    return lines


def _write(report, out_md, out_json, spectra, spectra_source) -> None:
    header = _header(report)
    footer = []
    if FLAGS.plots and report["rows"]:
        pngs = plots.write_plots(report, out_md.parent, prefix=out_md.stem, spectra=spectra)
        report["plots"] = [Path(p).name for p in pngs]
        footer += ["Plots: " + ", ".join(f"[{Path(p).name}]({Path(p).name})" for p in pngs)
                   + (f" (spectra: delta of {spectra_source})" if spectra else "")]
    if FLAGS.notes:
        footer += ["", *Path(FLAGS.notes).read_text().splitlines()]
    text = E.write_report(report, out_md, out_json, header=header, footer=footer)
    print(text)
    print(f"[eval] wrote {out_md}, {out_json}")


if __name__ == "__main__":
    cli.run(main)
