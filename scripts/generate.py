r"""Generate text with a base model and zero, one or several compressed deltas (multi-tenant).

Example:
  python scripts/generate.py --base=smollm2 --delta=/tmp/delta-bitdelta \
      --prompt="Natalia sold 48 clips in April and half as many in May. How many in total?" \
      --max_new_tokens=96 --stream

  # two fine-tunes and the bare base in one batch (prompt i uses --tenant i; -1 = base):
  python scripts/generate.py --base=smollm2 --delta=/tmp/d-math,/tmp/d-chat --other=base \
      --prompt="What is 12 * 7?" --prompt="Say hi." --prompt="What is 12 * 7?" --tenant=0,1,-1

--base: an HF directory, a converted checkpoint (scripts/convert.py) or 'smollm2'; its own
tokenizer is used (offline). --delta: saved delta directories (scripts/compress.py), comma
separated or repeated; each is checked against the base's fingerprint. With several deltas every
prompt names its fine-tune with --tenant (default: prompt i uses delta i % T) and the whole batch
runs at once, each row applying its own delta (deltajax.serve.multitenant). --chat applies the
tokenizer's chat template (default: on when it has one). Prints every answer and tokens/s
(compile time reported apart).

--mesh=data:D,model:M: tensor parallelism over model (base by parallel.sharding.PARAM_RULES,
deltas laid out consistently, their kernels run per shard under shard_map), batch over data:
  python scripts/generate.py --base=/ckpt/llama2-70b --delta=/tmp/d70 --mesh=data:1,model:8 \
      --prompt="What is 12 * 7?"
Multi-host: the same command on every host (jax.distributed.initialize() is called when the
environment says so).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from absl import flags

from deltajax import attach, cli, load_delta, load_model
from deltajax.io.params_ckpt import cast_params
from deltajax.io.resolve import describe
from deltajax.parallel import sharded, sharding
from deltajax.serve import generate as G
from deltajax.serve import multitenant

FLAGS = flags.FLAGS
flags.DEFINE_string("base", "smollm2", "Base model: HF dir, converted checkpoint, or 'smollm2'.")
flags.DEFINE_multi_string("delta", [], "Saved delta dir(s); comma-separated or repeated.")
flags.DEFINE_multi_string("tenant", [], "Delta index per prompt (-1 = bare base); comma-separated "
                          "or repeated; one value applies to every prompt. Default: i % T.")
flags.DEFINE_multi_string("prompt", [], "A prompt (repeat for several).")
flags.DEFINE_string("prompts_file", None, "Prompts: one per line, or .jsonl with a 'prompt' key.")
flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate at most per prompt.")
flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 = greedy.")
flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = off).")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1.0 = off).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_bool("chat", None, "Apply the tokenizer's chat template (default: if it has one).")
flags.DEFINE_bool("stream", False, "Print text as it is generated (one prompt at a time).")
flags.DEFINE_enum("other", "error", multitenant.OTHER_CHOICES,
                  "Several deltas: what to do with deltas of norms/embeddings (see "
                  "deltajax/multitenant.py): refuse, use the base values, or apply per row.")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                  "Cast the base weights to this dtype after loading (default: keep).")
flags.DEFINE_enum("implementation", "auto", ["auto", "xla", "pallas_gpu", "pallas_tpu"],
                  "Multi-tenant delta kernels.")
flags.DEFINE_string("mesh", None, "Device mesh, e.g. 'data:1,model:8' (product = device count; "
                    "one axis may be -1). Default: no mesh (one device, today's behaviour).")


def _split(values: list[str]) -> list[str]:
    return [v.strip() for s in values for v in s.split(",") if v.strip()]


def read_prompts(prompts: list[str], path: str | None) -> list[str]:
    out = list(prompts)
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"--prompts_file: {p} does not exist")
        for i, line in enumerate(p.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            if p.suffix == ".jsonl":
                try:
                    out.append(json.loads(line)["prompt"])
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"--prompts_file: {p}:{i}: expected a JSON object with a "
                                     f"'prompt' key ({e})") from None
            else:
                out.append(line)
    if not out:
        raise ValueError("no prompts: pass --prompt and/or --prompts_file")
    empty = [i for i, s in enumerate(out) if not s.strip()]
    if empty:
        raise ValueError(f"--prompt / --prompts_file: prompt(s) {empty} are empty")
    return out


def check_options() -> None:
    """Sampling flags and --delta paths, before any model is loaded."""
    if FLAGS.max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens must be >= 1, got {FLAGS.max_new_tokens}")
    try:
        G.Sampling(temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p)
    except ValueError as e:
        raise ValueError(f"--{e}") from None  # "--top_p must be in (0, 1], got 1.5"
    for p in _split(FLAGS.delta):
        if not Path(p).expanduser().is_dir():
            what = "is not a directory" if Path(p).expanduser().exists() else "does not exist"
            raise FileNotFoundError(f"--delta: {p} {what}")


def tenant_ids(values: list[str], n_prompts: int, n_deltas: int) -> list[int]:
    if not values:
        return [i % n_deltas if n_deltas else -1 for i in range(n_prompts)]
    try:
        ids = [int(v) for v in _split(values)]
    except ValueError:
        raise ValueError(f"--tenant must be integers, got {values}") from None
    if len(ids) == 1:
        ids = ids * n_prompts
    if len(ids) != n_prompts:
        raise ValueError(f"{len(ids)} --tenant values for {n_prompts} prompts")
    bad = [t for t in ids if not -1 <= t < n_deltas]
    if bad:
        raise ValueError(f"--tenant values {bad} out of range: {n_deltas} deltas given "
                         f"(0..{n_deltas - 1}, or -1 for the base)")
    return ids


def _stats(res: dict) -> str:
    return (f"{res['num_tokens']} tokens in {res['seconds']:.2f} s = "
            f"{res['tokens_per_s']:.1f} tokens/s (prefill {res['prefill_seconds']:.2f} s, decode "
            f"{res['decode_tokens_per_s']:.1f} tokens/s); compile {res['compile_seconds']:.1f} s")


def main(argv):
    cli.no_extra_args(argv)
    prompts = read_prompts(FLAGS.prompt, FLAGS.prompts_file)
    check_options()
    paths = _split(FLAGS.delta)
    ids = tenant_ids(FLAGS.tenant, len(prompts), len(paths))

    t0 = time.perf_counter()
    mesh = sharding.mesh_from_flag(FLAGS.mesh, tag="generate")
    with cli.about("base"):
        base, cfg, tok, src = load_model(FLAGS.base, mesh=mesh)
    if tok is None:
        raise FileNotFoundError(f"--base: {src} has no tokenizer files (tokenizer.json / "
                                "tokenizer_config.json); generation needs the checkpoint's "
                                "tokenizer")
    with cli.about("delta"):
        loaded = [load_delta(p, base_params=base, cfg=cfg) for p in paths]
    deltas, metas = [d for d, _ in loaded], [m for _, m in loaded]
    if FLAGS.dtype:  # after the fingerprint check, which is of the stored base
        with cli.about("dtype"):  # a weight beyond the dtype's range is refused, not Inf
            base = cast_params(base, FLAGS.dtype, what="base")
    print(f"[generate] base {FLAGS.base}: {describe(cfg)}; loaded in "
          f"{time.perf_counter() - t0:.1f} s")
    for i, (p, m) in enumerate(zip(paths, metas)):
        methods = sorted({v["method"]["name"] for v in m["leaves"].values()})
        print(f"[generate] delta {i}: {p} ({', '.join(methods)})")

    if not deltas:
        params, tids = base, None
    elif len(deltas) == 1 and all(t == 0 for t in ids):
        params = attach(base, deltas[0], mesh=mesh)
        if mesh is not None:
            print(f"[generate] delta kernels per shard: {sharded.kernel_coverage(params)}")
        tids = None
    else:
        try:
            params = attach(base, deltas, other=FLAGS.other, implementation=FLAGS.implementation)
        except (multitenant.TenantError, NotImplementedError) as e:
            raise multitenant.TenantError(f"{e} (flags: --other=base or --other=per_row)") \
                from None
        tids = ids

    chat = G.has_chat_template(tok) if FLAGS.chat is None else FLAGS.chat
    kw = dict(max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature,
              top_k=FLAGS.top_k, top_p=FLAGS.top_p, seed=FLAGS.seed, chat=chat)
    label = [f"delta {t}" if t >= 0 else "base" for t in ids]
    if FLAGS.stream:
        for i, prompt in enumerate(prompts):
            print(f"\n=== [{i}] ({label[i]}) {prompt}")
            stops = G.default_stop_ids(tok)
            res = G.generate(params, cfg, tok, [prompt], **kw, stop_ids=stops,
                             tenant_ids=None if tids is None else [tids[i]],
                             stream=G.text_streamer(tok, stop_ids=stops))
            print(f"\n[generate] {_stats(res)}")
        return
    res = G.generate(params, cfg, tok, prompts, **kw, tenant_ids=tids)
    for i, (prompt, text) in enumerate(zip(prompts, res["texts"])):
        print(f"\n=== [{i}] ({label[i]}) {prompt}\n{text}")
    print(f"\n[generate] {len(prompts)} prompts, chat={chat}: {_stats(res)}")


if __name__ == "__main__":
    cli.run(main)
