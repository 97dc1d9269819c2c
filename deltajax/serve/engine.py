"""Continuous-batching serving engine: fixed decode slots, per-row fine-tunes, a delta pool.

    engine = Engine(base, cfg, tokenizer, deltas={"math": "/d/math", "chat": "/d/chat"},
                    slots=8, max_len=1024, pool_capacity=4)
    outs = engine.generate(["What is 2+3?", "Hi"], model=["math", "chat"], max_tokens=64)
    for tok in engine.stream("Tell me a story", model="base", temperature=0.8, seed=1):
        ...
    engine.start()      # or: a background thread owns the device (what the HTTP server does)

**Slots.** The engine holds one KV cache of `slots` rows × `max_len` positions (static shapes:
nothing recompiles while serving). A request is tokenized and queued by `submit` (any thread);
the engine thread prefills it alone, right-padded to the smallest of a few length buckets
(`prefill_buckets`, one compile each), writes its keys/values into a free slot row and samples its
first token; one jitted `decode` step then advances every active slot by one token (the cache and
slot state are donated). A finished slot is free at once and the next waiting request takes it
(continuous batching); at most `prefills_per_step` prefills run between two decode steps, so
running streams keep flowing while new requests arrive. Row r of the cache holds its request's
tokens at positions 0..len-1; each row attends to its own positions only.

**Fine-tunes and pools.** A fine-tune is a compressed delta `{leaf name: DeltaLeaf}` of the base
(a saved delta directory, checked against the base fingerprint by `io.delta_ckpt.load_delta`).
Fine-tunes with the same layout (same leaves, methods and container shapes) share a *pool*: for
every leaf, its containers stacked along a leading axis of `pool_capacity` entries, preallocated.
Loading writes a fine-tune into a free pool index (`.at[i].set` on donated arrays: no recompile);
when the pool is full, the least recently used idle fine-tune (no waiting or running request) is
evicted from the device (it stays registered on the host and is written back when requested
again). Each slot carries (pool, index); a weight's output is

    y = x @ baseᵀ + Σ_pools  per-row delta of that pool (rows not in the pool: id -1, nothing)

so fine-tunes of different methods serve in one batch. Every leaf of a delta takes effect for
its rows: projections (and an untied lm_head) through `multitenant.multitenant_matmul` (the
dedicated multi-tenant kernels per container type, else the generic per-tenant path); norm
weights and biases through a per-tenant (capacity, d) table; embeddings through a per-tenant
dense (capacity, vocab, d) table, stored only in pools whose fine-tunes have an embedding delta
(`model.embed` asks the weight for its rows; with tied embeddings the same table is the output
head). The bare base is always servable under `base_name`. A new layout opens a new pool, which
changes the static structure: the prefill and decode steps compile once more for it (logged).

**Determinism.** A request's tokens do not depend on the rest of the batch: greedy decoding is
an argmax per row, and sampling (temperature, top-k, top-p, all per row) draws from the request's
own key `fold_in(PRNGKey(seed), choice)` folded with the step index, never a batch-shared key.
Greedy outputs equal `serve.generate.generate` on `delta.attach(base, delta)` up to float
reduction order (the engine adds each delta to the base matmul instead of merging the
non-projection leaves; ties of the argmax aside, the tokens are the same).

**Threads.** `submit` may be called from any thread (tokenization happens there, under a lock);
everything that touches the device runs in one thread: the background thread of `start()`, or
the caller of `step` / `generate` / `stream` when no background thread runs. Per-request
events (token ids and text deltas) arrive on the `Request`'s queue and an optional callback.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import logging
import os
import queue
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from deltajax import model as M
from deltajax import ops
from deltajax.containers import DeltaLeaf
from deltajax.io.params_ckpt import cast_params
from deltajax.methods import Method
from deltajax.rope import DYNAMIC_TYPES as DYNAMIC_ROPE_TYPES
from deltajax.serve import generate as G
from deltajax.serve.multitenant import multitenant_matmul
from deltajax.tree import flatten, map_with_names

log = logging.getLogger(__name__)

BASE = "base"
LINEAR, VECTOR, EMBED = "linear", "vector", "embed"
EMBED_NAME = "embed_tokens.weight"
_LINEAR_RE = re.compile(r"(_proj\.weight|^lm_head\.weight)$")
FINISH_REASONS = ("stop", "length", "cancelled", "error")


# ------------------------------------------------------------------------------------- errors


class EngineError(ValueError):
    """A request or fine-tune the engine refuses; `status`, `param`, `code` map to HTTP."""

    status = 400
    type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


class InvalidRequestError(EngineError):
    """A bad parameter (named by `param`)."""


class ContextLengthError(EngineError):
    """The prompt (plus the requested tokens) does not fit `max_len`."""


class UnknownModelError(EngineError):
    """The request names no registered fine-tune (nor the base)."""

    status = 404


class QueueFullError(EngineError):
    """More waiting requests than `max_queue`."""

    status = 429
    type = "rate_limit_error"


class FineTuneError(EngineError):
    """A fine-tune cannot be loaded (exists already, does not fit the base, ...)."""


# ----------------------------------------------------------------------------------- sampling


def sample_rows(
    logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array,
    top_p: jax.Array,
) -> jax.Array:
    """One token per row, each row with its own key and sampling parameters (jit-able).

    Same rule as `generate.sample` with per-row arrays: temperature 0 is greedy (argmax; top-k
    and top-p ignored), else logits / T, the top_k most likely kept (0: all), then the smallest
    set of most likely tokens whose probability reaches top_p (the most likely always kept).

    Args:
      logits: (b, v) fp32.
      keys: (b, 2) uint32 raw PRNG keys, one per row.
      temperature: (b,) float; top_k: (b,) int; top_p: (b,) float in (0, 1].

    Returns:
      (b,) int32 tokens.
    """
    logits = logits.astype(jnp.float32)
    v = logits.shape[-1]
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    t = jnp.where(temperature > 0, temperature, 1.0).astype(jnp.float32)
    lg = logits / t[:, None]
    srt = -jnp.sort(-lg, axis=-1)  # descending
    k = jnp.clip(top_k, 1, v).astype(jnp.int32)
    use_k = (top_k > 0) & (top_k < v)
    kth = jnp.take_along_axis(srt, (k - 1)[:, None], axis=-1)
    lg = jnp.where(use_k[:, None] & (lg < kth), -jnp.inf, lg)
    srt = jnp.where(use_k[:, None] & (jnp.arange(v)[None] >= k[:, None]), -jnp.inf, srt)
    probs = jax.nn.softmax(srt, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    keep = before < top_p[:, None].astype(jnp.float32)
    thresh = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
    lg = jnp.where((top_p[:, None] < 1.0) & (lg < thresh), -jnp.inf, lg)
    drawn = jax.vmap(lambda kk, row: jax.random.categorical(kk, row))(keys, lg).astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, greedy)


def seed_key(seed: int) -> np.ndarray:
    """`jax.random.PRNGKey(seed)` (threefry: [seed >> 32, seed & 0xffffffff]) built on the host."""
    if not 0 <= seed < 2**63:
        raise InvalidRequestError(f"seed must be in [0, 2**63), got {seed}", param="seed")
    return np.asarray([seed >> 32, seed & 0xFFFFFFFF], np.uint32)


# ---------------------------------------------------------------------- per-row pooled weights


def _rows(ids: jax.Array, x: jax.Array) -> jax.Array:
    """(batch,) ids -> x.shape[:-1] (repeated over the sequence axes)."""
    ids = ids.astype(jnp.int32).reshape(ids.shape + (1,) * (x.ndim - 2))
    return jnp.broadcast_to(ids, x.shape[:-1])


def _gather_rows(table: jax.Array, ids: jax.Array) -> jax.Array:
    """table (cap, ...) rows ids (b,) -> (b, ...) fp32, zeros where ids == -1."""
    cap = table.shape[0]
    d = table[jnp.clip(ids, 0, cap - 1)].astype(jnp.float32)
    ok = (ids >= 0) & (ids < cap)
    return jnp.where(ok.reshape(ok.shape + (1,) * (d.ndim - 1)), d, 0.0)


@flax.struct.dataclass
class PooledLinear(ops.BaseWeight):
    """A linear weight: shared base + each row's delta from each pool holding this leaf.

    `deltas[p]` is pool p's stacked container (leading axis = its capacity), `ids[p]` (batch,)
    the row's index in pool p (-1: not in that pool). Implements `ops.LinearOperand`.
    """

    base: jax.Array
    deltas: tuple
    ids: tuple
    methods: tuple = flax.struct.field(pytree_node=False)
    capacities: tuple = flax.struct.field(pytree_node=False)
    implementation: str = flax.struct.field(pytree_node=False, default="auto")
    interpret: bool = flax.struct.field(pytree_node=False, default=False)

    def apply(self, x: jax.Array) -> jax.Array:
        y = ops.dense_matmul(x, self.base)
        for d, ids, m, cap in zip(self.deltas, self.ids, self.methods, self.capacities):
            y = multitenant_matmul(m, x, _rows(ids, x), d, cap, y_base=y,
                                   implementation=self.implementation, interpret=self.interpret)
        return y


@flax.struct.dataclass
class PooledVector(ops.BaseWeight):
    """A 1-D leaf (norm weight, bias) plus each row's delta from the pools' (cap, d) tables.

    The model only calls `.astype(dtype)` on such leaves (`ops.rms_norm`, the bias of
    `ops.linear`): it returns the (batch, 1, d) per-row weight (base + delta in fp32, cast to the
    base dtype, as `delta.attach` merges it), broadcasting over (batch, seq, d).
    """

    base: jax.Array
    tables: tuple
    ids: tuple

    @property
    def ndim(self):
        return self.base.ndim

    def astype(self, dtype) -> jax.Array:
        w = self.base.astype(jnp.float32)[None]
        for t, ids in zip(self.tables, self.ids):
            w = w + _gather_rows(t, ids)
        return w.astype(self.base.dtype).astype(dtype)[:, None, :]


@flax.struct.dataclass
class PooledEmbedding(ops.BaseWeight):
    """The embedding table plus each row's dense embedding delta from the pools' tables.

    `lookup(tokens)` (called by `model.embed`) gives row r the rows of base + its delta;
    `apply(x)` (tied embeddings: the output head) is x @ (base + delta_r)ᵀ per row.
    """

    base: jax.Array  # (vocab, d)
    tables: tuple  # per pool (cap, vocab, d)
    ids: tuple

    def lookup(self, tokens: jax.Array) -> jax.Array:
        e = jnp.take(self.base, tokens, axis=0).astype(jnp.float32)
        for t, ids in zip(self.tables, self.ids):
            cap = t.shape[0]
            rows = t[jnp.clip(ids, 0, cap - 1)[:, None], tokens].astype(jnp.float32)
            ok = ((ids >= 0) & (ids < cap))[:, None, None]
            e = e + jnp.where(ok, rows, 0.0)
        return e.astype(self.base.dtype)

    def apply(self, x: jax.Array) -> jax.Array:
        y = ops.dense_matmul(x, self.base).astype(jnp.float32)
        xf = x.astype(jnp.float32)
        for t, ids in zip(self.tables, self.ids):
            ys = jax.vmap(lambda w: jnp.einsum("...i,oi->...o", xf, w.astype(jnp.float32),
                                               precision=jax.lax.Precision.HIGHEST))(t)
            y = y + _select(ys, _rows(ids, x))
        return y.astype(x.dtype)


def _select(ys: jax.Array, ids: jax.Array) -> jax.Array:
    """ys (cap, *rows, n), ids rows -> (*rows, n): ys[ids[r], r] (0 where ids == -1)."""
    cap = ys.shape[0]
    y = jnp.take_along_axis(ys, jnp.clip(ids, 0, cap - 1)[None, ..., None], axis=0)[0]
    return jnp.where(((ids >= 0) & (ids < cap))[..., None], y, 0.0)


# ------------------------------------------------------------------------------ pool layouts


def leaf_kind(name: str, shape: Sequence[int]) -> str:
    """How a leaf's delta is applied per row: "linear" | "vector" | "embed"."""
    if _LINEAR_RE.search(name):
        return LINEAR
    if name == EMBED_NAME:
        return EMBED
    if len(shape) == 1:
        return VECTOR
    raise FineTuneError(f"leaf {name} (shape {tuple(shape)}): no per-row serving rule for a "
                        "non-projection leaf of this rank", param="lora_path")


