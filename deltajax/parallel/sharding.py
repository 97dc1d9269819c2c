"""Scale-out with JAX's own SPMD: meshes, a per-path sharding rule table, placed loading.

Nothing here is a process pool or an RPC layer: several devices (and several hosts) are driven
by `jax.sharding.Mesh` + `NamedSharding` (GSPMD partitions every jitted function) and, where a
Pallas kernel must see whole local blocks, by `jax.shard_map` (`parallel.sharded`). Multi-host
runs are started the standard JAX way (one identical process per host, see
`maybe_initialize_distributed`).

Mesh axes (`parse_mesh("data:2,model:4")`): ``data`` (batch / calibration windows / stacked
matrices) and ``model`` (tensor parallelism). The rule table `PARAM_RULES` says how each weight
path is laid out (Megatron-style tensor parallelism, HF ``(out, in)`` layout):

============================  ===========  =========================================
path                          kind         PartitionSpec (dims of the HF tensor)
============================  ===========  =========================================
``{q,k,v,gate,up}_proj.weight``  column    ``("model", None)``: d_out over ``model``
``{q,k,v}_proj.bias``, ...       column    ``("model",)``
``{o,down}_proj.weight``         row       ``(None, "model")``: d_in over ``model``
``{o,down}_proj.bias``           replicated ``()`` (added after the all-reduce)
``embed_tokens`` / ``lm_head``   vocab     ``("model", None)``; else hidden ``(None, "model")``
norms, anything else             replicated ``()``
============================  ===========  =========================================

Every parameter is replicated over ``data``. When a dimension is not divisible by the ``model``
axis, that tensor falls back to the next option (embeddings: hidden, then replicated; others:
replicated) and a notice is logged once per (path kind, shape).

Compressed containers are laid out consistently with their base (`container_shardings`): for a
column-parallel weight every array is sharded on its d_out side (packed codes ``(K·b/32, N)`` and
scales ``(K/G, N)`` on N; low-rank U on rows; Delta-CoMe's packed Uᵀ on its word axis = d_out),
for a row-parallel one on its d_in side (codes and scales on the word / group axis when whole
groups fall in every shard; low-rank Vᵀ on columns; Delta-CoMe's packed Vᵀ on its word axis),
and everything else is replicated. An array whose axis does not divide falls back to replicated.
`container_shardings` also says whether the layout is the *kernel* layout, i.e. whether
`deltajax.parallel.sharded` may run the method's Pallas kernel per shard under `shard_map`.

Loading (`param_sharding_fn`, `load_params_sharded`): each tensor goes straight into its shards via
`jax.make_array_from_callback`; with safetensors the callback reads only the requested slice from
a memory map, so no host or device ever holds the whole model and each host of a multi-host run
reads only the slices of its own devices.

Multi-host launch (the standard JAX way: the same command on every host; the scripts call
`maybe_initialize_distributed`, i.e. `jax.distributed.initialize()`, when the environment says
it is a multi-process job)::

    # Cloud TPU slice (e.g. v5e-16 = 4 hosts x 4 chips); JAX reads the TPU metadata itself
    gcloud compute tpus tpu-vm ssh $TPU --zone=$ZONE --worker=all --command="cd deltajax && \
        .venv/bin/python scripts/generate.py --base=/ckpt/llama2-70b --delta=/ckpt/d70 \
        --mesh=data:1,model:16 --prompt='What is 12 * 7?'"
    # GPU hosts without a scheduler: process i of N on every host
    JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=$i \
        .venv/bin/python scripts/compress.py ... --mesh=data:1,model:16
    # SLURM / Open MPI: srun / mpirun the same command (detected from SLURM_* / OMPI_* vars)

`memory_model` computes peak bytes per device and per host for a model, mesh and method (by
calculation; `benchmarks/scaleout.md` tabulates it).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from deltajax import tree as T

log = logging.getLogger(__name__)

AXES = ("data", "model")
"""Known mesh axis names, in mesh order."""

__all__ = [
    "AXES",
    "PARAM_RULES",
    "ShardRule",
    "container_shardings",
    "make_mesh",
    "maybe_initialize_distributed",
    "memory_model",
    "param_kind",
    "param_sharding",
    "param_sharding_fn",
    "parse_mesh",
    "shard_compressed",
    "shard_params",
]


# ------------------------------------------------------------------------------------- meshes


def parse_mesh(spec: str) -> dict[str, int]:
    """``"data:1,model:8"`` -> ``{"data": 1, "model": 8}`` (missing axes get size 1).

    One axis may be ``-1`` ("the rest of the devices"); it is resolved by `make_mesh`.

    Raises:
      ValueError: an unknown axis name, a repeated axis, a size that is not a positive integer
        (or -1), or a malformed entry.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"--mesh must look like 'data:1,model:8', got {spec!r}")
    out: dict[str, int] = {}
    for part in spec.split(","):
        part = part.strip()
        name, sep, size = part.partition(":")
        name = name.strip()
        if not sep:
            raise ValueError(f"mesh entry {part!r} must be 'axis:size' (in {spec!r})")
        if name not in AXES:
            raise ValueError(f"unknown mesh axis {name!r} in {spec!r}; known axes: {list(AXES)}")
        if name in out:
            raise ValueError(f"mesh axis {name!r} given twice in {spec!r}")
        try:
            n = int(size)
        except ValueError:
            raise ValueError(f"mesh axis {name!r} size {size!r} is not an integer") from None
        if n < 1 and n != -1:
            raise ValueError(f"mesh axis {name!r} size must be >= 1 (or -1), got {n}")
        out[name] = n
    if sum(v == -1 for v in out.values()) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {spec!r}")
    return {a: out.get(a, 1) for a in AXES}


