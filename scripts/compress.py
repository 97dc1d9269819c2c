r"""Compress the delta between a base and a fine-tuned model; write a packed delta checkpoint.

Example:
  python scripts/compress.py --base=smollm2 --finetuned=~/.cache/deltajax/smollm2-gsm8k-ft \
      --config=configs/bitdelta.py --config.distill_steps=50 --out=/tmp/delta-bitdelta

--base / --finetuned: HF directories, converted checkpoints (scripts/convert.py), or 'smollm2'.
--config: a configs/*.py file; any field can be overridden with --config.<field>=<value>
(e.g. --config.method.bits=3). Prints the accounting table and the per-matrix-type relative
reconstruction error; the same accounting is stored in the checkpoint's meta.json.

--mesh=data:D,model:M: load both models straight into their shards and compress on the mesh
(data-free methods: matrices spread over all devices; calibrated ones: windows over data, the
Hessian sums all-reduced). Multi-host (e.g. a TPU slice): run the same command on every host,
  gcloud compute tpus tpu-vm ssh $TPU --worker=all --command="cd deltajax && \
      python scripts/compress.py --base=... --finetuned=... --mesh=data:1,model:16 --out=gs://..."
jax.distributed.initialize() is called when the environment says so (TPU workers,
JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID, SLURM, Open MPI).
"""

from __future__ import annotations

import time

from absl import app, flags
from ml_collections import config_flags

from deltajax import pipeline
from deltajax.parallel import sharding

FLAGS = flags.FLAGS
flags.DEFINE_string("base", None, "Base model (HF dir, converted checkpoint, or 'smollm2').",
                    required=True)
flags.DEFINE_string("finetuned", None, "Fine-tuned model of the same architecture.",
                    required=True)
flags.DEFINE_string("out", None, "Output directory for the compressed delta.", required=True)
flags.DEFINE_bool("overwrite", False, "Replace an existing --out.")
config_flags.DEFINE_config_file("config", "configs/rtn4.py", "Compression config file.")
flags.DEFINE_string("mesh", None, "Device mesh, e.g. 'data:1,model:8' (product = device count; "
                    "one axis may be -1). Default: no mesh (one device, today's behaviour).")


def main(argv):
    del argv
    t0 = time.perf_counter()
    mesh = sharding.mesh_from_flag(FLAGS.mesh, tag="compress")
    res = pipeline.compress_pair(FLAGS.base, FLAGS.finetuned, FLAGS.config, out=FLAGS.out,
                                 overwrite=FLAGS.overwrite, mesh=mesh)
    print(res["report"])
    print(f"[compress] wrote {res['out']} in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    app.run(main)