@dataclasses.dataclass(frozen=True)
class LeafSpec:
    """The static layout of one leaf in a pool (hashable: part of the jit-static PoolSpec)."""

    name: str
    kind: str
    method: Method | None  # LINEAR only; VECTOR / EMBED store the dense decompressed delta
    treedef: Any
    avals: tuple  # ((shape, dtype name), ...) of the container leaves (one array otherwise)

    def zeros(self, capacity: int):
        # numpy, then one transfer each: no per-shape compile of a jnp.zeros
        arrays = [jax.device_put(np.zeros((capacity, *s), d)) for s, d in self.avals]
        return jax.tree.unflatten(self.treedef, arrays)


@dataclasses.dataclass(frozen=True)
class PoolSpec:
    """A pool's static structure: its leaves' layouts and its capacity."""

    leaves: tuple[LeafSpec, ...]
    capacity: int

    def describe(self) -> str:
        methods = sorted({s.method.name for s in self.leaves if s.method is not None})
        kinds = collections.Counter(s.kind for s in self.leaves)
        return (f"{'+'.join(methods) or 'dense'} ({kinds[LINEAR]} linear, {kinds[VECTOR]} "
                f"vector, {kinds[EMBED]} embedding leaves) x {self.capacity}")


def _avals(tree) -> tuple:
    return tuple((tuple(a.shape), jnp.dtype(a.dtype).name) for a in jax.tree.leaves(tree))


def pack_finetune(
    compressed: Mapping[str, DeltaLeaf], base_flat: Mapping[str, Any],
) -> tuple[tuple[LeafSpec, ...], dict[str, Any]]:
    """(layout, host arrays) of a compressed delta: what a pool stores for one fine-tune.

    Linear leaves keep their packed container; 1-D leaves and the embedding table store their
    decompressed delta (fp32, or the `Keep` dtype for a kept embedding).

    Raises:
      FineTuneError: a leaf the base does not have, a shape mismatch, or an unservable leaf.
    """
    problems = [f"delta for unknown leaf {n}" for n in compressed if n not in base_flat]
    problems += [f"shape of {n}: base {tuple(base_flat[n].shape)} vs delta {tuple(lf.shape)}"
                 for n, lf in compressed.items()
                 if n in base_flat and tuple(base_flat[n].shape) != tuple(lf.shape)]
    if problems:
        raise FineTuneError("the delta does not fit this base:\n  " + "\n  ".join(problems),
                            param="lora_path")
    specs, arrays = [], {}
    for name in sorted(compressed):
        leaf = compressed[name]
        kind = leaf_kind(name, leaf.shape)
        if kind == LINEAR:
            host = jax.device_get(leaf.container)
            specs.append(LeafSpec(name, kind, leaf.method, jax.tree.structure(host), _avals(host)))
        else:
            dt = np.float32
            values = getattr(leaf.container, "values", None)
            if kind == EMBED and leaf.method.name == "keep" and values is not None:
                dt = values.dtype
            host = np.asarray(jax.device_get(leaf.decompress().astype(dt)))
            specs.append(LeafSpec(name, kind, None, jax.tree.structure(host), _avals(host)))
        arrays[name] = host
    return tuple(specs), arrays


