"""What every benchmark here repeats: the table header, timing, the copy-bandwidth floor, markdown.

    import _common as C        # bench_*.py run as scripts: this folder is on sys.path

    bw = C.copy_bandwidth()                         # bytes/s, measured in this run
    t = C.median_time(fn, x, w, reps=10)            # seconds, after warm-up, block_until_ready
    pct = C.pct_of_floor(bytes_moved, t, bw)        # the speed as % of the copy floor
    lines = C.header("Title", [f"- copy bandwidth: {C.fmt_bandwidth(bw)}"])
    lines += C.table(["shape", "µs", "% of copy floor"], rows)
    C.write_markdown("benchmarks/x.md", lines)      # atomic

Every speed table reports its time as a % of the copy floor: the time a device-to-device copy
moves the bytes the operation must read and write, measured in the same run (`copy_bandwidth`).
Perplexities come from `deltajax.eval.metrics.perplexity` (`perplexities`).
"""

from __future__ import annotations

import datetime
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp

from deltajax.eval import metrics

REPO = Path(__file__).resolve().parents[1]


# -------------------------------------------------------------------------------------- header


def command_line(argv: Sequence[str] | None = None) -> str:
    """The exact command that ran, the script path relative to the repository root."""
    argv = list(sys.argv if argv is None else argv)
    if argv:
        p = Path(argv[0]).resolve()
        argv[0] = str(p.relative_to(REPO)) if p.is_relative_to(REPO) else argv[0]
    return "python " + shlex.join(argv)


def device_description() -> str:
    """'gpu (NVIDIA H200) × 1' from `jax.devices()`."""
    devs = jax.devices()
    d = devs[0]
    return f"{d.platform} ({getattr(d, 'device_kind', '')}) × {len(devs)}"


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def header(title: str, lines: Sequence[str] = ()) -> list[str]:
    """``# title``, the date (UTC), the device from `jax.devices()`, jax's version, the exact
    command line, then `lines` (further ``- ...`` bullets)."""
    return [
        f"# {title}",
        "",
        f"- date: {utc_now()}; device: {device_description()}; jax {jax.__version__}",
        f"- command: `{command_line()}`",
        *lines,
    ]


# -------------------------------------------------------------------------------------- timing


def block(x):
    """`jax.block_until_ready` on any pytree (arrays, tuples, None)."""
    return jax.block_until_ready(x)


def median_time(fn: Callable, *args, reps: int = 10, warmup: int = 1) -> float:
    """Median seconds of ``fn(*args)`` over `reps` runs after `warmup` runs (compilation), each
    run synchronised with block_until_ready."""
    for _ in range(max(warmup, 0)):
        block(fn(*args))
    ts = []
    for _ in range(max(reps, 1)):
        t0 = time.perf_counter()
        block(fn(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def timed(fn: Callable, *args) -> tuple[object, float]:
    """(result, seconds) of one synchronised call (e.g. the first call: compile + run)."""
    t0 = time.perf_counter()
    out = block(fn(*args))
    return out, time.perf_counter() - t0


@jax.jit
def _copy(a):
    return jnp.copy(a)


def copy_bandwidth(nbytes: int | None = None, *, reps: int = 5) -> float:
    """Bytes/s of a device-to-device copy of one large buffer: (bytes read + bytes written) /
    median time. Default size: 1 GiB on an accelerator, 64 MiB on a CPU."""
    if nbytes is None:
        nbytes = (64 << 20) if jax.devices()[0].platform == "cpu" else (1 << 30)
    a = jnp.ones((nbytes // 4,), jnp.float32)
    t = median_time(_copy, a, reps=reps, warmup=2)
    return 2 * a.nbytes / t


def torch_copy_bandwidth(nbytes: int = 1 << 30, *, reps: int = 20) -> float | None:
    """The same copy through torch on the GPU (CUDA events), or None without torch / a GPU.

    On an H200 torch's copy kernel moves ~10 % more bytes per second than XLA's; the speed
    tables take the faster of the two as the floor, so no figure is flattered by a slow copy.
    """
    if jax.devices()[0].platform != "gpu":
        return None
    try:
        import torch

        a = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda")
        b = torch.empty_like(a)
        for _ in range(3):
            b.copy_(a)
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(reps):
            b.copy_(a)
        e1.record()
        torch.cuda.synchronize()
        bw = 2 * a.numel() * 4 * reps / (e0.elapsed_time(e1) / 1e3)
        del a, b
        torch.cuda.empty_cache()
        return bw
    except Exception as e:  # noqa: BLE001 - the jax figure stands alone
        print(f"[benchmarks] torch copy not measured: {e}", file=sys.stderr)
        return None


def copy_bandwidths() -> dict[str, float]:
    """{"jax": ..., "torch": ... (GPU with torch only), "floor": the faster} in bytes/s."""
    out = {"jax": copy_bandwidth()}
    t = torch_copy_bandwidth()
    if t is not None:
        out["torch"] = t
    out["floor"] = max(out.values())
    return out


def pct_of_floor(bytes_moved: float, seconds: float, bandwidth: float) -> float:
    """The copy floor (`bytes_moved` / `bandwidth`) as % of the measured `seconds`."""
    return 100.0 * (bytes_moved / bandwidth) / seconds


def fmt_bandwidth(bw: float) -> str:
    return f"{bw / 1e12:.2f} TB/s" if bw >= 1e11 else f"{bw / 1e9:.1f} GB/s"


# ------------------------------------------------------------------------------------- quality


def perplexities(params, cfg, *token_sets, batch_size: int = 4) -> tuple[float, ...]:
    """`deltajax.eval.metrics.perplexity` of `params` on each (n, L) token set, in order."""
    return tuple(metrics.perplexity(params, cfg, t, batch_size=batch_size, progress=False)["ppl"]
                 for t in token_sets)


# ------------------------------------------------------------------------------------ markdown


def table(headers: Sequence[str], rows: Sequence[Sequence], *,
          align: Sequence[str] | None = None) -> list[str]:
    """Markdown table lines; `align` per column: 'l' or 'r' (default: text left, numbers right
    by the first row)."""
    if align is None:
        first = rows[0] if rows else [""] * len(headers)
        align = ["r" if isinstance(v, (int, float)) else "l" for v in first]
    sep = ["---:" if a == "r" else "---" for a in align]
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join(sep) + "|"]
    out += ["| " + " | ".join(str(v) for v in r) + " |" for r in rows]
    return out


def write_markdown(path: str | os.PathLike, lines: Sequence[str] | str) -> Path:
    """Write the markdown atomically (temp file, then rename); '' or None: nothing written."""
    if not path:
        return None
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    text = lines if isinstance(lines, str) else "\n".join(lines) + "\n"
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, p)
    return p


def random_like(key, abstract, lead):
    """Random arrays with leading axes `lead` and the structure of `abstract` (eval_shape)."""
    leaves, treedef = jax.tree.flatten(abstract)
    keys = jax.random.split(key, len(leaves))
    out = []
    for k, a in zip(keys, leaves):
        shape = tuple(lead) + tuple(a.shape)
        if jnp.issubdtype(a.dtype, jnp.unsignedinteger):
            out.append(jax.random.bits(k, shape, a.dtype))
        elif jnp.issubdtype(a.dtype, jnp.integer):
            out.append(jnp.broadcast_to(jnp.arange(a.shape[-1], dtype=a.dtype), shape))
        else:
            out.append((jax.random.normal(k, shape, jnp.float32) * 1e-3).astype(a.dtype))
    return jax.tree.unflatten(treedef, out)
