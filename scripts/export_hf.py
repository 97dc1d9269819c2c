r"""Export a deltajax params checkpoint (from scripts/convert.py) as a Hugging Face model directory.

The result loads with ``transformers.AutoModelForCausalLM.from_pretrained(out)``. Tokenizer and
generation files are copied from ``--tokenizer_from`` (usually the original HF directory).
Compressed-delta checkpoints must be merged into dense params first.

Example:

  python scripts/export_hf.py --ckpt=/ckpt/smollm2-135m --out=/models/smollm2-135m-hf \
      --tokenizer_from=/models/SmolLM2-135M-Instruct --dtype=bfloat16 --max_shard_mb=2000
"""

from __future__ import annotations

import time
from pathlib import Path

from absl import flags

from deltajax import cli
from deltajax.io import hf
from deltajax.io import params_ckpt as checkpoint

_CKPT = flags.DEFINE_string("ckpt", None, "deltajax params checkpoint directory.", required=True)
_OUT = flags.DEFINE_string("out", None, "Output Hugging Face directory.", required=True)
_TOKENIZER_FROM = flags.DEFINE_string(
    "tokenizer_from", None, "Hugging Face directory to copy tokenizer/generation files from "
    "(default: those the checkpoint holds, from scripts/convert.py)."
)
_DTYPE = flags.DEFINE_enum(
    "dtype", None, ["float32", "bfloat16", "float16"], "Weight dtype to write (default: as stored)."
)
_MAX_SHARD_MB = flags.DEFINE_integer(
    "max_shard_mb", None, "Split safetensors into shards of at most this many MiB (default: one)."
)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out directory.")


def main(argv: list[str]) -> None:
    cli.no_extra_args(argv)
    cli.check_out(_OUT.value, _OVERWRITE.value, inputs=[_CKPT.value, _TOKENIZER_FROM.value])
    if _MAX_SHARD_MB.value is not None and _MAX_SHARD_MB.value < 1:
        raise ValueError(f"--max_shard_mb must be >= 1, got {_MAX_SHARD_MB.value}")
    tok_from = _TOKENIZER_FROM.value
    if tok_from is not None and not Path(tok_from).expanduser().is_dir():
        raise FileNotFoundError(f"--tokenizer_from: {tok_from} is not a directory")
    if tok_from is None and any((Path(_CKPT.value).expanduser() / f).is_file()
                                for f in hf.TOKENIZER_FILES):
        tok_from = Path(_CKPT.value).expanduser()  # convert.py keeps the tokenizer
    t0 = time.perf_counter()
    with cli.about("ckpt"):
        params, cfg = checkpoint.load_params_ckpt(_CKPT.value)
    out = hf.export_hf(
        params,
        cfg,
        _OUT.value,
        tokenizer_from=tok_from,
        dtype=_DTYPE.value,
        max_shard_bytes=None if _MAX_SHARD_MB.value is None else _MAX_SHARD_MB.value * 2**20,
        overwrite=_OVERWRITE.value,
        progress=True,
    )
    files = ", ".join(sorted(p.name for p in out.iterdir()))
    print(f"wrote {out} ({files}) in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    cli.run(main)