def bind(base, pools: Sequence[Mapping[str, Any]], specs: Sequence[PoolSpec],
         row_pool: jax.Array, row_index: jax.Array, *, implementation: str = "auto",
         interpret: bool = False):
    """The params tree whose leaves apply each row's fine-tune (traced inside the steps).

    Args:
      base: dense base params.
      pools: per pool {leaf name: stacked arrays}.
      specs: per pool its `PoolSpec`.
      row_pool: (batch,) the pool of each row's fine-tune (-1: the bare base).
      row_index: (batch,) its index in that pool.
    """
    ids = [jnp.where(row_pool == p, row_index, -1).astype(jnp.int32) for p in range(len(specs))]
    users: dict[str, list[tuple[int, LeafSpec]]] = {}
    for p, spec in enumerate(specs):
        for ls in spec.leaves:
            users.setdefault(ls.name, []).append((p, ls))

    def f(name, w):
        us = users.get(name)
        if not us:
            return w
        kind = us[0][1].kind
        arrs = tuple(pools[p][name] for p, _ in us)
        rid = tuple(ids[p] for p, _ in us)
        if kind == LINEAR:
            return PooledLinear(base=w, deltas=arrs, ids=rid,
                                methods=tuple(ls.method for _, ls in us),
                                capacities=tuple(specs[p].capacity for p, _ in us),
                                implementation=implementation, interpret=interpret)
        if kind == VECTOR:
            return PooledVector(base=w, tables=arrs, ids=rid)
        return PooledEmbedding(base=w, tables=arrs, ids=rid)

    return map_with_names(f, base)


# ------------------------------------------------------------------------------- device steps


@flax.struct.dataclass
class SlotState:
    """Device state of the decode slots (donated to every step)."""

    k: tuple  # per layer (slots, max_len, kv_heads, head_dim)
    v: tuple
    pos: jax.Array  # (slots,) int32 tokens in the row's cache = position of the next one
    last: jax.Array  # (slots,) int32 token fed at the next step
    gen: jax.Array  # (slots,) int32 tokens generated (the step index folded into the key)
    pool: jax.Array  # (slots,) int32 pool of the row's fine-tune (-1: base)
    index: jax.Array  # (slots,) int32 index in that pool
    temperature: jax.Array  # (slots,) float32
    top_k: jax.Array  # (slots,) int32
    top_p: jax.Array  # (slots,) float32
    key: jax.Array  # (slots, 2) uint32 the request's key

    @classmethod
    def create(cls, cfg: M.ModelConfig, slots: int, max_len: int, dtype) -> SlotState:
        shape = (slots, max_len, cfg.num_key_value_heads, cfg.head_dim)
        n = cfg.num_hidden_layers
        def z(shape, dt, fill=0):  # distinct device buffers (the state is donated), no compile
            return jax.device_put(np.full(shape, fill, dt))

        return cls(k=tuple(z(shape, dtype) for _ in range(n)),
                   v=tuple(z(shape, dtype) for _ in range(n)), pos=z(slots, np.int32),
                   last=z(slots, np.int32), gen=z(slots, np.int32),
                   pool=z(slots, np.int32, -1), index=z(slots, np.int32, -1),
                   temperature=z(slots, np.float32), top_k=z(slots, np.int32),
                   top_p=z(slots, np.float32, 1), key=z((slots, 2), np.uint32))


_STATIC = ("cfg", "specs", "implementation", "interpret")


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("state",))
def _prefill_insert(base, pools, state: SlotState, tokens, n, slot, pool_id, pool_index,
                    temperature, top_k, top_p, seed_key, choice, *, cfg, specs, implementation,
                    interpret):
    """Prefill one right-padded prompt (1, B) of n real tokens into row `slot`; first token.

    The request's key is fold_in(seed_key, choice); token j is drawn with fold_in(key, j).
    """
    key = jax.random.fold_in(seed_key, choice)
    params = bind(base, pools, specs, pool_id[None], pool_index[None],
                  implementation=implementation, interpret=interpret)
    b = tokens.shape[1]
    cache = M.KVCache.create(cfg, 1, b, state.k[0].dtype)
    mask = jnp.arange(b)[None] < n
    h, cache = M.forward(params, tokens, cfg, attention_mask=mask, cache=cache,
                         return_hidden=True)
    h_last = jax.lax.dynamic_slice_in_dim(h, n - 1, 1, axis=1)
    logits = M.unembed(cfg, params, h_last)[:, 0]
    first = sample_rows(logits, jax.random.fold_in(key, 0)[None], temperature[None],
                        top_k[None], top_p[None])[0]

    def put(big, small):
        return jax.lax.dynamic_update_slice(big, small.astype(big.dtype), (slot, 0, 0, 0))

    state = state.replace(
        k=tuple(put(a, c) for a, c in zip(state.k, cache.k)),
        v=tuple(put(a, c) for a, c in zip(state.v, cache.v)),
        pos=state.pos.at[slot].set(n), last=state.last.at[slot].set(first),
        gen=state.gen.at[slot].set(1), pool=state.pool.at[slot].set(pool_id),
        index=state.index.at[slot].set(pool_index),
        temperature=state.temperature.at[slot].set(temperature),
        top_k=state.top_k.at[slot].set(top_k), top_p=state.top_p.at[slot].set(top_p),
        key=state.key.at[slot].set(key),
    )
    return state, first


def _decode_once(base, pools, state: SlotState, active, *, cfg, specs, implementation,
                 interpret):
    """One token for every slot: feed `last` at `pos`; inactive rows keep their state."""
    params = bind(base, pools, specs, state.pool, state.index, implementation=implementation,
                  interpret=interpret)
    max_len = state.k[0].shape[1]
    pos = jnp.minimum(state.pos, max_len - 1)
    cols = jnp.arange(max_len)
    causal = cols[None, None, :] <= pos[:, None, None]
    masks = {}
    for kind in set(cfg.layer_kinds):  # per-layer sliding windows (Gemma 2/3, Qwen2 layer_types)
        window = cfg.window(kind)
        masks[kind] = causal if window is None else (
            causal & (pos[:, None, None] - cols[None, None, :] < window))
    h = M.embed(params, state.last[:, None], cfg=cfg)
    ks, vs = [], []
    for i, lp in enumerate(params["layers"]):
        h, (k, v) = M.decoder_layer(cfg, lp, h, pos[:, None], masks, (state.k[i], state.v[i]),
                                    pos, kind=cfg.layer_kind(i))
        ks.append(k)
        vs.append(v)
    logits = M.unembed(cfg, params, h)[:, 0]
    keys = jax.vmap(jax.random.fold_in)(state.key, state.gen)
    tok = sample_rows(logits, keys, state.temperature, state.top_k, state.top_p)
    tok = jnp.where(active, tok, state.last)
    inc = active.astype(jnp.int32)
    state = state.replace(k=tuple(ks), v=tuple(vs), pos=state.pos + inc, last=tok,
                          gen=state.gen + inc)
    return state, tok




