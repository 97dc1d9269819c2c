r"""HTTP serving benchmark: N concurrent streaming users over T fine-tunes + the base.

  # CPU, the tiny test model (2 layers, hidden 64, vocab 300) and its three test fine-tunes:
  PYTHONPATH=. python benchmarks/bench_serve_http.py --tiny --users=8 --requests=64

  # a real model (GPU): saved deltas, a server started here
  PYTHONPATH=. python benchmarks/bench_serve_http.py --base=/ckpt/llama2-7b \
      --delta=math=/d/math,code=/d/code,chat=/d/chat --slots=32 --max_len=2048 \
      --users=32 --requests=256 --max_tokens=128

Starts `scripts/serve.py` on 127.0.0.1 (or uses --url), then runs a bounded asyncio load
generator (httpx): --users concurrent users, --requests requests in all, request i names model
i mod (T + 1) of [base, fine-tune 1..T]; every request streams a greedy completion of exactly
--max_tokens tokens (ignore_eos) and asks for the usage chunk. Reported: requests/s and output
tokens/s over the whole run (wall time from the first request to the last byte), time to first
token (TTFT: request sent -> first content chunk) and inter-token latency (ITL: gaps between
content chunks of one stream; one chunk per token for tokenizers whose every token has text)
p50/p99. Then the server is stopped and the same requests run through an in-process `Engine`
with the same slots, max_len and fine-tunes (after its warm-up): the offline tokens/s of that
batch, the ceiling the HTTP layer is measured against. The table is appended to --out with
date, device and command.

--tiny builds the tiny model and fine-tunes of tests/serve_tiny.py in a temporary directory
(imports that test helper).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags, logging

REPO = Path(__file__).resolve().parents[1]
FLAGS = flags.FLAGS
flags.DEFINE_bool("tiny", False, "Benchmark the tiny test model and its fine-tunes (CPU).")
flags.DEFINE_string("base", None, "Base model (HF dir / checkpoint / 'smollm2'); not with --tiny.")
flags.DEFINE_multi_string("delta", [], "Fine-tunes as name=path (comma-separated or repeated).")
flags.DEFINE_string("url", None, "Benchmark a running server (e.g. http://127.0.0.1:8000) "
                    "instead of starting one; then --base/--delta are used for the offline run.")
flags.DEFINE_integer("tenants", None, "Fine-tunes used (default: all given).")
flags.DEFINE_integer("users", 8, "Concurrent users (streams in flight).")
flags.DEFINE_integer("requests", 64, "Requests in all.")
flags.DEFINE_integer("max_tokens", 32, "Completion tokens per request (ignore_eos).")
flags.DEFINE_integer("prompt_words", 8, "Words per prompt.")
flags.DEFINE_integer("slots", 8, "Server decode slots.")
flags.DEFINE_integer("max_len", 128, "Server positions per slot.")
flags.DEFINE_integer("pool", 4, "Server pool capacity.")
flags.DEFINE_string("prefill_buckets", "", "Server --prefill_buckets (default: its own).")
flags.DEFINE_float("timeout", 300.0, "Seconds a request may take before it counts as failed.")
flags.DEFINE_bool("offline", True, "Also run the same requests through an in-process Engine.")
flags.DEFINE_string("out", "benchmarks/serving_http.md", "Markdown output ('' to skip).")

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing "
         "matches near old river banks").split()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def build_tiny(root: Path) -> tuple[str, dict[str, str]]:
    sys.path.insert(0, str(REPO / "tests"))
    from serve_tiny import tiny_finetunes, tiny_model, write_tiny_checkpoint

    _, base = tiny_model()
    src, paths = write_tiny_checkpoint(root, base, tiny_finetunes(base))
    return str(src), paths


def prompts(n: int, tiny: bool) -> list[str]:
    out = []
    for i in range(n):
        if tiny:
            words = [f"w{(i * 7 + j * 13) % 280}" for j in range(FLAGS.prompt_words)]
        else:
            words = [WORDS[(i + j * 3) % len(WORDS)] for j in range(FLAGS.prompt_words)]
        out.append(" ".join(words))
    return out


async def one(client, url, model, prompt, stats):
    body = {"model": model, "prompt": prompt, "max_tokens": FLAGS.max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    last = None
    tokens = 0
    async with client.stream("POST", url + "/v1/completions", json=body,
                             timeout=FLAGS.timeout) as r:
        if r.status_code != 200:
            stats["errors"].append(f"{r.status_code}: {(await r.aread())[:200]!r}")
            return
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            if d.get("usage"):
                tokens = d["usage"]["completion_tokens"]
            if d.get("choices") and d["choices"][0].get("text"):
                now = time.perf_counter()
                if last is None:
                    stats["ttft"].append(now - t0)
                else:
                    stats["itl"].append(now - last)
                last = now
    stats["tokens"] += tokens
    stats["done"] += 1


async def load(url: str, jobs: list[tuple[str, str]]) -> dict:
    import httpx

    stats = {"ttft": [], "itl": [], "tokens": 0, "done": 0, "errors": []}
    q: asyncio.Queue = asyncio.Queue()
    for j in jobs:
        q.put_nowait(j)

    async def user(client):
        while True:
            try:
                model, prompt = q.get_nowait()
            except asyncio.QueueEmpty:
                return
            try:
                await one(client, url, model, prompt, stats)
            except Exception as e:  # counted, the run goes on
                stats["errors"].append(f"{type(e).__name__}: {e}")

    limits = httpx.Limits(max_connections=FLAGS.users + 4)
    async with httpx.AsyncClient(limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*[user(client) for _ in range(FLAGS.users)]),
                               timeout=FLAGS.timeout * max(1, len(jobs) // FLAGS.users + 1))
        stats["wall"] = time.perf_counter() - t0
    return stats


def offline(base: str, deltas: dict[str, str], jobs, buckets) -> dict:
    from deltajax.io.resolve import load_model
    from deltajax.serve.engine import Engine

    params, cfg, tok, src = load_model(base)
    eng = Engine(params, cfg, tok, deltas=deltas, base_name="base", slots=FLAGS.slots,
                 max_len=FLAGS.max_len, pool_capacity=FLAGS.pool, prefill_buckets=buckets,
                 max_queue=max(1024, len(jobs)))
    eng.warmup()
    t0 = time.perf_counter()
    outs = eng.generate([p for _, p in jobs], model=[m for m, _ in jobs],
                        max_tokens=FLAGS.max_tokens, ignore_eos=True)
    wall = time.perf_counter() - t0
    return {"tokens": sum(len(o.token_ids) for o in outs), "wall": wall}


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
    load_avg = os.getloadavg()[0]
    if FLAGS.tiny == bool(FLAGS.base):
        raise SystemExit("error: pass exactly one of --tiny and --base")
    from deltajax.serve.server import parse_delta_specs

    tmp = tempfile.TemporaryDirectory()
    if FLAGS.tiny:
        base, deltas = build_tiny(Path(tmp.name))
    else:
        try:
            base, deltas = FLAGS.base, parse_delta_specs(FLAGS.delta)
        except ValueError as e:
            raise SystemExit(f"error: --delta {e}") from None
    names = list(deltas)[: FLAGS.tenants if FLAGS.tenants is not None else len(deltas)]
    deltas = {n: deltas[n] for n in names}
    models = ["base"] + names
    texts = prompts(FLAGS.requests, FLAGS.tiny)
    jobs = [(models[i % len(models)], texts[i]) for i in range(FLAGS.requests)]
    buckets = [int(b) for b in FLAGS.prefill_buckets.split(",") if b] or None

    proc, url = None, FLAGS.url
    if url is None:
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, str(REPO / "scripts" / "serve.py"), f"--base={base}",
               "--base_name=base", f"--slots={FLAGS.slots}", f"--max_len={FLAGS.max_len}",
               f"--pool={FLAGS.pool}", f"--port={port}", "--log_level=warning",
               f"--max_queue={max(1024, FLAGS.requests)}"]
        if deltas:
            cmd.append("--delta=" + ",".join(f"{n}={p}" for n, p in deltas.items()))
        if buckets:
            cmd.append(f"--prefill_buckets={FLAGS.prefill_buckets}")
        log = open(Path(tmp.name) / "server.log", "w")
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        import httpx

        t0 = time.monotonic()
        while True:
            if proc is not None and proc.poll() is not None:
                raise SystemExit("error: the server exited:\n" +
                                 (Path(tmp.name) / "server.log").read_text()[-3000:])
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - t0 > 900:
                raise SystemExit("error: the server did not become ready in 900 s")
            time.sleep(1)
        # one warm-up request per model (compiles nothing when the server warmed up itself)
        asyncio.run(load(url, [(m, texts[0]) for m in models]))
        stats = asyncio.run(load(url, jobs))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    off = offline(base, deltas, jobs, buckets) if FLAGS.offline else None
    import jax

    d0 = jax.devices()[0]
    dev = (f"{d0.platform.upper()} ({d0.device_kind}, {len(jax.devices())} device(s), "
           f"{os.cpu_count()} CPU cores), jax {jax.__version__}")
    row = {
        "users": FLAGS.users, "fine-tunes": len(names), "requests": stats["done"],
        "errors": len(stats["errors"]),
        "req/s": stats["done"] / stats["wall"],
        "out tok/s": stats["tokens"] / stats["wall"],
        "TTFT p50 ms": 1e3 * _pct(stats["ttft"], 50), "TTFT p99 ms": 1e3 * _pct(stats["ttft"], 99),
        "ITL p50 ms": 1e3 * _pct(stats["itl"], 50), "ITL p99 ms": 1e3 * _pct(stats["itl"], 99),
        "offline tok/s": off["tokens"] / off["wall"] if off else float("nan"),
    }
    head = "| " + " | ".join(row) + " |"
    sep = "|" + "|".join("---:" for _ in row) + "|"
    vals = "| " + " | ".join(f"{v:.1f}" if isinstance(v, float) else str(v)
                             for v in row.values()) + " |"
    cmd = "python benchmarks/bench_serve_http.py " + " ".join(sys.argv[1:])
    md = (f"\n## {datetime.date.today().isoformat()}, {dev}\n\n"
          f"- command: `{cmd}`\n"
          f"- model: {'tiny test model (tests/serve_tiny.py)' if FLAGS.tiny else base}; "
          f"server: {FLAGS.slots} slots x {FLAGS.max_len} positions, pool {FLAGS.pool}; "
          f"{FLAGS.requests} streaming requests of {FLAGS.max_tokens} tokens (greedy, "
          f"ignore_eos), prompts of {FLAGS.prompt_words} words, models round-robin over "
          f"{models}\n"
          f"- offline tok/s: the same requests through an in-process Engine (same slots and "
          f"fine-tunes, after warm-up), no HTTP\n"
          f"- host load average at the start: {load_avg:.1f} (the load generator, the server "
          f"and the offline engine share this machine)\n\n{head}\n{sep}\n{vals}\n")
    if stats["errors"]:
        md += f"\nerrors (first 3): {stats['errors'][:3]}\n"
    print(md)
    if FLAGS.out:
        out = REPO / FLAGS.out
        if not out.exists():
            out.write_text("# HTTP serving benchmarks (benchmarks/bench_serve_http.py)\n")
        with open(out, "a") as f:
            f.write(md)
        print(f"[bench] appended to {out}")
    if stats["errors"]:
        raise SystemExit(f"error: {len(stats['errors'])} requests failed")


if __name__ == "__main__":
    app.run(main)
