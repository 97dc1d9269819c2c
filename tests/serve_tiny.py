"""A tiny base, tokenizer and three compressed fine-tunes for the serving tests (shared helper).

    cfg, base = tiny_model()
    tok = tiny_tokenizer()                        # WordLevel, 300 tokens, a chat template
    comps = tiny_finetunes(base)                  # {"ft-rtn": ..., "ft-lr": ..., "ft-bd": ...}
    write_tiny_checkpoint(tmp_path, base, comps)  # HF dir + tokenizer + saved deltas

The fine-tunes differ in method and in which non-projection leaves carry a delta, so a mixed
batch exercises every per-row path of the engine:

* "ft-rtn": RTN 4-bit projections + kept (bf16) deltas of the embedding, the norms and the
  untied lm_head (the embedding and norm deltas are enlarged so they change the output);
* "ft-lr": LowRank rank-8 projections + kept norm deltas;
* "ft-bd": BitDelta projections only.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

from deltajax import delta, methods
from deltajax import model as M
from deltajax.methods import RTN, BitDelta, Keep, LowRank
from deltajax.tree import PROJ_PATTERN, Rule

VOCAB = 300
SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<unk>"]
# intermediate = hidden: the projections have two shapes only (fewer compiles when compressing)
CFG = M.ModelConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> "
    "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")


def tiny_model(cfg: M.ModelConfig = CFG, seed: int = 0):
    """(cfg, base params): random fp32 weights (scale 0.3, so the logits are far from ties)."""
    init = jax.jit(M.init_params, static_argnames=("cfg", "scale"))
    return cfg, init(cfg=cfg, key=jax.random.PRNGKey(seed), scale=0.3)


def tiny_tokenizer(out_dir: Path | None = None):
    """A word-level tokenizer of exactly VOCAB tokens ("w0".. plus specials), chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    words = ["user", "assistant", "system", "hello", "world"]
    words += [f"w{i}" for i in range(VOCAB - len(SPECIALS) - len(words))]
    tk = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIALS + words)},
                                    unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", unk_token="<unk>",
                                  additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = CHAT_TEMPLATE
    assert len(tok) == VOCAB
    if out_dir is None:
        return tok
    tok.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(str(out_dir), local_files_only=True)


@jax.jit
def _perturb(p, key, big):
    leaves, treedef = jax.tree.flatten(p)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [
        w + (0.05 + big * (w.ndim == 1 or w.shape[0] == VOCAB)) * jax.random.normal(k, w.shape)
        for k, w in zip(keys, leaves)])


def finetune(base, seed: int, *, big: float = 0.0):
    """A dense "fine-tune": every leaf + 0.05 N(0, 1); embedding, lm_head and norms + big more."""
    return _perturb(base, jax.random.PRNGKey(seed), jnp.float32(big))


RULES = {
    "ft-rtn": methods.default_rules(RTN(bits=4, group=32), keep_other=True),
    "ft-lr": (Rule(PROJ_PATTERN, LowRank(rank=8)), Rule(r"norm\.weight$", Keep()),
              Rule(".", None)),
    "ft-bd": methods.default_rules(BitDelta(), keep_other=False),
}
SEEDS = {"ft-rtn": 101, "ft-lr": 102, "ft-bd": 103}
BIG = {"ft-rtn": 0.5, "ft-lr": 0.3, "ft-bd": 0.0}


def tiny_finetunes(base, names=tuple(RULES)) -> dict[str, dict]:
    """{name: compressed delta} of the fine-tunes in `names` (see the module docstring)."""
    out = {}
    for n in names:
        ft = finetune(base, SEEDS[n], big=BIG[n])
        out[n] = delta.compress(base, ft, RULES[n], progress=False)
    return out


def write_tiny_checkpoint(root: Path, base, comps: dict[str, dict], cfg: M.ModelConfig = CFG):
    """root/base (HF dir with the tokenizer) and root/<name> (saved deltas); returns paths."""
    from deltajax.io import delta_ckpt, hf

    src = hf.export_hf(base, cfg, root / "base")
    tiny_tokenizer(src)
    paths = {n: str(delta_ckpt.save_delta(c, root / n, cfg=cfg, base_params=base))
             for n, c in comps.items()}
    return src, paths