@functools.partial(jax.jit, static_argnames=(*_STATIC, "steps"), donate_argnames=("state",))
def _decode(base, pools, state: SlotState, active, *, cfg, specs, implementation, interpret,
            steps: int = 1):
    """`steps` decode steps in one call (a `lax.scan` of `_decode_once`): tokens (steps, slots).

    Rows are independent, so a row's tokens do not depend on `steps`; the host reads them once
    per call (one round trip per `steps` tokens) and drops a row's tokens after its request
    finishes (the row decoded on, unused, until the call ended).
    """
    kw = dict(cfg=cfg, specs=specs, implementation=implementation, interpret=interpret)
    if steps == 1:
        state, tok = _decode_once(base, pools, state, active, **kw)
        return state, tok[None]

    def body(st, _):
        return _decode_once(base, pools, st, active, **kw)

    return jax.lax.scan(body, state, None, length=steps)


@functools.partial(jax.jit, donate_argnames=("pool",))
def _pool_write(pool, new, index):
    """pool arrays (cap, ...) with entry `index` replaced by `new` (in place: pool is donated)."""
    return jax.tree.map(
        lambda a, x: jax.lax.dynamic_update_index_in_dim(a, x.astype(a.dtype), index, 0),
        pool, new)


def compile_counts() -> dict[str, int]:
    """Compiled executables held by the engine's jitted steps (process-wide, all engines)."""
    return {"prefill": _prefill_insert._cache_size(), "decode": _decode._cache_size(),
            "pool_write": _pool_write._cache_size()}


# ------------------------------------------------------------------------------------ requests


@dataclasses.dataclass(frozen=True)
class Event:
    """What a request emits: new token ids and the text they complete (maybe "").

    The last event has `finish_reason` set ("stop" | "length" | "cancelled" | "error"); with
    "error", `error` says why.
    """

    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None = None
    error: str | None = None


