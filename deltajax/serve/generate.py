"""Generation with a KV cache: prefill, then decode as a `lax.while_loop` over a struct state.

    out = generate(params, cfg, tok, ["What is 2+3?"], max_new_tokens=64, chat=True)
    print(out["texts"][0], f"{out['tokens_per_s']:.1f} tokens/s")

`params` may hold `DeltaWeight` leaves (one compressed delta applied on the fly) or
`multitenant.MultiTenantWeight` leaves (each batch row uses its own fine-tune; pass `tenant_ids`);
the loop does not care. Prompts are left-padded (with an attention mask) so every row's last
prompt token sits in the same slot.

Decoding: greedy (temperature 0), or temperature sampling with optional top-k and top-p (nucleus)
filtering (`Sampling`). A row stops when it emits one of `stop_ids` (default: the tokenizer's eos
and known end-of-turn tokens); its later slots hold `pad_id`. The loop ends when every row has
stopped or after `max_new_tokens`.

Compilation: prefill and the decode loop are each compiled ahead of time once per (argument
shapes and dtypes, `max_new_tokens`, `Sampling`, model config) and cached, so the reported
`compile_seconds` is exact and the timings exclude it. `tenant_ids` are array leaves: changing
them does not recompile. The default path runs the whole decode in one `lax.while_loop`; with
`stream=callback` a Python loop runs the same jitted step (same tokens, same RNG stream) and calls
`callback(step, tokens, active)` after each step (`text_streamer` prints text as it comes).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from deltajax import model as M

# End-of-turn tokens of common chat templates; stop tokens by default when in the vocabulary.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")

StreamCallback = Callable[[int, np.ndarray, np.ndarray], None]


# ------------------------------------------------------------------------------------- sampling


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sampling:
    """Decoding rule (hashable: a static jit argument).

    Attributes:
      temperature: 0 for greedy (argmax; top_k / top_p are then ignored), else logits / T.
      top_k: keep the k most likely tokens (0: no limit).
      top_p: nucleus sampling: keep the smallest set of most likely tokens whose probability
        reaches top_p (1.0: no limit). The most likely token is always kept, so top_p -> 0
        is greedy.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not 0 <= self.temperature < float("inf"):
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


