r"""Compress the delta between a base and a fine-tuned model; write a packed delta checkpoint.

Example:
  python scripts/compress.py --base=smollm2 --finetuned=~/.cache/deltajax/smollm2-gsm8k-ft \
      --config=configs/bitdelta.py --config.distill_steps=50 --out=/tmp/delta-bitdelta

--base / --finetuned: HF directories, converted checkpoints (scripts/convert.py), 'smollm2',
.gguf files or Hub ids 'org/name[@revision]' (README: Model sources).
--config: a configs/*.py file whose get_config() returns a `deltajax.config.RunConfig`; every
field can be overridden, typed: --config.<field>=<value> (e.g. --config.calib_windows=0) and
--config.method.<field>=<value> (e.g. --config.method.bits=3, or --config.method.rank=64 with
configs/lowrank.py, a field whose default is None); --config.method=<name> swaps the method.
Prints the accounting table and the per-matrix-type relative reconstruction error; the same
accounting is stored in the checkpoint's meta.json.

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
from pathlib import Path

import jax
from absl import flags

from deltajax import cli, compress, delta, load_model, save_delta
from deltajax.io.resolve import load_model_config
from deltajax.parallel import sharding

FLAGS = flags.FLAGS
flags.DEFINE_string("base", None, "Base model (HF dir, converted checkpoint, or 'smollm2').",
                    required=True)
flags.DEFINE_string("finetuned", None, "Fine-tuned model of the same architecture.",
                    required=True)
flags.DEFINE_string("out", None, "Output directory for the compressed delta.", required=True)
flags.DEFINE_bool("overwrite", False, "Replace an existing --out.")
_CONFIG = cli.define_run_config("config", "configs/rtn4.py", "Compression config file.")
flags.DEFINE_string("mesh", None, "Device mesh, e.g. 'data:1,model:8' (product = device count; "
                    "one axis may be -1). Default: no mesh (one device, today's behaviour).")


def main(argv):
    cli.no_extra_args(argv)
    run_config = _CONFIG.value
    t0 = time.perf_counter()
    cli.check_out(FLAGS.out, FLAGS.overwrite, models=[FLAGS.base, FLAGS.finetuned],
                  inputs=[FLAGS.config, run_config.calib_data])  # fail before any work
    calib = run_config.calib_data
    if calib is not None and not Path(calib).expanduser().is_file():
        raise FileNotFoundError(f"--config.calib_data: calibration file {calib} does not exist")
    with cli.about("base"):
        base_cfg = load_model_config(FLAGS.base)
    with cli.about("config"):  # an impossible budget is refused before any weight is read
        delta.check_budgets(run_config, base_cfg)
    mesh = sharding.mesh_from_flag(FLAGS.mesh, tag="compress")
    with cli.about("base"):
        base, cfg, tok, _ = load_model(FLAGS.base, mesh=mesh)
    with cli.about("finetuned"):
        ft, ft_cfg, ft_tok, _ = load_model(FLAGS.finetuned, mesh=mesh)
        delta.check_pair(base, ft, base_cfg=cfg, ft_cfg=ft_cfg)
    t1 = time.perf_counter()
    comp = compress(base, ft, run_config, cfg=cfg, tokenizer=tok or ft_tok, mesh=mesh,
                    log=print)
    report, _ = delta.report(base, delta.extract(base, ft), comp,
                             seconds=time.perf_counter() - t1)
    print(report)
    if jax.process_count() > 1:  # multi-host: every process needs the whole (small) delta
        from jax.experimental import multihost_utils

        comp = {n: leaf.replace(container=multihost_utils.process_allgather(
            leaf.container, tiled=True)) for n, leaf in comp.items()}
    out = save_delta(comp, FLAGS.out, cfg=cfg, base_params=base, overwrite=FLAGS.overwrite,
                     extra={"config": run_config.to_dict(), "base": FLAGS.base,
                            "finetuned": FLAGS.finetuned})
    print(f"[compress] wrote {out} in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    cli.run(main)