@dataclasses.dataclass
class Completion:
    """A finished request: text (stop token / stop string excluded), generated ids (a final
    stop token included, as `generate` counts it), why it finished, token counts."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    model: str
    error: str | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class Request:
    """One generation (one sequence) in the engine. Created by `Engine.submit`.

    Iterating yields its `Event`s as they come (blocking); `result()` waits for the end.
    `cancel()` frees its slot at the next engine step (a finish_reason "cancelled").
    """

    def __init__(self, engine: Engine, rid: str, model: str, prompt_ids: list[int], *,
                 max_tokens: int, temperature: float, top_p: float, top_k: int, seed: int,
                 choice: int, stop: tuple[str, ...], stop_ids: frozenset[int],
                 on_event: Callable[[Event], None] | None, finetune: _FineTune | None):
        self.id, self.model, self.prompt_ids = rid, model, prompt_ids
        self.max_tokens, self.temperature, self.top_p, self.top_k = (
            max_tokens, temperature, top_p, top_k)
        self.seed, self.choice, self.stop, self.stop_ids = seed, choice, stop, stop_ids
        self.created = time.monotonic()
        self.first_token_time: float | None = None
        self.output_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.error: str | None = None
        self._engine = engine
        self._ft = finetune
        self._on_event = on_event
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._done = threading.Event()
        self._cancel = False
        # incremental detokenization (prefix/read offsets over the text ids)
        self._text_ids: list[int] = []
        self._pre = self._read = 0
        self._full = ""
        self._sent = 0

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Stop this request; its slot is freed at the next engine step."""
        self._cancel = True
        self._engine._wake()

    def _emit(self, ev: Event) -> None:
        self._events.put(ev)
        if self._on_event is not None:
            try:
                self._on_event(ev)
            except Exception:  # a listener's failure must not stop the engine
                log.exception("request %s: event callback failed", self.id)
        if ev.finish_reason is not None:
            self._done.set()

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """The request's events until its last one; drives the engine if no thread does."""
        while True:
            ev = self._next(timeout)
            yield ev
            if ev.finish_reason is not None:
                return

    __iter__ = events

    def _next(self, timeout):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                return self._events.get_nowait()
            except queue.Empty:
                pass
            if not self._engine.running:
                self._engine.step()
                continue
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"request {self.id}: no event within {timeout} s")
            try:
                return self._events.get(timeout=0.5 if left is None else min(left, 0.5))
            except queue.Empty:
                continue

    def result(self, timeout: float | None = None) -> Completion:
        """Wait for the end (driving the engine if no thread does) and return the completion."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._done.is_set():
            if not self._engine.running:
                self._engine.step()
            elif not self._done.wait(0.5 if deadline is None else
                                     max(0.0, min(0.5, deadline - time.monotonic()))):
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"request {self.id}: not finished within {timeout} s")
        return Completion(text=self.text, token_ids=list(self.output_ids),
                          finish_reason=self.finish_reason or "error",
                          prompt_tokens=self.prompt_tokens, model=self.model, error=self.error)


# ---------------------------------------------------------------------------------- fine-tunes


@dataclasses.dataclass(eq=False)
class _FineTune:
    name: str
    source: str | None
    layout: tuple[LeafSpec, ...]
    arrays: dict[str, Any]  # host copies (written into a pool when made resident)
    pool: int | None = None
    index: int | None = None
    pending: int = 0  # waiting + running requests
    last_used: int = 0
    removed: bool = False  # unloaded; its pool index is freed when `pending` reaches 0


@dataclasses.dataclass(eq=False)
class _Pool:
    spec: PoolSpec
    arrays: dict[str, Any]
    free: list[int]
    resident: dict[int, _FineTune]


def default_buckets(max_len: int) -> tuple[int, ...]:
    """Prefill lengths 16, 32, 64, ... below max_len, and max_len itself."""
    out, b = [], 16
    while b < max_len:
        out.append(b)
        b *= 2
    return tuple(out) + (max_len,)


# -------------------------------------------------------------------------------------- engine


class Engine:
    """Continuous-batching generation for a base model and many compressed fine-tunes.

    Args:
      params: dense base params (HF layout).
      cfg: the model config.
      tokenizer: the checkpoint's transformers tokenizer.
      deltas: fine-tunes to register at start, {name: saved delta dir | {leaf: DeltaLeaf}}.
      base_name: the model name that serves the bare base.
      slots: decode slots (rows of the batch).
      max_len: positions per slot (prompt + completion).
      pool_capacity: fine-tunes resident at once per pool (per delta layout).
      prefill_buckets: prompt lengths compiled for prefill (default `default_buckets`); the
        largest must be max_len (a prompt may use the whole context).
      max_queue: waiting requests at most (`submit` raises `QueueFullError` beyond).
      prefills_per_step: prefills at most between two decode steps while slots decode.
      default_max_tokens: completion length when a request gives none (capped by the context).
      kv_dtype: KV cache dtype (default: the embedding dtype, as `generate` uses).
      implementation, interpret: multi-tenant kernel choice (see `serve.multitenant`).
      seed: seeds the engine's draws of seeds for requests that give none.
      dtype: cast the base weights to this dtype (after fingerprinting them: deltas are checked
        against the stored base).
      decode_steps: decode steps per device call (one host round trip per call): the host
        reads the tokens, streams them and admits waiting requests every `decode_steps` tokens.
        Outputs do not depend on it; more steps hide the per-call host cost (measured on an
        H200, 7B shapes: benchmarks/decode.md), at the price of admitting new requests and
        noticing finished ones up to `decode_steps - 1` tokens later.
      lookahead: dispatch the next decode call before reading the tokens of the last one, so
        the host's work (reading, streaming, stop checks, the next dispatch) overlaps the
        device's; tokens reach requests one call later. Outputs do not depend on it.
    """

    def __init__(
        self, params, cfg: M.ModelConfig, tokenizer, *,
        deltas: Mapping[str, str | os.PathLike | Mapping[str, DeltaLeaf]] | None = None,
        base_name: str = BASE, slots: int = 8, max_len: int = 1024, pool_capacity: int = 4,
        prefill_buckets: Sequence[int] | None = None, max_queue: int = 1024,
        prefills_per_step: int = 1, default_max_tokens: int = 256, kv_dtype=None,
        implementation: str = "auto", interpret: bool = False, seed: int | None = None,
        dtype=None, decode_steps: int = 4, lookahead: bool = True,
    ):
        if slots < 1 or max_len < 2 or pool_capacity < 1 or max_queue < 1 or \
                prefills_per_step < 1 or default_max_tokens < 1 or decode_steps < 1:
            raise ValueError(f"Engine: slots={slots}, max_len={max_len}, pool_capacity="
                             f"{pool_capacity}, max_queue={max_queue}, prefills_per_step="
                             f"{prefills_per_step}, default_max_tokens={default_max_tokens}, "
                             f"decode_steps={decode_steps}: need slots, pool_capacity, "
                             "max_queue, prefills_per_step, default_max_tokens, decode_steps "
                             ">= 1 and max_len >= 2")
        buckets = tuple(sorted({int(b) for b in (prefill_buckets or default_buckets(max_len))}))
        if buckets[0] < 1 or buckets[-1] != max_len:
            raise ValueError(f"Engine: prefill_buckets {buckets} must be >= 1 and end at "
                             f"max_len={max_len}")
        dyn = sorted({r.rope_type for r in cfg.ropes.values()} & set(DYNAMIC_ROPE_TYPES))
        if dyn:
            raise ValueError(
                f"Engine: {cfg.model_type} uses rope_type={dyn[0]!r}, whose frequencies depend on "
                "the longest position of a batch; the slot engine cannot reproduce that per "
                "request. Use deltajax.generate (it runs transformers' semantics)."
            )
        if max_len > cfg.max_position_embeddings:
            log.warning("max_len %d exceeds the model's max_position_embeddings %d", max_len,
                        cfg.max_position_embeddings)
        self.cfg, self.tokenizer, self.base_name = cfg, tokenizer, base_name
        self.slots, self.max_len, self.pool_capacity = slots, max_len, pool_capacity
        self.buckets, self.max_queue = buckets, max_queue
        self.prefills_per_step, self.default_max_tokens = prefills_per_step, default_max_tokens
        self.implementation, self.interpret = implementation, interpret
        self.decode_steps, self.lookahead = decode_steps, lookahead
        self._inflight: tuple | None = None  # (tokens, requests, active) of a call not yet read
        self._tok_lock = threading.Lock()
        self._base_fp: dict[int, str] | None = None
        if dtype is not None:  # deltas are checked against the stored base: fingerprint first
            for version in (1, 2):  # format-1 deltas carry the sampled fingerprint
                self._fingerprint_of(params, version)
            params = cast_params(params, dtype, what="base")  # refuses a cast to Inf
        self._base = params
        self._base_flat = flatten(params)
        self._kv_dtype = kv_dtype or getattr(params["embed_tokens"]["weight"], "dtype",
                                             jnp.float32)
        self._state = SlotState.create(cfg, slots, max_len, self._kv_dtype)
        self._slot_req: list[Request | None] = [None] * slots
        self._pools: list[_Pool] = []
        self._static_kw: dict | None = None
        self._finetunes: dict[str, _FineTune] = {}
        self._stop_ids = frozenset(G.default_stop_ids(tokenizer)) if tokenizer is not None \
            else frozenset()
        self._rng = np.random.default_rng(seed if seed is not None else secrets.randbits(63))
        self._ids = itertools.count()
        self._clock = itertools.count(1)
        self._cv = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._control: collections.deque[tuple[Callable[[], Any], Future]] = collections.deque()
        self._drive = threading.RLock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._stats = collections.Counter()
        self._per_model: collections.Counter = collections.Counter()
        self._token_secs: collections.deque[list[int]] = collections.deque()  # [second, n]
        for name, src in (deltas or {}).items():
            self.load(name, src)

    # ----------------------------------------------------------------------------- public API

    @property
    def running(self) -> bool:
        """True while the background thread of `start()` owns the device."""
        return self._thread is not None and self._thread.is_alive()

    def models(self) -> list[str]:
        """The base name and every registered fine-tune (resident on the device or not)."""
        with self._cv:
            return self._names()

    def load(self, name: str, source: str | os.PathLike | Mapping[str, DeltaLeaf]) -> dict:
        """Register fine-tune `name` and make it resident if a pool index is (or can be) free.

        Args:
          name: the model name requests will use.
          source: a saved delta directory (read by `io.delta_ckpt.load_delta`; refused unless
            its base fingerprint, `io.delta_ckpt.fingerprint` of this base computed once, and
            its config match) or an in-memory {leaf: DeltaLeaf}.

        Returns:
          {"name", "pool", "index", "resident", "layout"}.

        Raises:
          FineTuneError: bad name, name in use, unreadable path, delta of another base
            (`WrongBaseError` message), or leaves that do not fit.
        """
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][\w.:/@+-]{0,127}", name):
            raise FineTuneError(f"bad fine-tune name {name!r}: 1-128 characters of letters, "
                                "digits and _ . : / @ + -, starting with a letter or digit",
                                param="lora_name")
        if name == self.base_name:
            raise FineTuneError(f"{name!r} is the base model's name", param="lora_name")
        with self._cv:  # early, before reading a checkpoint (checked again when registering)
            if name in self._finetunes:
                raise FineTuneError(f"a fine-tune named {name!r} is already loaded; unload it "
                                    "first", param="lora_name", code="already_loaded")
        src = None
        if isinstance(source, (str, os.PathLike)):
            src = os.fspath(source)
            compressed = self._read_delta(src)
        else:
            compressed = dict(source)
            bad = [k for k, v in compressed.items() if not isinstance(v, DeltaLeaf)]
            if bad:
                raise FineTuneError(f"fine-tune {name!r}: {bad[:3]} are not DeltaLeaf values "
                                    "(compress with delta.compress_tree)", param="lora_path")
        if not compressed:
            raise FineTuneError(f"fine-tune {name!r}: the delta has no leaves", param="lora_path")
        layout, arrays = pack_finetune(compressed, self._base_flat)
        ft = _FineTune(name=name, source=src, layout=layout, arrays=arrays)
        return self._in_engine(lambda: self._register(ft))

    def _fingerprint_of(self, params, version: int = 2) -> str:
        """`io.delta_ckpt.fingerprint` of the base, computed once per fingerprint version."""
        from deltajax.io import delta_ckpt

        if self._base_fp is None:
            self._base_fp = {}
        if version not in self._base_fp:
            self._base_fp[version] = delta_ckpt.fingerprint(params, version=version)
        return self._base_fp[version]

    def _fingerprint(self, version: int = 2) -> str:
        return self._fingerprint_of(self._base, version)

    def _read_delta(self, path: str) -> dict[str, DeltaLeaf]:
        """`io.delta_ckpt.load_delta` of `path`, refused unless it was made from this base
        (the base fingerprint, computed once, before any `dtype` cast; and the config)."""
        from deltajax.io import delta_ckpt
        from deltajax.io.params_ckpt import CheckpointError

        if not os.path.isdir(path):
            raise FineTuneError(f"delta path {path} is not a directory", param="lora_path")
        try:
            meta = delta_ckpt.read_delta_meta(path)
            delta_ckpt.verify_base(path, meta, self._fingerprint)
            compressed, _ = delta_ckpt.load_delta(path, cfg=self.cfg, check_base=False)
        except delta_ckpt.WrongBaseError as e:
            raise FineTuneError(str(e), param="lora_path", code="wrong_base") from None
        except (CheckpointError, OSError, KeyError, ValueError) as e:
            raise FineTuneError(f"cannot load the delta at {path}: {e}", param="lora_path",
                                code="bad_checkpoint") from None
        return compressed

    def unload(self, name: str) -> None:
        """Unregister fine-tune `name`; its pool index is freed once its requests are done.

        Raises:
          UnknownModelError: no such fine-tune.
        """
        self._in_engine(lambda: self._unregister(name))

    def submit(
        self, prompt: str | Sequence[dict] | Sequence[int], *, model: str | None = None,
        max_tokens: int | None = None, temperature: float = 0.0, top_p: float = 1.0,
        top_k: int = 0, seed: int | None = None, choice: int = 0,
        stop: str | Sequence[str] | None = None, stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False, chat: bool = False,
        on_event: Callable[[Event], None] | None = None,
    ) -> Request:
        """Queue one generation (thread-safe); returns its `Request` at once.

        Args:
          prompt: text, chat messages [{"role", "content"}] (with chat=True), or token ids.
          model: a registered fine-tune or `base_name` (None: the base).
          max_tokens: completion tokens at most (None: `default_max_tokens`, capped by the
            context); prompt + max_tokens must fit `max_len`.
          temperature, top_p, top_k: sampling (temperature 0: greedy).
          seed: the request's PRNG seed (None: drawn by the engine); the key is
            fold_in(PRNGKey(seed), choice), folded with the step index at every token.
          choice: index of this sequence among the n of one API request (distinct draws).
          stop: strings ending the completion (excluded from the text).
          stop_token_ids: extra stop tokens (beside the tokenizer's eos / end-of-turn tokens).
          ignore_eos: do not stop on the tokenizer's eos / end-of-turn tokens.
          chat: render `prompt` with the tokenizer's chat template.
          on_event: called (from the engine thread) with every `Event`; keep it cheap.

        Raises:
          InvalidRequestError, ContextLengthError, UnknownModelError, QueueFullError.
        """
        model = self.base_name if model is None else model
        if not isinstance(model, str):
            raise InvalidRequestError(f"model must be a string, got {model!r}", param="model")
        temperature, top_p, top_k = _check_sampling(temperature, top_p, top_k)
        stops = _check_stop(stop)
        stop_ids = set() if ignore_eos else set(self._stop_ids)
        for t in stop_token_ids:
            if not isinstance(t, (int, np.integer)) or not 0 <= t < self.cfg.vocab_size:
                raise InvalidRequestError(f"stop_token_ids: {t!r} is not a token id in "
                                          f"[0, {self.cfg.vocab_size})", param="stop_token_ids")
            stop_ids.add(int(t))
        ids = self._encode(prompt, chat=chat)
        n = len(ids)
        room = self.max_len - n
        what = "messages" if chat else "prompt"
        if room < 1:
            raise ContextLengthError(
                f"this model's maximum context length is {self.max_len} tokens; the {what} has "
                f"{n} tokens (the limit leaves no room for a completion)", param=what,
                code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(self.default_max_tokens, room)
        elif not isinstance(max_tokens, (int, np.integer)) or isinstance(max_tokens, bool) \
                or max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be an integer >= 1, got {max_tokens!r}",
                                      param="max_tokens")
        elif max_tokens > room:
            raise ContextLengthError(
                f"this model's maximum context length is {self.max_len} tokens; you requested "
                f"{n + max_tokens} tokens ({n} in the {what}, {max_tokens} for the completion)",
                param="max_tokens", code="context_length_exceeded")
        if seed is None:
            seed = int(self._rng.integers(0, 2**63 - 1))
        elif not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
            raise InvalidRequestError(f"seed must be an integer, got {seed!r}", param="seed")
        seed_key(int(seed))  # range check
        with self._cv:
            ft = None
            if model != self.base_name:
                ft = self._finetunes.get(model)
                if ft is None:
                    raise UnknownModelError(
                        f"the model {model!r} does not exist; served: {self._names()}",
                        param="model", code="model_not_found")
            if len(self._waiting) >= self.max_queue:
                self._stats["rejected_queue_full"] += 1
                raise QueueFullError(f"the request queue is full ({self.max_queue} waiting); "
                                     "retry later", code="queue_full")
            r = Request(self, f"req-{next(self._ids)}", model, ids, max_tokens=int(max_tokens),
                        temperature=temperature, top_p=top_p, top_k=top_k, seed=int(seed),
                        choice=int(choice), stop=stops, stop_ids=frozenset(stop_ids),
                        on_event=on_event, finetune=ft)
            if ft is not None:
                ft.pending += 1
                ft.last_used = next(self._clock)
            self._per_model[model] += 1
            self._stats["requests"] += 1
            self._waiting.append(r)
            self._cv.notify_all()
        return r

    def queue_capacity(self) -> int:
        """How many more requests `submit` accepts now."""
        with self._cv:
            return self.max_queue - len(self._waiting)

    def generate(
        self, prompts: Sequence[str | Sequence[dict] | Sequence[int]], *,
        model: str | Sequence[str] | None = None, timeout: float | None = None, **kwargs,
    ) -> list[Completion]:
        """Generate for every prompt (one fine-tune for all, or one per prompt); see `submit`.

        Runs the engine in this thread unless `start()` was called. Returns one `Completion`
        per prompt, in order.
        """
        models = [model] * len(prompts) if model is None or isinstance(model, str) else \
            list(model)
        if len(models) != len(prompts):
            raise ValueError(f"{len(models)} models for {len(prompts)} prompts")
        reqs = []
        for p, m in zip(prompts, models):
            while True:
                try:
                    reqs.append(self.submit(p, model=m, **kwargs))
                    break
                except QueueFullError:  # make room: run the engine (or let its thread run)
                    if self.running:
                        time.sleep(0.01)
                    else:
                        self.step()
        return [r.result(timeout) for r in reqs]

    def stream(self, prompt, *, model: str | None = None, **kwargs) -> Iterator[int]:
        """Token ids of one request as they are generated (see `submit`); a final stop token
        is included. Closing the iterator early cancels the request."""
        r = self.submit(prompt, model=model, **kwargs)
        try:
            for ev in r.events():
                if ev.finish_reason == "error":
                    raise RuntimeError(f"request {r.id} failed: {ev.error}")
                yield from ev.token_ids
        finally:
            if not r.done:
                r.cancel()

    def start(self) -> None:
        """Run the engine in a background thread (it then owns the device)."""
        if self.running:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="deltajax-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the background thread (requests in flight stay where they are)."""
        t = self._thread
        if t is None:
            return
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        t.join(timeout)
        self._thread = None

    def warmup(self) -> float:
        """Compile prefill for every bucket and the decode step now; returns the seconds."""
        t0 = time.perf_counter()

        def run():
            for b in self.buckets:
                self._prefill(0, [0] * min(b, self.max_len - 1), 0.0, 1.0, 0,
                              np.zeros(2, np.uint32), 0, bucket=b)
            self._decode_step(np.zeros(self.slots, bool))
            self._flush_inflight()

        self._in_engine(run)
        self._count("warmups")
        return time.perf_counter() - t0

    def metrics(self) -> dict[str, Any]:
        """Counters and gauges (what the server's /metrics exposes)."""
        now = int(time.monotonic())
        with self._cv:
            recent = sum(n for sec, n in self._token_secs if now - 10 <= sec < now)
            return {
                "queue_length": len(self._waiting),
                "active_slots": sum(r is not None for r in self._slot_req),
                "slots": self.slots,
                "max_len": self.max_len,
                "tokens_per_s": recent / 10.0,
                "stats": dict(self._stats),
                "requests_per_model": dict(self._per_model),
                "pools": [{"layout": p.spec.describe(), "capacity": p.spec.capacity,
                           "resident": sorted(f.name for f in p.resident.values())}
                          for p in self._pools],
                "registered": sorted(self._finetunes),
                "compiles": compile_counts(),
            }

    def step(self) -> bool:
        """One engine iteration in the calling thread: control ops, admissions, a decode step.

        Returns whether anything was done. Refuses while the background thread runs.
        """
        if self.running and threading.current_thread() is not self._thread:
            raise RuntimeError("Engine.step: the background thread owns the engine")
        with self._drive:
            return self._iterate()

    # ------------------------------------------------------------------------------ internals

    def _count(self, key: str, n: int = 1) -> None:
        with self._cv:  # metrics() copies the counters from other threads
            self._stats[key] += n

    def _names(self) -> list[str]:
        return [self.base_name] + sorted(self._finetunes)

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    def _in_engine(self, fn: Callable[[], Any]) -> Any:
        """Run fn in the thread that owns the device and return its result (or raise)."""
        if not self.running or threading.current_thread() is self._thread:
            with self._drive:
                return fn()
        fut: Future = Future()
        with self._cv:
            self._control.append((fn, fut))
            self._cv.notify_all()
        return fut.result()

    def _encode(self, prompt, *, chat: bool) -> list[int]:
        if isinstance(prompt, str) or (chat and isinstance(prompt, (list, tuple))):
            if self.tokenizer is None:
                raise InvalidRequestError("this engine has no tokenizer: pass token ids",
                                          param="prompt")
            if not chat and not prompt:
                raise InvalidRequestError("the prompt is empty", param="prompt")
            with self._tok_lock:
                try:
                    toks, mask = G.encode_prompts(self.tokenizer, [prompt], chat=chat)
                except (ValueError, TypeError, KeyError) as e:
                    raise InvalidRequestError(str(e), param="messages" if chat else "prompt") \
                        from None
                except Exception as e:  # a chat template raising on the messages (jinja)
                    raise InvalidRequestError(f"the chat template failed on these messages: {e}",
                                              param="messages") from None
            return [int(t) for t in toks[0][mask[0]]]
        try:
            ids = [int(t) for t in prompt]
            ok = all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompt)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise InvalidRequestError("prompt must be a string or a list of token ids",
                                      param="prompt")
        if not ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise InvalidRequestError(f"prompt token ids {bad[:5]} are outside the vocabulary "
                                      f"[0, {self.cfg.vocab_size})", param="prompt")
        return ids

    def _decode_text(self, ids: list[int]) -> str:
        if self.tokenizer is None or not ids:
            return ""
        with self._tok_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    # registry (engine thread) ---------------------------------------------------------------

    def _register(self, ft: _FineTune) -> dict:
        with self._cv:
            if ft.name in self._finetunes:
                raise FineTuneError(f"a fine-tune named {ft.name!r} is already loaded; unload "
                                    "it first", param="lora_name", code="already_loaded")
            ft.last_used = next(self._clock)
            self._finetunes[ft.name] = ft
        pool = self._pool_for(ft.layout)
        resident = self._make_resident(ft, pool)
        self._count("loads")
        log.info("fine-tune %s registered (%s; %s)", ft.name, pool.spec.describe(),
                 "resident" if resident else "not resident: every pool index is busy")
        return {"name": ft.name, "pool": self._pools.index(pool), "index": ft.index,
                "resident": resident, "layout": pool.spec.describe()}

    def _unregister(self, name: str) -> None:
        with self._cv:
            ft = self._finetunes.pop(name, None)
            if ft is None:
                raise UnknownModelError(f"no fine-tune named {name!r} is loaded; loaded: "
                                        f"{sorted(self._finetunes)}", param="lora_name",
                                        code="model_not_found")
            ft.removed = True
            self._stats["unloads"] += 1
        self._release_if_done(ft)

    def _release_if_done(self, ft: _FineTune) -> None:
        if ft.removed and not ft.pending and ft.pool is not None:
            self._evict(ft)

    def _pool_for(self, layout: tuple[LeafSpec, ...]) -> _Pool:
        for p in self._pools:
            if p.spec.leaves == layout:
                return p
        spec = PoolSpec(leaves=layout, capacity=self.pool_capacity)
        arrays = {ls.name: ls.zeros(self.pool_capacity) for ls in layout}
        pool = _Pool(spec=spec, arrays=arrays, free=list(range(self.pool_capacity))[::-1],
                     resident={})
        with self._cv:
            self._pools.append(pool)
        if self._stats["prefills"] or self._stats["warmups"]:
            log.warning("new delta pool %d: %s; prefill and decode compile once more for it",
                        len(self._pools) - 1, spec.describe())
        return pool

    def _make_resident(self, ft: _FineTune, pool: _Pool) -> bool:
        if ft.pool is not None:
            return True
        if not pool.free:
            idle = [f for f in pool.resident.values() if f.pending == 0]
            if not idle:
                return False
            victim = min(idle, key=lambda f: f.last_used)
            self._evict(victim)
            self._count("evictions")
            log.info("evicted idle fine-tune %s (least recently used) for %s", victim.name,
                     ft.name)
        with self._cv:
            i = pool.free.pop()
        try:
            pool.arrays = _pool_write(pool.arrays, ft.arrays, np.int32(i))
        except BaseException:
            with self._cv:
                pool.free.append(i)
            raise
        with self._cv:
            pool.resident[i] = ft
            ft.pool, ft.index = self._pools.index(pool), i
        self._count("pool_writes")
        return True

    def _evict(self, ft: _FineTune) -> None:
        with self._cv:
            pool = self._pools[ft.pool]
            del pool.resident[ft.index]
            pool.free.append(ft.index)
            ft.pool = ft.index = None

    # the loop (engine thread) ----------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._stopping or self._control or self._waiting or
                           any(self._slot_req) or self._inflight is not None):
                    self._cv.wait()
                if self._stopping:
                    return
            try:
                with self._drive:
                    self._iterate()
            except Exception:  # keep serving: _iterate already failed the requests concerned
                log.exception("engine iteration failed")
                time.sleep(0.01)

    def _iterate(self) -> bool:
        did = False
        while True:
            with self._cv:
                if not self._control:
                    break
                fn, fut = self._control.popleft()
            did = True
            try:
                fut.set_result(fn())
            except BaseException as e:  # handed to the caller
                fut.set_exception(e)
        for s, r in enumerate(self._slot_req):
            if r is not None and r._cancel:
                self._finish(s, r, "cancelled")
                did = True
        with self._cv:
            gone = [r for r in self._waiting if r._cancel]
            for r in gone:
                self._waiting.remove(r)
        for r in gone:
            self._finish(None, r, "cancelled")
            did = True
        did |= self._admit()
        active = np.array([r is not None for r in self._slot_req])
        if active.any():
            self._decode_step(active)
            did = True
        else:
            did |= self._flush_inflight()
        return did

    def _admit(self) -> bool:
        free = [s for s, r in enumerate(self._slot_req) if r is None]
        budget = len(free) if not any(self._slot_req) else self.prefills_per_step
        did = False
        with self._cv:
            waiting = list(self._waiting)
        for r in waiting:
            if not free or budget <= 0:
                break
            if r._cancel:
                continue  # removed at the next iteration
            pool_id, index = -1, -1
            ft = r._ft
            if ft is not None:
                if ft.pool is None and not self._make_resident(ft, self._pool_for(ft.layout)):
                    continue  # every index of its pool is busy: try the next request
                pool_id, index = ft.pool, ft.index
            with self._cv:
                self._waiting.remove(r)
            slot = free.pop(0)
            budget -= 1
            did = True
            try:
                tok = self._prefill(slot, r.prompt_ids, r.temperature, r.top_p, r.top_k,
                                    seed_key(r.seed), r.choice, pool_id=pool_id, index=index)
            except Exception as e:
                log.exception("prefill of %s failed", r.id)
                self._finish(None, r, "error", error=f"prefill failed: {e}")
                free.insert(0, slot)
                continue
            self._slot_req[slot] = r
            self._count("prefills")
            self._on_token(slot, r, tok)
        return did

    def _specs(self) -> tuple[PoolSpec, ...]:
        return tuple(p.spec for p in self._pools)

    def _pool_arrays(self) -> tuple:
        return tuple(p.arrays for p in self._pools)

    def _static(self) -> dict:
        n = len(self._pools)
        if self._static_kw is None or len(self._static_kw["specs"]) != n:  # pools only grow
            self._static_kw = dict(cfg=self.cfg, specs=self._specs(),
                                   implementation=self.implementation, interpret=self.interpret)
        return self._static_kw

    def _prefill(self, slot, ids, temperature, top_p, top_k, key, choice, *, pool_id=-1,
                 index=-1, bucket=None) -> int:
        n = len(ids)
        b = bucket or next(x for x in self.buckets if x >= n)
        toks = np.zeros((1, b), np.int32)
        toks[0, :n] = ids
        self._state, first = _prefill_insert(
            self._base, self._pool_arrays(), self._state, toks, np.int32(n), np.int32(slot),
            np.int32(pool_id), np.int32(index), np.float32(temperature), np.int32(top_k),
            np.float32(top_p), np.asarray(key, np.uint32), np.int32(choice), **self._static())
        return int(first)

    def _decode_step(self, active: np.ndarray) -> None:
        reqs = list(self._slot_req)  # the requests the tokens of this call belong to
        try:
            self._state, tok = _decode(self._base, self._pool_arrays(), self._state, active,
                                       steps=self.decode_steps, **self._static())
        except Exception as e:
            self._decode_failed(e)
            return
        self._count("decode_calls")
        self._count("decode_steps", self.decode_steps)
        call = (tok, reqs, np.flatnonzero(active))
        if not self.lookahead:
            self._read_call(call)
            return
        prev, self._inflight = self._inflight, call
        if prev is not None:  # the last call's tokens, read while this call runs
            self._read_call(prev)

    def _flush_inflight(self) -> bool:
        """Read the tokens of the call still in flight (lookahead), if any."""
        prev, self._inflight = self._inflight, None
        if prev is None:
            return False
        self._read_call(prev)
        return True

    def _read_call(self, call) -> None:
        tok, reqs, rows = call
        try:
            toks = np.asarray(tok)  # (decode_steps, slots)
        except Exception as e:
            self._decode_failed(e)
            return
        for step_toks in toks:
            for s in rows:
                r = reqs[s]
                if r is not None and self._slot_req[s] is r:  # still running
                    self._on_token(int(s), r, int(step_toks[s]))

    def _decode_failed(self, e: Exception) -> None:
        log.error("decode step failed (%s); failing the running requests", e,
                  exc_info=True)
        self._inflight = None
        for s, r in enumerate(self._slot_req):
            if r is not None:
                self._finish(s, r, "error", error=f"decode failed: {e}")
        self._state = SlotState.create(self.cfg, self.slots, self.max_len, self._kv_dtype)

    def _on_token(self, slot: int, r: Request, tok: int) -> None:
        now = time.monotonic()
        if r.first_token_time is None:
            r.first_token_time = now
        r.output_ids.append(tok)
        with self._cv:
            self._stats["generated_tokens"] += 1
            sec = int(now)
            if self._token_secs and self._token_secs[-1][0] == sec:
                self._token_secs[-1][1] += 1
            else:
                self._token_secs.append([sec, 1])
                while self._token_secs[0][0] < sec - 11:
                    self._token_secs.popleft()
        finish = None
        if tok in r.stop_ids:
            finish = "stop"
        else:
            r._text_ids.append(tok)
            r._full += self._detok(r)
        if finish is None and (len(r.output_ids) >= r.max_tokens or
                               r.prompt_tokens + len(r.output_ids) >= self.max_len):
            finish = "length"
        if finish is not None:
            r._full += self._flush(r)
        hit = _find_stop(r._full, r.stop, r._sent)
        if hit is not None:
            r._full, finish = r._full[:hit], "stop"
        if finish is None:
            safe = len(r._full) - _held_back(r._full, r.stop)
            text = r._full[r._sent:safe]
            r._sent = max(r._sent, safe)
            r._emit(Event(token_ids=(tok,), text=text))
            return
        text = r._full[r._sent:]
        r._sent = len(r._full)
        self._finish(slot, r, finish, last=Event(token_ids=(tok,), text=text,
                                                 finish_reason=finish))

    def _detok(self, r: Request) -> str:
        ids = r._text_ids
        prefix = self._decode_text(ids[r._pre:r._read])
        full = self._decode_text(ids[r._pre:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            r._pre, r._read = r._read, len(ids)
            return full[len(prefix):]
        return ""

    def _flush(self, r: Request) -> str:
        ids = r._text_ids
        if r._read >= len(ids):
            return ""
        prefix = self._decode_text(ids[r._pre:r._read])
        full = self._decode_text(ids[r._pre:])
        r._pre = r._read = len(ids)
        return full[len(prefix):]

    def _finish(self, slot: int | None, r: Request, reason: str, *, error: str | None = None,
                last: Event | None = None) -> None:
        if slot is not None and self._slot_req[slot] is r:
            self._slot_req[slot] = None
        if r.finish_reason is not None:
            return
        r.finish_reason, r.error, r.text = reason, error, r._full
        ft = r._ft
        with self._cv:
            self._stats[f"finished_{reason}"] += 1
            if ft is not None:
                ft.pending -= 1
                ft.last_used = next(self._clock)
            self._cv.notify_all()
        if ft is not None:
            self._release_if_done(ft)
        r._emit(last if last is not None else Event(token_ids=(), text="", finish_reason=reason,
                                                    error=error))


# ------------------------------------------------------------------------------------ helpers


def _check_sampling(temperature, top_p, top_k) -> tuple[float, float, int]:
    def num(v, name):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise InvalidRequestError(f"{name} must be a number, got {v!r}", param=name)
        if not np.isfinite(v):
            raise InvalidRequestError(f"{name} must be finite, got {v!r}", param=name)
        return float(v)

    temperature = num(temperature, "temperature")
    if temperature < 0:
        raise InvalidRequestError(f"temperature must be >= 0, got {temperature}",
                                  param="temperature")
    top_p = num(top_p, "top_p")
    if not 0.0 < top_p <= 1.0:
        raise InvalidRequestError(f"top_p must be in (0, 1], got {top_p}", param="top_p")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < -1:
        raise InvalidRequestError(f"top_k must be an integer >= 0 (or -1: no limit), got "
                                  f"{top_k!r}", param="top_k")
    return temperature, top_p, max(int(top_k), 0)


def _check_stop(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise InvalidRequestError("stop must be a string or a list of strings", param="stop")
    if len(stop) > 16:
        raise InvalidRequestError(f"at most 16 stop strings, got {len(stop)}", param="stop")
    return tuple(s for s in stop if s)


def _find_stop(text: str, stops: Sequence[str], sent: int) -> int | None:
    """Index of the earliest stop string in text (searching from where it could start)."""
    best = None
    for s in stops:
        i = text.find(s, max(0, sent - len(s) + 1))
        if i >= 0 and (best is None or i < best):
            best = i
    return best


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of a stop string."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return hold
