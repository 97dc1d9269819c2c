"""Full fine-tuning of a converted model with optax — produces the real deltas deltajax compresses.

AdamW with linear warmup + cosine decay, global-norm gradient clipping, fp32 master weights with
optional bf16 compute, and a loss mask (padding and, by default, the prompt are not trained on).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from deltajax import model as M
from deltajax.eval.metrics import token_nll
from deltajax.progress import bar as tqdm  # process 0 only


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    steps: int = 100
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 5e-5
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    compute_dtype: str = "float32"  # or "bfloat16" (master weights stay fp32)
    seed: int = 0

    def __post_init__(self):
        for name, lo in (("steps", 1), ("batch_size", 1), ("seq_len", 2), ("warmup_steps", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        for name in ("lr", "clip_norm"):
            v = getattr(self, name)
            if not 0 < v < float("inf"):
                raise ValueError(f"{name} must be finite and > 0, got {v!r}")
        for name in ("weight_decay", "min_lr_ratio"):
            v = getattr(self, name)
            if not 0 <= v < float("inf"):
                raise ValueError(f"{name} must be finite and >= 0, got {v!r}")


def make_optimizer(fc: FinetuneConfig) -> optax.GradientTransformation:
    sched = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=fc.lr,
        warmup_steps=max(fc.warmup_steps, 1),
        decay_steps=max(fc.steps, fc.warmup_steps + 1),
        end_value=fc.lr * fc.min_lr_ratio,
    )
    return optax.chain(
        optax.clip_by_global_norm(fc.clip_norm),
        optax.adamw(sched, b1=0.9, b2=0.95, weight_decay=fc.weight_decay),
    )


def loss_fn(params, tokens, mask, cfg: M.ModelConfig, compute_dtype=jnp.float32):
    """Mean next-token NLL over masked targets (params cast to compute_dtype)."""
    p = jax.tree.map(lambda w: w.astype(compute_dtype), params)
    logits, _ = M.forward(p, tokens, cfg, attention_mask=None)
    tot, cnt = token_nll(logits, tokens, mask)
    return tot / jnp.maximum(cnt, 1.0)


@functools.partial(jax.jit, static_argnames=("cfg", "opt", "compute_dtype"), donate_argnums=(0, 1))
def train_step(params, opt_state, tokens, mask, cfg, opt, compute_dtype):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens, mask, cfg, compute_dtype)
    updates, opt_state = opt.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, loss, optax.global_norm(grads)


def finetune(
    params: dict,
    cfg: M.ModelConfig,
    tokens: np.ndarray,
    mask: np.ndarray,
    fc: FinetuneConfig,
    *,
    log_every: int = 10,
    log=print,
) -> tuple[dict, list[float]]:
    """Train on (n, L) tokens with loss mask (n, L); cycles over the data with a fixed shuffle.

    Returns the fine-tuned fp32 params and the per-step losses.
    """
    if tokens.shape != mask.shape:
        raise ValueError(f"tokens {tokens.shape} and mask {mask.shape} differ")
    n = tokens.shape[0]
    if n < fc.batch_size:
        raise ValueError(f"{n} training sequences < batch size {fc.batch_size}")
    # Copy: the train step donates its params buffers, and the caller keeps `params`.
    params = jax.tree.map(lambda w: jnp.array(w, jnp.float32, copy=True), params)
    opt = make_optimizer(fc)
    opt_state = opt.init(params)
    rng = np.random.default_rng(fc.seed)
    order = rng.permutation(n)
    cdt = jnp.dtype(fc.compute_dtype)
    losses = []
    t0 = time.perf_counter()
    bar = tqdm(range(fc.steps), desc="finetune", leave=False)
    for step in bar:
        idx = np.take(
            order, np.arange(step * fc.batch_size, (step + 1) * fc.batch_size), mode="wrap"
        )
        params, opt_state, loss, gnorm = train_step(
            params, opt_state, jnp.asarray(tokens[idx]), jnp.asarray(mask[idx]), cfg, opt, cdt
        )
        loss = float(loss)
        if not math.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {step}: {loss}")
        losses.append(loss)
        bar.set_postfix(loss=f"{loss:.3f}")
        if log_every and (step % log_every == 0 or step == fc.steps - 1):
            el = time.perf_counter() - t0
            log(
                f"[finetune] step {step + 1}/{fc.steps} loss {loss:.4f} |g| {float(gnorm):.3f} "
                f"{el / (step + 1):.2f} s/step"
            )
    return params, losses
