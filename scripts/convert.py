r"""Convert a Hugging Face checkpoint (Llama / Mistral / Qwen2 / SmolLM2) to a deltajax checkpoint.

Reads ``config.json`` and ``model.safetensors`` / sharded safetensors / ``pytorch_model*.bin``,
validates every tensor against the config, and writes an orbax params checkpoint plus
``meta.json``. Nothing is written at ``--out`` if anything fails.

Example:

  python scripts/convert.py --hf_dir=/models/SmolLM2-135M-Instruct \
      --out=/ckpt/smollm2-135m --dtype=bfloat16

  # tensor-parallel placement while loading: each tensor goes straight into its shards
  # (parallel.sharding.PARAM_RULES); 8 devices, or several hosts started the standard JAX way
  # (run the same command on every host; see parallel.sharding.maybe_initialize_distributed):
  python scripts/convert.py --hf_dir=/models/Llama-2-70b-hf --out=/ckpt/llama2-70b \
      --dtype=bfloat16 --mesh=data:1,model:8
"""

from __future__ import annotations

from absl import flags, logging

from deltajax import cli
from deltajax.io import hf
from deltajax.io.resolve import resolve_model_dir
from deltajax.parallel import sharding

_HF_DIR = flags.DEFINE_string("hf_dir", None, "Hugging Face model: a directory, a Hub id "
                                "'org/name[@revision]', a .gguf file or 'smollm2'.", required=True)
_OUT = flags.DEFINE_string("out", None, "Output checkpoint directory.", required=True)
_DTYPE = flags.DEFINE_enum(
    "dtype", None, ["float32", "bfloat16", "float16"], "Cast weights to this dtype (default: keep)."
)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out directory.")
_MESH = flags.DEFINE_string(
    "mesh", None, "Device mesh, e.g. 'data:1,model:8' (axes data, model; the product must equal "
    "the device count; one axis may be -1). Tensors are loaded straight into their shards. "
    "Default: no mesh (one device).")


def main(argv: list[str]) -> None:
    cli.no_extra_args(argv)
    cli.check_out(_OUT.value, _OVERWRITE.value, models=[_HF_DIR.value])  # before any work
    mesh = sharding.mesh_from_flag(_MESH.value, tag="convert")
    shard = None if mesh is None else sharding.param_sharding_fn(mesh)
    with cli.about("hf_dir"):
        src = resolve_model_dir(_HF_DIR.value)  # an HF dir, a Hub id, a .gguf file, 'smollm2'
        if not src.is_dir():
            raise FileNotFoundError(f"{_HF_DIR.value} is not a directory")
        s = hf.convert_hf_to_checkpoint(
            src, _OUT.value, dtype=_DTYPE.value, overwrite=_OVERWRITE.value,
            progress=True, sharding=shard,
        )
    c = s.config
    logging.info("config: %s", c)
    print(
        f"wrote {s.out_dir}: {c.model_type}, {c.num_hidden_layers} layers, hidden {c.hidden_size}; "
        f"{s.num_params:,} params in {s.num_tensors} tensors, {s.num_bytes / 2**20:,.1f} MiB "
        f"({', '.join(s.dtypes)}), {s.seconds:.1f} s"
    )


if __name__ == "__main__":
    cli.run(main, user_errors=(ImportError,))  # ImportError: no torch for .bin files