def sample(
    logits: Float[Array, "b v"], key: jax.Array, sampling: Sampling
) -> Int[Array, " b"]:
    """One token per row from fp32 `logits` under `sampling` (jit-able; sampling is static)."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / sampling.temperature
    if sampling.top_k and sampling.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        srt = -jnp.sort(-logits, axis=-1)  # descending
        probs = jax.nn.softmax(srt, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
        keep = before < sampling.top_p  # the first token always (before = 0)
        thresh = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < thresh, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# ---------------------------------------------------------------------------------- decode loop


@flax.struct.dataclass
class DecodeState:
    """Everything the decode loop carries (a pytree, so it is the `while_loop` carry)."""

    cache: M.KVCache
    last: jax.Array  # (b,) int32 token fed at the next step
    out: jax.Array  # (b, max_new) int32 generated tokens, pad_id after a row stops
    done: jax.Array  # (b,) bool: the row has emitted a stop token
    lengths: jax.Array  # (b,) int32 tokens generated per row (stop token included)
    step: jax.Array  # () int32 number of filled columns of `out`
    key: jax.Array  # PRNG key
    stop_ids: jax.Array  # (s,) int32
    pad_id: jax.Array  # () int32

    @property
    def max_new(self) -> int:
        return self.out.shape[1]


def _is_stop(tok, stop_ids):
    return jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)


def _prefill(params, tokens, mask, key, stop_ids, pad_id, *, cfg, max_new, sampling):
    b, t = tokens.shape
    dtype = getattr(params["embed_tokens"]["weight"], "dtype", jnp.float32)
    cache = M.KVCache.create(cfg, b, t + max_new, dtype)
    logits, cache = M.forward(params, tokens, cfg, attention_mask=mask, cache=cache)
    key, sk = jax.random.split(key)
    first = sample(logits[:, -1], sk, sampling)
    out = jnp.full((b, max_new), pad_id, jnp.int32).at[:, 0].set(first)
    return DecodeState(
        cache=cache, last=first, out=out, done=_is_stop(first, stop_ids),
        lengths=jnp.ones((b,), jnp.int32), step=jnp.ones((), jnp.int32), key=key,
        stop_ids=stop_ids, pad_id=pad_id,
    )


def _step(params, s: DecodeState, *, cfg, sampling) -> DecodeState:
    """One decode step: feed `s.last`, sample the next token of every row not yet done."""
    live = ~s.done
    logits, cache = M.forward(params, s.last[:, None], cfg, cache=s.cache,
                              attention_mask=live[:, None])
    key, sk = jax.random.split(s.key)
    nxt = jnp.where(live, sample(logits[:, -1], sk, sampling), s.pad_id)
    return s.replace(
        cache=cache, last=nxt, out=jax.lax.dynamic_update_slice(s.out, nxt[:, None], (0, s.step)),
        done=s.done | (live & _is_stop(nxt, s.stop_ids)), lengths=s.lengths + live,
        step=s.step + 1, key=key,
    )


def _decode_loop(params, state, *, cfg, sampling):
    def cond(s):
        return (s.step < s.max_new) & ~jnp.all(s.done)

    return jax.lax.while_loop(cond, functools.partial(_step, params, cfg=cfg, sampling=sampling),
                              state)


class _AotCache:
    """`jax.jit(fn)` compiled ahead of time once per (argument avals, static kwargs), timed.

    Calling returns (output, compile seconds of this call: 0.0 when it hit the cache).
    """

    def __init__(self, fn, static_argnames: Sequence[str], maxsize: int = 16):
        self._jit = jax.jit(fn, static_argnames=tuple(static_argnames))
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._maxsize = maxsize

    @staticmethod
    def _aval(x):
        return (jax.typeof(x), getattr(x, "sharding", None))

    def __call__(self, *args, **static):
        leaves, treedef = jax.tree.flatten(args)
        sig = (treedef, tuple(self._aval(x) for x in leaves), tuple(sorted(static.items())))
        exe, dt = self._cache.get(sig), 0.0
        if exe is None:
            t0 = time.perf_counter()
            exe = self._jit.lower(*args, **static).compile()
            dt = time.perf_counter() - t0
            self._cache[sig] = exe
            if len(self._cache) > self._maxsize:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(sig)
        return exe(*args), dt

    def clear(self) -> None:
        self._cache.clear()


_PREFILL = _AotCache(_prefill, ("cfg", "max_new", "sampling"))
_STEP = _AotCache(_step, ("cfg", "sampling"))
_LOOP = _AotCache(_decode_loop, ("cfg", "sampling"))


def _ready(x):
    return jax.block_until_ready(x)


def generate_tokens(
    params,
    cfg: M.ModelConfig,
    tokens: Int[Array, "b t"],
    mask: Array | None = None,
    *,
    max_new_tokens: int = 128,
    sampling: Sampling = Sampling(),
    stop_ids: Iterable[int] = (),
    pad_id: int = 0,
    seed: int | jax.Array = 0,
    stream: StreamCallback | None = None,
) -> dict[str, Any]:
    """Generate from left-padded token ids (the tokenizer-free core of `generate`).

    Args:
      params: model params (dense, `DeltaWeight` or multi-tenant leaves with ids set).
      cfg: the model config.
      tokens: (b, t) int prompt ids, left-padded.
      mask: (b, t) bool, True on real tokens (default: all real).
      max_new_tokens: tokens to generate at most per row (>= 1).
      sampling: greedy / temperature / top-k / top-p.
      stop_ids: a row stops after emitting any of these (empty: run max_new_tokens).
      pad_id: written after a row stops (and fed to the model for it, masked out).
      seed: int seed or a PRNG key.
      stream: optional `callback(step, tokens (b,), active (b,) bool)` called after every step
        from a Python loop (slower than the default single `while_loop`, same result); `active`
        marks the rows whose token at this step is a real generated token.

    Returns:
      dict with "tokens" (b, max_new) int32 numpy (pad_id after a row's stop), "lengths" (b,)
      generated tokens per row (stop token included), "num_tokens" (their sum), "steps" (decode
      columns used), "compile_seconds", "prefill_seconds", "decode_seconds", "seconds"
      (prefill + decode, compile excluded), "tokens_per_s" (num_tokens / seconds) and
      "decode_tokens_per_s" (tokens after the first per row / decode_seconds).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2 or tokens.shape[1] == 0:
        raise ValueError(f"tokens must be (batch, length>0), got shape {tokens.shape}")
    mask = jnp.ones(tokens.shape, bool) if mask is None else jnp.asarray(mask, bool)
    if mask.shape != tokens.shape:
        raise ValueError(f"mask shape {mask.shape} != tokens shape {tokens.shape}")
    key = jax.random.PRNGKey(seed) if isinstance(seed, (int, np.integer)) else seed
    stops = sorted({int(s) for s in stop_ids})
    if any(s < 0 for s in stops):
        raise ValueError(f"stop ids must be >= 0, got {stops}")
    # padded with -1 (never emitted) to a multiple of 8: fewer distinct compiles
    stops = jnp.asarray(stops + [-1] * (-len(stops) % 8 or (0 if stops else 8)), jnp.int32)
    pad = jnp.asarray(pad_id, jnp.int32)

    t0 = time.perf_counter()
    state, c_pre = _PREFILL(params, tokens, mask, key, stops, pad, cfg=cfg,
                            max_new=int(max_new_tokens), sampling=sampling)
    _ready(state)
    t1 = time.perf_counter()
    compile_s = c_pre
    if stream is None:
        state, c_loop = _LOOP(params, state, cfg=cfg, sampling=sampling)
        _ready(state)
        compile_s += c_loop
    else:
        stream(0, np.asarray(state.out[:, 0]), np.ones(tokens.shape[0], bool))
        step, done = 1, np.asarray(state.done)
        while step < max_new_tokens and not done.all():
            state, c_step = _STEP(params, state, cfg=cfg, sampling=sampling)
            compile_s += c_step
            stream(step, np.asarray(state.out[:, step]), ~done)
            step, done = step + 1, np.asarray(state.done)
    t2 = time.perf_counter()

    prefill_s = t1 - t0 - c_pre
    decode_s = t2 - t1 - (compile_s - c_pre)
    lengths = np.asarray(state.lengths)
    n = int(lengths.sum())
    b = tokens.shape[0]
    return {
        "tokens": np.asarray(state.out),
        "lengths": lengths,
        "num_tokens": n,
        "steps": int(state.step),
        "compile_seconds": compile_s,
        "prefill_seconds": prefill_s,
        "decode_seconds": decode_s,
        "seconds": prefill_s + decode_s,
        "tokens_per_s": n / max(prefill_s + decode_s, 1e-9),
        "decode_tokens_per_s": (n - b) / max(decode_s, 1e-9),
    }


# ------------------------------------------------------------------------------------ tokenizer


def default_stop_ids(tokenizer) -> list[int]:
    """The tokenizer's eos id(s) plus known end-of-turn tokens present in its vocabulary."""
    ids = []
    eos = tokenizer.eos_token_id
    if eos is not None:
        ids += list(eos) if isinstance(eos, (list, tuple)) else [eos]
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in END_OF_TURN_TOKENS if t in vocab]
    return sorted({int(i) for i in ids})


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(tokenizer, prompt: str | Sequence[dict], *, chat: bool) -> str:
    """The text fed to the model: `prompt` itself, or its chat-template rendering.

    Args:
      tokenizer: a transformers tokenizer.
      prompt: a user message, or (with chat) a list of {"role", "content"} messages.
      chat: apply the tokenizer's chat template with a generation prompt.

    Raises:
      ValueError: chat=True but the tokenizer has no chat template; or a message list without it.
    """
    if not chat:
        if not isinstance(prompt, str):
            raise ValueError("a list of chat messages needs chat=True")
        return prompt
    if not has_chat_template(tokenizer):
        raise ValueError(
            f"chat=True but the tokenizer ({type(tokenizer).__name__}, "
            f"{getattr(tokenizer, 'name_or_path', '?')}) has no chat template; pass chat=False"
        )
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode_prompts(
    tokenizer, prompts: Sequence[str | Sequence[dict]], *, chat: bool = False,
    pad_to_multiple: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded (b, t) int32 ids and (b, t) bool mask of the (templated) prompts.

    Plain prompts get the tokenizer's own special tokens (e.g. a BOS); templated ones already
    contain theirs. The length is rounded up to `pad_to_multiple` (fewer distinct compiles).
    """
    if not prompts:
        raise ValueError("no prompts given")
    texts = [format_prompt(tokenizer, p, chat=chat) for p in prompts]
    ids = [tokenizer(t, add_special_tokens=not chat)["input_ids"] for t in texts]
    empty = [i for i, x in enumerate(ids) if not x]
    if empty:
        raise ValueError(f"prompts {empty} tokenize to no tokens")
    t = max(len(i) for i in ids)
    t = -(-t // pad_to_multiple) * pad_to_multiple
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    toks = np.full((len(ids), t), pad, np.int32)
    mask = np.zeros((len(ids), t), bool)
    for r, i in enumerate(ids):
        toks[r, t - len(i):] = i
        mask[r, t - len(i):] = True
    return toks, mask


def decode_rows(tokenizer, tokens: np.ndarray, lengths: np.ndarray,
                stop_ids: Iterable[int]) -> list[str]:
    """Text of each row's generated tokens, up to (not including) its stop token."""
    stops = {int(s) for s in stop_ids}
    texts = []
    for row, n in zip(np.asarray(tokens), np.asarray(lengths)):
        keep = [int(x) for x in row[: int(n)]]
        if keep and keep[-1] in stops:
            keep = keep[:-1]
        texts.append(tokenizer.decode(keep, skip_special_tokens=True))
    return texts


def text_streamer(tokenizer, *, row: int = 0, stop_ids: Iterable[int] = (),
                  file=None) -> StreamCallback:
    """A `stream` callback printing row `row`'s text as it is generated (to `file`, stdout)."""
    stops = {int(s) for s in stop_ids}
    toks: list[int] = []
    shown = [""]

    def callback(step: int, tokens: np.ndarray, active: np.ndarray) -> None:
        del step
        if not active[row] or int(tokens[row]) in stops:
            return
        toks.append(int(tokens[row]))
        text = tokenizer.decode(toks, skip_special_tokens=True)
        if text.startswith(shown[0]):
            print(text[len(shown[0]):], end="", flush=True, file=file or sys.stdout)
            shown[0] = text

    return callback


def generate(
    params,
    cfg: M.ModelConfig,
    tokenizer,
    prompts: Sequence[str | Sequence[dict]],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_ids: Iterable[int] | None = None,
    chat: bool = False,
    tenant_ids: Sequence[int] | Array | None = None,
    stream: StreamCallback | None = None,
    pad_to_multiple: int = 8,
) -> dict[str, Any]:
    """Generate continuations of `prompts` with the checkpoint's own tokenizer.

    Args:
      params: model params (dense, with `DeltaWeight`s, or multi-tenant: see `tenant_ids`).
      cfg: the model config.
      tokenizer: a transformers tokenizer (e.g. `models_io.load_model(...)[2]`).
      prompts: user prompts (or, with chat, lists of {"role", "content"} messages).
      max_new_tokens: tokens to generate at most per prompt.
      temperature, top_k, top_p: see `Sampling` (temperature 0 = greedy).
      seed: sampling seed.
      stop_ids: stop tokens (default `default_stop_ids(tokenizer)`).
      chat: render each prompt with the tokenizer's chat template (error if it has none).
      tenant_ids: for multi-tenant params (`serve.multitenant`), the fine-tune index of each
        prompt (-1 = bare base); applied with `multitenant.with_tenants`.
      stream: optional per-step callback (see `generate_tokens`; `text_streamer` prints text).
      pad_to_multiple: prompt length rounding (masked left padding; fewer compiles).

    Returns:
      `generate_tokens`'s dict plus "texts" (one per prompt, stop token excluded),
      "prompt_lengths" and "stop_ids".
    """
    if tenant_ids is not None:
        from deltajax.serve import multitenant

        params = multitenant.with_tenants(params, tenant_ids)
    stops = default_stop_ids(tokenizer) if stop_ids is None else sorted({int(s) for s in stop_ids})
    toks, mask = encode_prompts(tokenizer, prompts, chat=chat, pad_to_multiple=pad_to_multiple)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
        stops[0] if stops else 0)
    res = generate_tokens(
        params, cfg, toks, mask, max_new_tokens=max_new_tokens,
        sampling=Sampling(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p)),
        stop_ids=stops, pad_id=pad, seed=seed, stream=stream,
    )
    res["texts"] = decode_rows(tokenizer, res["tokens"], res["lengths"], stops)
    res["prompt_lengths"] = mask.sum(axis=1)
    res["stop_ids"] = stops
    return res
