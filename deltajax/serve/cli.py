r"""Serve a base model and its compressed fine-tunes over an OpenAI-compatible HTTP API.

Example:
  deltajax-serve --base=smollm2 --delta=math=/tmp/d-math,chat=/tmp/d-chat \
      --slots=16 --max_len=2048 --pool=4 --port=8000
  # (or: python scripts/serve.py ...), then:
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \
      -d '{"model": "math", "messages": [{"role": "user", "content": "12*7?"}]}'
  curl http://127.0.0.1:8000/v1/load_lora_adapter -H 'Content-Type: application/json' \
      -d '{"lora_name": "code", "lora_path": "/tmp/d-code"}'

--base: an HF directory, a converted checkpoint or 'smollm2' (its own tokenizer is used);
requests name it by --base_name (default: the directory's name). --delta: saved delta
directories (scripts/compress.py) as name=path, comma separated or repeated; each is checked
against the base's fingerprint. --slots decode slots of --max_len positions each (prompt +
completion); --pool fine-tunes resident per pool (one pool per delta layout; the least recently
used idle one is evicted when a pool is full). Listens on --host (default 127.0.0.1: only this
machine) at --port; --api_key (or $DELTAJAX_API_KEY) requires a bearer key on /v1/. --mesh is
refused: the serving engine runs on one device for now.

The flags live here (not in scripts/serve.py) so that the `deltajax-serve` console entry and
the script share them.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("base", None, "Base model: HF dir, converted checkpoint, or 'smollm2'.",
                    required=True)
flags.DEFINE_string("base_name", None, "Model name of the bare base (default: the base "
                    "directory's name).")
flags.DEFINE_multi_string("delta", [], "Fine-tunes as name=path (saved delta dirs); comma-"
                          "separated or repeated.")
flags.DEFINE_integer("slots", 8, "Decode slots (concurrent sequences).")
flags.DEFINE_integer("max_len", 2048, "Positions per slot: prompt + completion tokens.")
flags.DEFINE_integer("pool", 4, "Fine-tunes resident at once per pool (delta layout).")
flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
flags.DEFINE_integer("port", 8000, "Port to listen on.")
flags.DEFINE_string("mesh", None, "Device mesh: not implemented by the serving engine (refused).")
flags.DEFINE_integer("max_queue", 1024, "Waiting sequences at most; beyond, requests get 429.")
flags.DEFINE_list("prefill_buckets", [], "Prompt lengths compiled for prefill (default 16, 32, "
                  "... up to --max_len; the last must be --max_len).")
flags.DEFINE_integer("prefills_per_step", 1, "Prefills between two decode steps while decoding.")
flags.DEFINE_integer("default_max_tokens", 256, "Completion length when a chat request sets "
                     "none (capped by the context).")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                  "Cast the base weights to this dtype after loading (default: keep).")
flags.DEFINE_enum("implementation", "auto", ["auto", "xla", "pallas_gpu", "pallas_tpu"],
                  "Multi-tenant delta kernels.")
flags.DEFINE_bool("warmup", True, "Compile every prefill bucket and the decode step before "
                  "listening.")
flags.DEFINE_string("api_key", None, "Require 'Authorization: Bearer <key>' on /v1/ requests "
                    "(default: the DELTAJAX_API_KEY environment variable, else open).")
flags.DEFINE_enum("log_level", "info", ["critical", "error", "warning", "info", "debug"],
                  "uvicorn log level.")


def parse_deltas(values: list[str]) -> dict[str, str]:
    """`server.parse_delta_specs`, a mistake as SystemExit("error: ...")."""
    from deltajax.serve.server import parse_delta_specs

    try:
        return parse_delta_specs(values)
    except ValueError as e:
        raise SystemExit(f"error: --delta {e}") from None


def _check_port(host: str, port: int) -> None:
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise SystemExit(f"error: cannot listen on {host}:{port}: {e.strerror or e}") from None


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
    if FLAGS.mesh:
        raise SystemExit("error: --mesh is not implemented by the serving engine (it runs on one "
                         "device); serve without --mesh (scripts/generate.py --mesh shards "
                         "offline generation)")
    for name, lo in [("slots", 1), ("max_len", 2), ("pool", 1), ("max_queue", 1),
                     ("prefills_per_step", 1), ("default_max_tokens", 1), ("port", 0)]:
        if getattr(FLAGS, name) < lo:
            raise SystemExit(f"error: --{name} must be >= {lo}, got {getattr(FLAGS, name)}")
    if FLAGS.port > 65535:
        raise SystemExit(f"error: --port must be <= 65535, got {FLAGS.port}")
    try:
        buckets = [int(b) for b in FLAGS.prefill_buckets] or None
    except ValueError:
        raise SystemExit(f"error: --prefill_buckets must be integers, got "
                         f"{FLAGS.prefill_buckets}") from None
    if buckets and (max(buckets) != FLAGS.max_len or min(buckets) < 1):
        raise SystemExit(f"error: --prefill_buckets {buckets} must be >= 1 and end at "
                         f"--max_len={FLAGS.max_len}")
    deltas = parse_deltas(FLAGS.delta)
    _check_port(FLAGS.host, FLAGS.port)

    import jax

    from deltajax.io.resolve import describe, load_model
    from deltajax.serve.engine import Engine, EngineError
    from deltajax.serve.server import serve

    t0 = time.perf_counter()
    try:
        base, cfg, tok, src = load_model(FLAGS.base)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: --base={FLAGS.base}: {e}") from None
    if tok is None:
        raise SystemExit(f"error: {src} has no tokenizer files (tokenizer.json / "
                         "tokenizer_config.json); serving needs the checkpoint's tokenizer")
    base_name = FLAGS.base_name or Path(src).name
    if base_name in deltas:
        raise SystemExit(f"error: --delta name {base_name!r} is the base's name (--base_name)")
    try:
        engine = Engine(base, cfg, tok, base_name=base_name, slots=FLAGS.slots,
                        max_len=FLAGS.max_len, pool_capacity=FLAGS.pool,
                        prefill_buckets=buckets, max_queue=FLAGS.max_queue,
                        prefills_per_step=FLAGS.prefills_per_step,
                        default_max_tokens=FLAGS.default_max_tokens,
                        implementation=FLAGS.implementation, dtype=FLAGS.dtype)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    for name, path in deltas.items():  # checked against the stored base, before any cast
        try:
            info = engine.load(name, path)
        except EngineError as e:
            raise SystemExit(f"error: --delta {name}={path}: {e.message}") from None
        print(f"[serve] fine-tune {name}: {path} ({info['layout']})", flush=True)
    print(f"[serve] base {base_name} ({src}): {describe(cfg)}; {jax.devices()[0].device_kind}; "
          f"loaded in {time.perf_counter() - t0:.1f} s", flush=True)
    if FLAGS.warmup:
        print(f"[serve] compiled prefill buckets {list(engine.buckets)} and decode in "
              f"{engine.warmup():.1f} s", flush=True)
    print(f"[serve] {FLAGS.slots} slots x {FLAGS.max_len} positions; listening on "
          f"http://{FLAGS.host}:{FLAGS.port}/v1", flush=True)
    serve(engine, host=FLAGS.host, port=FLAGS.port, log_level=FLAGS.log_level,
          api_key=FLAGS.api_key or os.environ.get("DELTAJAX_API_KEY") or None)


def run():
    """Console entry point (`deltajax-serve`)."""
    app.run(main)


if __name__ == "__main__":
    run()
