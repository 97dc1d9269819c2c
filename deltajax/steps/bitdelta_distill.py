"""BitDelta scale distillation: fit the per-matrix scales to the fine-tuned model's logits.

Follows FasterDecoding/BitDelta `bitdelta/train.py`: teacher = fine-tuned model, student =
base + α·sign(Δ); loss = MSE between logits (here masked on padding); AdamW, lr 1e-4, cosine
decay over the steps; only the scales train by default. `train_non_linear=True` also trains the
kept (uncompressed) norm deltas, as the released code trains every parameter left with
requires_grad. The student uses dense ±1 sign matrices during training (differentiable and
kernel-free); the result is written back into the packed containers.
"""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

from deltajax import model as M
from deltajax.containers import DeltaLeaf
from deltajax.progress import bar as tqdm  # process 0 only
from deltajax.tree import flatten, map_with_names


def _student(base, signs, trainable, fixed):
    def f(name, w):
        if name in signs:
            return (w.astype(jnp.float32) + trainable["scale"][name] * signs[name]).astype(w.dtype)
        if name in trainable.get("keep", {}):
            return (w.astype(jnp.float32) + trainable["keep"][name]).astype(w.dtype)
        if name in fixed:
            return (w.astype(jnp.float32) + fixed[name]).astype(w.dtype)
        return w

    return map_with_names(f, base)


def _masked_mse(a, b, mask):
    se = jnp.mean((a - b) ** 2, axis=-1)
    return jnp.sum(se * mask) / jnp.maximum(jnp.sum(mask), 1.0)


@functools.partial(jax.jit, static_argnames=("cfg", "opt"))
def _step(trainable, opt_state, base, signs, fixed, tokens, mask, teacher_logits, cfg, opt):
    def loss_fn(tr):
        logits, _ = M.forward(_student(base, signs, tr, fixed), tokens, cfg)
        return _masked_mse(logits, teacher_logits, mask)

    loss, g = jax.value_and_grad(loss_fn)(trainable)
    upd, opt_state = opt.update(g, opt_state, trainable)
    return optax.apply_updates(trainable, upd), opt_state, loss


@functools.partial(jax.jit, static_argnames=("cfg",))
def _logits(params, tokens, cfg):
    return M.forward(params, tokens, cfg)[0]


def distill_scales(
    base, finetuned, compressed: dict[str, DeltaLeaf], cfg: M.ModelConfig, tokens: np.ndarray,
    *, mask: np.ndarray | None = None, steps: int = 200, batch_size: int = 4, lr: float = 1e-4,
    train_non_linear: bool = False, seed: int = 0, log=print,
) -> tuple[dict[str, DeltaLeaf], list[float]]:
    """Distill BitDelta scales on (n, L) calibration tokens; returns updated leaves and losses."""
    signs, scales, fixed, keep_tr = {}, {}, {}, {}
    for name, leaf in compressed.items():
        if leaf.method.distillable:
            signs[name] = leaf.method.decompress(leaf.container.replace(scale=jnp.float32(1.0)))
            scales[name] = leaf.container.scale.astype(jnp.float32)
        elif train_non_linear and not leaf.method.on_the_fly and re.search("norm", name):
            keep_tr[name] = leaf.decompress()
        else:
            fixed[name] = leaf.decompress()
    if not signs:
        raise ValueError("distill_scales: no leaves of a distillable method (BitDelta) in the "
                         "compressed delta")
    trainable = {"scale": scales, **({"keep": keep_tr} if keep_tr else {})}
    opt = optax.adamw(optax.cosine_decay_schedule(lr, max(steps, 1)), weight_decay=0.0)
    opt_state = opt.init(trainable)
    tokens = np.asarray(tokens, np.int32)
    mask = np.ones(tokens.shape, np.float32) if mask is None else np.asarray(mask, np.float32)
    rng = np.random.default_rng(seed)
    order = rng.permutation(tokens.shape[0])
    losses = []
    for step in tqdm(range(steps), desc="bitdelta distill", leave=False):
        idx = np.take(order, np.arange(step * batch_size, (step + 1) * batch_size), mode="wrap")
        tb, mb = jnp.asarray(tokens[idx]), jnp.asarray(mask[idx])
        teacher = _logits(finetuned, tb, cfg)
        trainable, opt_state, loss = _step(trainable, opt_state, base, signs, fixed, tb, mb,
                                           teacher, cfg, opt)
        loss = float(loss)
        if not math.isfinite(loss):
            raise FloatingPointError(f"BitDelta distillation diverged at step {step}")
        losses.append(loss)
        if log and (step == 0 or step == steps - 1):
            log(f"[bitdelta] distill step {step + 1}/{steps}: logit MSE {loss:.5f}")
    out = dict(compressed)
    for name, s in trainable["scale"].items():
        leaf = compressed[name]
        out[name] = leaf.replace(container=leaf.container.replace(scale=s.astype(jnp.float32)))
    for name, v in trainable.get("keep", {}).items():
        leaf = compressed[name]
        dt = leaf.container.values.dtype
        out[name] = leaf.replace(container=leaf.container.replace(values=v.astype(dt)))
    return out, losses


def logit_mse(base, finetuned, compressed, cfg, tokens) -> float:
    """Mean logit MSE between the fine-tune and base + compressed delta (dense merge)."""
    st = map_with_names(lambda n, w: w if n not in compressed else
                        (w.astype(jnp.float32) + compressed[n].decompress()).astype(w.dtype), base)
    t = jnp.asarray(tokens)
    return float(jnp.mean((_logits(st, t, cfg) - _logits(finetuned, t, cfg)) ** 2))


__all__ = ["distill_scales", "logit_mse", "flatten"]
