"""Greedy / sampled generation with a KV cache as a `lax.while_loop` (prefill + decode).

Params may hold `DeltaWeight` leaves (compressed deltas applied on the fly); the loop does not care.
Prompts are left-padded so every row's last prompt token sits in the same slot.
"""

from __future__ import annotations

import functools
import time

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from deltajax import model as M


@flax.struct.dataclass
class DecodeState:
    cache: M.KVCache
    last: jax.Array  # (b,) last token
    out: jax.Array  # (b, max_new) generated tokens
    done: jax.Array  # (b,) bool
    step: jax.Array  # () int32
    key: jax.Array


def _sample(logits, key, temperature, top_k):
    if temperature <= 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new", "temperature", "top_k"))
def _generate(params, tokens, mask, stop_ids, key, cfg, max_new, temperature, top_k):
    b, t = tokens.shape
    cache = M.KVCache.create(cfg, b, t + max_new, params["embed_tokens"]["weight"].dtype)
    logits, cache = M.forward(params, tokens, cfg, attention_mask=mask, cache=cache)
    key, sk = jax.random.split(key)
    first = _sample(logits[:, -1], sk, temperature, top_k)
    out = jnp.zeros((b, max_new), jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, stop_ids)
    st = DecodeState(cache=cache, last=first, out=out, done=done, step=jnp.int32(1), key=key)

    def cond(s):
        return (s.step < max_new) & ~jnp.all(s.done)

    def body(s):
        lg, c = M.forward(params, s.last[:, None], cfg, cache=s.cache)
        k, sk = jax.random.split(s.key)
        nxt = _sample(lg[:, -1], sk, temperature, top_k)
        nxt = jnp.where(s.done, stop_ids[0], nxt)
        return DecodeState(cache=c, last=nxt, out=s.out.at[:, s.step].set(nxt),
                           done=s.done | jnp.isin(nxt, stop_ids), step=s.step + 1, key=k)

    st = jax.lax.while_loop(cond, body, st)
    return st.out, st.step


def generate(params, cfg, tokenizer, prompts: list[str], *, max_new_tokens: int = 128,
             temperature: float = 0.0, top_k: int = 0, seed: int = 0) -> dict:
    """Generate continuations for `prompts`; returns texts, token ids, and tokens/s."""
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    t = max(len(i) for i in ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    toks = np.full((len(ids), t), pad, np.int32)
    mask = np.zeros((len(ids), t), bool)
    for r, i in enumerate(ids):
        toks[r, t - len(i):] = i
        mask[r, t - len(i):] = True
    stops = [tokenizer.eos_token_id] + [tokenizer.convert_tokens_to_ids(s) for s in
                                        ("<|im_end|>",) if s in tokenizer.get_vocab()]
    stop_ids = jnp.asarray([s for s in stops if s is not None], jnp.int32)
    t0 = time.perf_counter()
    out, steps = _generate(params, jnp.asarray(toks), jnp.asarray(mask), stop_ids,
                           jax.random.PRNGKey(seed), cfg, max_new_tokens, float(temperature),
                           int(top_k))
    out = np.asarray(out)
    dt = time.perf_counter() - t0
    texts = []
    for row in out:
        keep = []
        for x in row:
            if int(x) in set(np.asarray(stop_ids).tolist()):
                break
            keep.append(int(x))
        texts.append(tokenizer.decode(keep))
    n = int(steps) * len(prompts)
    return {"texts": texts, "tokens": out, "seconds": dt, "tokens_per_s": n / dt}