def make_mesh(spec: str | Mapping[str, int], devices=None) -> Mesh:
    """A `Mesh` with axes ``("data", "model")`` over `devices` (default: all, every host).

    Args:
      spec: a ``"data:1,model:8"`` string or a ``{axis: size}`` mapping.
      devices: the devices to use (default `jax.devices()`: the global devices of every process).

    Raises:
      ValueError: the product of the axis sizes differs from the number of devices.
    """
    shape = parse_mesh(spec) if isinstance(spec, str) else parse_mesh(
        ",".join(f"{k}:{v}" for k, v in spec.items()))
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if -1 in shape.values():
        rest = math.prod(v for v in shape.values() if v != -1)
        if n % rest:
            raise ValueError(f"mesh {shape}: {n} devices are not divisible by {rest}")
        shape = {k: (n // rest if v == -1 else v) for k, v in shape.items()}
    total = math.prod(shape.values())
    if total != n:
        raise ValueError(
            f"mesh {','.join(f'{k}:{v}' for k, v in shape.items())} needs {total} devices but "
            f"{n} are available ({jax.default_backend()}, {jax.process_count()} process(es)); "
            "the product of the axis sizes must equal the device count")
    sizes = tuple(shape[a] for a in AXES)
    try:
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_device_mesh(sizes, devices=devices)  # topology-aware order
    except Exception:  # noqa: BLE001 (CPU / unusual topologies: plain order)
        arr = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(arr, AXES)


def axis_size(mesh: Mesh | None, axis: str) -> int:
    return 1 if mesh is None else int(mesh.shape.get(axis, 1))


def describe_mesh(mesh: Mesh) -> str:
    return (f"mesh data:{axis_size(mesh, 'data')},model:{axis_size(mesh, 'model')} over "
            f"{mesh.devices.size} {jax.default_backend()} device(s), "
            f"{jax.process_count()} process(es)")


def mesh_from_flag(spec: str | None, *, tag: str = "deltajax") -> Mesh | None:
    """The scripts' `--mesh` flag: None/"" → no mesh; else start the distributed runtime when
    the environment says so, build the mesh, print it. A bad spec raises ValueError naming
    --mesh (one `error:` line in the scripts)."""
    if not spec:
        return None
    maybe_initialize_distributed()
    try:
        mesh = make_mesh(spec)
    except ValueError as e:
        raise ValueError(f"--mesh={spec}: {e}") from None
    print(f"[{tag}] {describe_mesh(mesh)}")
    return mesh


def maybe_initialize_distributed() -> bool:
    """Calls `jax.distributed.initialize()` when the environment says this is a multi-host job.

    Triggers: ``JAX_COORDINATOR_ADDRESS`` (with ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``, the
    explicit form), a Cloud TPU VM slice with several workers (``TPU_WORKER_HOSTNAMES`` /
    ``TPU_PROCESS_ADDRESSES`` or ``MEGASCALE_COORDINATOR_ADDRESS``), SLURM with several tasks
    (``SLURM_NTASKS`` > 1) or Open MPI (``OMPI_COMM_WORLD_SIZE`` > 1); JAX's own cluster detection
    fills in the rest. A no-op (returns False) for a single process, and when already initialized.
    Must run before any other JAX call that touches devices.
    """
    env = os.environ
    multi = bool(env.get("JAX_COORDINATOR_ADDRESS"))
    hosts = env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_PROCESS_ADDRESSES") or ""
    multi |= len([h for h in hosts.split(",") if h.strip()]) > 1
    multi |= bool(env.get("MEGASCALE_COORDINATOR_ADDRESS"))
    multi |= int(env.get("SLURM_NTASKS", "1") or 1) > 1
    multi |= int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1
    if not multi:
        return False
    from jax._src import distributed as _dist  # the public API has no "is initialized" query

    if getattr(_dist.global_state, "client", None) is not None:
        return False
    kw = {}
    if env.get("JAX_NUM_PROCESSES"):
        kw["num_processes"] = int(env["JAX_NUM_PROCESSES"])
    if env.get("JAX_PROCESS_ID"):
        kw["process_id"] = int(env["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kw)
    log.info("jax.distributed initialized: process %d of %d, %d global devices",
             jax.process_index(), jax.process_count(), jax.device_count())
    return True


# ------------------------------------------------------------------------------ param rules


@dataclasses.dataclass(frozen=True)
class ShardRule:
    """`pattern` (regex searched in the dotted HF name) -> a parallelism kind.

    kind: "column" (d_out over model), "row" (d_in over model), "vocab" (embeddings / lm_head:
    vocab over model, else hidden), "replicated".
    """

    pattern: str
    kind: str
    doc: str = ""


PARAM_RULES: tuple[ShardRule, ...] = (
    ShardRule(r"(^|\.)(q|k|v|gate|up)_proj\.weight$", "column", "d_out over model"),
    ShardRule(r"(^|\.)(q|k|v|gate|up)_proj\.bias$", "column", "d_out over model"),
    ShardRule(r"(^|\.)(o|down)_proj\.weight$", "row", "d_in over model (output all-reduced)"),
    ShardRule(r"(^|\.)(o|down)_proj\.bias$", "replicated", "added after the all-reduce"),
    ShardRule(r"(^|\.)experts\.\d+\.w[13]\.weight$", "column", "Mixtral expert gate/up"),
    ShardRule(r"(^|\.)experts\.\d+\.w2\.weight$", "row", "Mixtral expert down"),
    ShardRule(r"^(embed_tokens|lm_head)\.weight$", "vocab", "vocab over model, else hidden"),
    ShardRule(r".*", "replicated", "norms, routers, fused qkv/gate_up (Phi-3) and anything else"),
)
"""The documented per-path sharding rules (first match wins)."""

_NOTICED: set = set()


def _notice(msg: str, key) -> None:
    if key not in _NOTICED:
        _NOTICED.add(key)
        log.warning(msg)


def param_kind(name: str, rules=PARAM_RULES) -> str:
    """The parallelism kind of parameter `name` (e.g. ``layers.0.mlp.down_proj.weight``)."""
    for r in rules:
        if re.search(r.pattern, name):
            return r.kind
    return "replicated"


def param_spec(name: str, shape: tuple[int, ...], model: int, rules=PARAM_RULES) -> P:
    """The PartitionSpec of parameter `name` with shape `shape` on a ``model`` axis of `model`."""
    kind = param_kind(name, rules)
    shape = tuple(shape)
    if model == 1 or kind == "replicated":
        return P()
    if kind == "column":
        dims = [0]
    elif kind == "row":
        dims = [len(shape) - 1]
    else:  # vocab, then hidden
        dims = [0, 1] if len(shape) == 2 else [0]
    for d in dims:
        if d < len(shape) and shape[d] % model == 0:
            spec = [None] * len(shape)
            spec[d] = "model"
            return P(*spec)
    _notice(f"sharding: {kind}-parallel tensors of shape {shape} (e.g. {name}) are not divisible "
            f"by model={model}; replicated", (kind, shape, model))
    return P()


def param_sharding(name: str, shape: tuple[int, ...], mesh: Mesh, rules=PARAM_RULES):
    """`NamedSharding` of one parameter under `PARAM_RULES` on `mesh`."""
    return NamedSharding(mesh, param_spec(name, shape, axis_size(mesh, "model"), rules))


def param_sharding_fn(mesh: Mesh, rules=PARAM_RULES):
    """``(name, shape) -> NamedSharding``: the `sharding=` argument of `hf.load_params`,
    `checkpoint.load_params_ckpt` and `hf.convert_hf_to_checkpoint`."""
    return lambda name, shape: param_sharding(name, shape, mesh, rules)


def params_shardings(params, mesh: Mesh, rules=PARAM_RULES):
    """A tree of `NamedSharding`s matching a dense params tree."""
    return T.map_with_names(lambda n, x: param_sharding(n, x.shape, mesh, rules), params)


def shard_params(params, mesh: Mesh, rules=PARAM_RULES):
    """Places a dense params tree on `mesh` by the rule table (a reshard for placed arrays)."""
    return jax.device_put(params, params_shardings(params, mesh, rules))


def named(mesh: Mesh, *spec) -> NamedSharding:
    """`NamedSharding(mesh, PartitionSpec(*spec))` (no spec: replicated)."""
    return NamedSharding(mesh, P(*spec))


def container_shardings(container, kind: str, mesh: Mesh):
    """Shardings of a compressed container consistent with its base's parallelism `kind`.

    The container declares its own layout (`deltajax.containers.Container.shardings`): returns
    (tree of NamedSharding matching `container`, kernel_ok), kernel_ok True when the layout is
    the per-shard kernel layout (`parallel.sharded` then runs the method's matmul under
    `shard_map`); False means some array fell back (GSPMD still computes the right result).
    """
    return container.shardings(kind, mesh)


def shard_compressed(compressed: Mapping[str, Any], mesh: Mesh, rules=PARAM_RULES) -> dict:
    """Places every `DeltaLeaf` container by `container_shardings` (consistent with the base)."""
    out = {}
    for name, leaf in compressed.items():
        sh, _ = container_shardings(leaf.container, param_kind(name, rules), mesh)
        out[name] = leaf.replace(container=jax.device_put(leaf.container, sh))
    return out


# ------------------------------------------------------------------------------ memory model


H100_BYTES = 80 * 10**9
V5E_BYTES = 16 * 2**30


def memory_model(cfg, mesh_shape: Mapping[str, int], *, method_bits_per_param: float = 1.0,
                 base_bytes_per_param: float = 2.0, n_deltas: int = 1, batch: int = 1,
                 seq_len: int = 2048, kv_bytes: int = 2, devices_per_host: int = 8,
                 compress: bool = False, calib_tokens: int = 0) -> dict[str, float]:
    """Peak bytes per device and per host when serving (or compressing) on a mesh, by calculation.

    Serving holds the base (projections and embeddings sharded over ``model`` as `PARAM_RULES`
    says, norms replicated; everything replicated over ``data``), `n_deltas` compressed deltas at
    `method_bits_per_param` bits per projection parameter laid out the same way, and a KV cache of
    `batch` × `seq_len` tokens (batch over ``data``, KV heads over ``model`` when divisible), plus
    a workspace of the largest single-layer activations (fp32 logits of one decode step over the
    local vocab shard and the MLP intermediate of `batch` × `seq_len` prefill tokens).

    Compressing (`compress=True`) holds base + fine-tune (their fp32 difference is formed per
    matrix), the output deltas, and a per-matrix workspace: the largest fp32 delta, its SVD
    factors (3 × that) and, for calibrated methods, a d_in² fp32 Hessian and the layer's
    calibration activations of `calib_tokens` tokens (over ``data``).

    Returns:
      {"device": bytes, "host": bytes (devices_per_host devices; host RAM staging of one
      tensor slice is included), and each term: "base", "deltas", "kv", "workspace"}.
    """
    d_axis = int(mesh_shape.get("data", 1))
    m = int(mesh_shape.get("model", 1))
    n_dev = d_axis * m
    d, hd, L = cfg.hidden_size, cfg.head_dim, cfg.num_hidden_layers
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    inter, vocab = cfg.intermediate_size, cfg.vocab_size
    proj = L * (2 * d * q + 2 * d * kv + 3 * d * inter)
    emb = vocab * d * (1 if cfg.tie_word_embeddings else 2)
    norms = L * 2 * d + d
    base = (proj + emb) * base_bytes_per_param / m + norms * base_bytes_per_param
    deltas = n_deltas * proj * method_bits_per_param / 8 / m
    kv_shard = m if cfg.num_key_value_heads % m == 0 else 1
    local_batch = math.ceil(batch / d_axis)
    kvc = 2 * L * local_batch * seq_len * kv * kv_bytes / kv_shard
    work = local_batch * (vocab / m * 4 + seq_len * inter / m * 4 + seq_len * d * 4 * 2)
    if compress:
        base *= 2  # base + fine-tune
        big = max(d * inter, d * q)
        work = 4 * big * 4  # fp32 delta + its U, S, Vᵀ workspace
        if calib_tokens:
            work += max(d, inter) ** 2 * 4 + math.ceil(calib_tokens / d_axis) * max(d, inter) * 4
        kvc = 0.0
    dev = base + deltas + kvc + work
    per_host = min(devices_per_host, n_dev)
    staging = max(d * inter, vocab * d) * base_bytes_per_param / m  # one tensor slice on host
    return {"device": dev, "host": dev * per_host + staging, "base": base, "deltas": deltas,
            "kv": kvc, "workspace": work}


LLAMA_SHAPES = {
    "Llama-2-7B": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       head_dim=128),
    "Llama-2-13B": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                        num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                        head_dim=128),
    "Llama-2-70B": dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672,
                        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                        head_dim=128),
    "Llama-3.1-405B": dict(vocab_size=128256, hidden_size=16384, intermediate_size=53248,
                           num_hidden_layers=126, num_attention_heads=128,
                           num_key_value_heads=8, head_dim=128),
}
"""Published architecture shapes used by the memory table (weights are never needed)."""

TARGETS = {
    "1×H100 (80 GB)": dict(mesh={"data": 1, "model": 1}, hbm=H100_BYTES, devices_per_host=1),
    "8×H100 (1 host)": dict(mesh={"data": 1, "model": 8}, hbm=H100_BYTES, devices_per_host=8),
    "v5e-16 (16×16 GiB, 4 hosts)": dict(mesh={"data": 1, "model": 16}, hbm=V5E_BYTES,
                                        devices_per_host=4),
}


def memory_table(*, method_bits_per_param: float = 1.0, batch: int = 1, seq_len: int = 2048,
                 usable: float = 0.9) -> str:
    """Markdown table of `memory_model` for `LLAMA_SHAPES` × `TARGETS` (serve and compress)."""
    import types

    gib = 2**30
    lines = ["| model | target | serve GiB/device | serve GiB/host | fits (serve) | "
             "compress GiB/device | fits (compress) |", "|---|---|---:|---:|---|---:|---|"]
    best = {}
    for name, shp in LLAMA_SHAPES.items():
        cfg = types.SimpleNamespace(tie_word_embeddings=False, **shp)  # the fields read
        for tname, t in TARGETS.items():
            kw = dict(method_bits_per_param=method_bits_per_param,
                      devices_per_host=t["devices_per_host"])
            s = memory_model(cfg, t["mesh"], batch=batch, seq_len=seq_len, **kw)
            c = memory_model(cfg, t["mesh"], compress=True, **kw)
            cap = usable * t["hbm"]
            fs, fc = s["device"] <= cap, c["device"] <= cap
            if fs:
                best[tname] = name
            lines.append(f"| {name} | {tname} | {s['device'] / gib:.1f} | {s['host'] / gib:.1f} "
                         f"| {'yes' if fs else 'no'} | {c['device'] / gib:.1f} | "
                         f"{'yes' if fc else 'no'} |")
    lines += ["", "| target | largest listed model that serves | max params (weights only) |",
              "|---|---|---:|"]
    for tname, t in TARGETS.items():
        n_dev = t["mesh"]["data"] * t["mesh"]["model"]
        per_param = 2.0 + method_bits_per_param / 8
        max_p = usable * t["hbm"] * n_dev / per_param
        lines.append(f"| {tname} | {best.get(tname, 'none')} | {max_p / 1e9:.0f} B |")
    return "\n".join(lines)
