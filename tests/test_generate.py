"""Generation: deltas on the fly vs merged, cached decode, samplers, stop tokens, the script."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_pair import perturb, tiny_base

from deltajax import delta, ops
from deltajax import model as M
from deltajax.methods import RTN, BitDelta, LowRank
from deltajax.serve import generate as G

REPO = Path(__file__).resolve().parents[1]
CFG = M.ModelConfig(vocab_size=53, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16)


@pytest.fixture(scope="module")
def base():
    return tiny_base(CFG)


def _comp(base, method, seed=1, keep_other=True):
    ft = perturb(base, jax.random.PRNGKey(seed))
    return delta.compress(base, ft, method, keep_other=keep_other, progress=False)


def _prompts(b=3, t=8, seed=2):
    tok = np.array(jax.random.randint(jax.random.PRNGKey(seed), (b, t), 3, CFG.vocab_size))
    mask = np.ones((b, t), bool)
    mask[1, :2] = False
    tok[1, :2] = 0
    return tok, mask


def _argmax_by_hand(params, tok, mask, n):
    """Greedy continuation by full re-forwarding (no cache), one row at a time.

    The sequence sits at the start of a fixed (1, t + n) buffer (one compile); causal attention
    makes the logits at its last token independent of the unused tail.
    """
    out = []
    for r in range(tok.shape[0]):
        seq = list(tok[r][mask[r]])
        for _ in range(n):
            buf = np.zeros((1, tok.shape[1] + n), np.int32)
            buf[0, :len(seq)] = seq
            logits = M.forward_jit(params, jnp.asarray(buf), CFG)
            seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
        out.append(seq[-n:])
    return np.asarray(out)


@pytest.mark.parametrize("method", [RTN(bits=4, group=32), BitDelta(), LowRank(rank=8)],
                         ids=["rtn4", "bitdelta", "lowrank"])
def test_attached_logits_equal_merged(base, method):
    comp = _comp(base, method)
    tok, mask = _prompts()
    on_the_fly = M.forward_jit(delta.attach(base, comp), tok, CFG, mask)
    merged = M.forward_jit(delta.merge(base, comp), tok, CFG, mask)
    np.testing.assert_allclose(np.asarray(on_the_fly), np.asarray(merged), atol=1e-4, rtol=1e-4)
    assert np.abs(np.asarray(merged - M.forward_jit(base, tok, CFG, mask))).max() > 1e-2


def test_cached_decode_with_deltas_equals_full_forward(base):
    params = delta.attach(base, _comp(base, RTN(bits=4, group=32)))
    tok = jax.random.randint(jax.random.PRNGKey(4), (2, 9), 0, CFG.vocab_size)
    full = M.forward_jit(params, tok, CFG)
    step = jax.jit(lambda p, t, c: M.forward(p, t, CFG, cache=c))
    cache = M.KVCache.create(CFG, 2, 12, jnp.float32)
    lg, cache = step(params, tok[:, :5], cache)
    outs = [lg]
    for i in range(5, 9):
        lg, cache = step(params, tok[:, i:i + 1], cache)
        outs.append(lg)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(full),
                               atol=1e-4, rtol=1e-4)


def test_greedy_is_deterministic_and_equals_argmax_loop(base):
    params = delta.attach(base, _comp(base, BitDelta()))
    tok, mask = _prompts()
    a = G.generate_tokens(params, CFG, tok, mask, max_new_tokens=6)
    b = G.generate_tokens(params, CFG, tok, mask, max_new_tokens=6, seed=7)
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    np.testing.assert_array_equal(a["tokens"], _argmax_by_hand(params, tok, mask, 6))
    assert b["compile_seconds"] == 0.0  # same shapes and config: no recompile
    assert a["num_tokens"] == 18 and a["tokens_per_s"] > 0
    # the streaming loop runs the same step and gives the same tokens
    seen = []
    c = G.generate_tokens(params, CFG, tok, mask, max_new_tokens=6,
                          stream=lambda s, t, act: seen.append((s, t.copy(), act.copy())))
    np.testing.assert_array_equal(c["tokens"], a["tokens"])
    np.testing.assert_array_equal(np.stack([t for _, t, _ in seen], 1), a["tokens"])


_sample = jax.jit(G.sample, static_argnames="sampling")


@pytest.mark.slow
def test_samplers(base):
    # top_k=1 and top_p -> 0 are greedy
    logits = jax.random.normal(jax.random.PRNGKey(1), (64, CFG.vocab_size)) * 3
    for s in (G.Sampling(temperature=2.0, top_k=1), G.Sampling(temperature=1.0, top_p=1e-6)):
        np.testing.assert_array_equal(_sample(logits, jax.random.PRNGKey(2), s),
                                      jnp.argmax(logits, -1))
    # sampled generation: the while_loop and the streaming loop share the RNG stream
    tok, mask = _prompts()
    greedy = G.generate_tokens(base, CFG, tok, mask, max_new_tokens=6)["tokens"]
    s = G.Sampling(temperature=1.5, top_k=20, top_p=0.9)
    a = G.generate_tokens(base, CFG, tok, mask, max_new_tokens=6, sampling=s, seed=5)
    b = G.generate_tokens(base, CFG, tok, mask, max_new_tokens=6, sampling=s, seed=5,
                          stream=lambda *_: None)
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    assert not np.array_equal(a["tokens"], greedy)
    # nucleus support: with probabilities .5 .3 .15 .05, top_p=0.7 keeps only the first two
    logits = jnp.log(jnp.asarray([[0.05, 0.5, 0.15, 0.3]] * 4000))
    draws = np.asarray(_sample(logits, jax.random.PRNGKey(0), G.Sampling(temperature=1.0,
                                                                          top_p=0.7)))
    assert set(draws.tolist()) == {1, 3}
    assert abs((draws == 1).mean() - 0.5 / 0.8) < 0.04
    with pytest.raises(ValueError, match="top_p"):
        G.Sampling(temperature=1.0, top_p=0.0)


def test_stop_tokens_stop_a_row_others_continue(base):
    tok, mask = _prompts()
    free = G.generate_tokens(base, CFG, tok, mask, max_new_tokens=6)["tokens"]
    stop = int(free[0, 2])
    got = G.generate_tokens(base, CFG, tok, mask, max_new_tokens=6, stop_ids=[stop], pad_id=-1)
    for r in range(3):
        hits = np.flatnonzero(free[r] == stop)
        n = int(hits[0]) + 1 if hits.size else 6
        assert got["lengths"][r] == n
        np.testing.assert_array_equal(got["tokens"][r, :n], free[r, :n])
        assert (got["tokens"][r, n:] == -1).all()
    assert got["lengths"][0] <= 3 and got["lengths"].max() > got["lengths"][0]
    # every row stopping at its first token ends the loop after the prefill
    all_stop = G.generate_tokens(base, CFG, tok, mask, max_new_tokens=6,
                                 stop_ids=free[:, 0].tolist())
    assert all_stop["steps"] == 1 and (all_stop["lengths"] == 1).all()


# ------------------------------------------------------------------------------ tokenizer level


def make_tiny_tokenizer(out_dir: Path | None = None):
    """A word-level tokenizer with a chat template (vocab < 53), saved to out_dir if given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<unk>"]
    words = [f"w{i}" for i in range(40)] + ["user", "assistant", "hello", "world"]
    tk = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + words)},
                                    unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", unk_token="<unk>",
                                  additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = (
        "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> "
        "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
    if out_dir is None:
        return tok
    tok.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(str(out_dir), local_files_only=True)


def test_generate_text_chat_and_multitenant(base):
    tok = make_tiny_tokenizer()
    assert G.default_stop_ids(tok) == [2, 4]  # </s> and <|im_end|>
    prompts = ["hello w3 w4", "world", "w7 w8 w9"]  # 8, 6, 8 tokens with the template
    text = G.format_prompt(tok, prompts[0], chat=True)
    assert text.startswith("<|im_start|> user hello w3 w4") and text.endswith("assistant ")
    comps = [_comp(base, BitDelta(), seed=s, keep_other=False) for s in (11, 12)]
    mt = delta.attach(base, comps)
    ids = [1, -1, 0]
    got = G.generate(mt, CFG, tok, prompts, max_new_tokens=6, chat=True, tenant_ids=ids,
                     stop_ids=[])
    assert len(got["texts"]) == 3 and got["prompt_lengths"].tolist() == [8, 6, 8]
    for t in (-1, 0, 1):  # each row = its fine-tune alone
        p = base if t < 0 else delta.attach(base, comps[t])
        one = G.generate(p, CFG, tok, prompts, max_new_tokens=6, chat=True, stop_ids=[])
        r = ids.index(t)
        np.testing.assert_array_equal(got["tokens"][r], one["tokens"][r])
        assert got["texts"][r] == one["texts"][r]
    again = G.generate(mt, CFG, tok, prompts[::-1], max_new_tokens=6, chat=True,
                       tenant_ids=[0, 0, 1], stop_ids=[])
    assert again["compile_seconds"] == 0.0  # new ids, same shapes: no recompile
    with pytest.raises(ValueError, match="no chat template"):
        tok.chat_template = None
        G.generate(base, CFG, tok, prompts, chat=True)


def test_text_streamer_prints_the_text(base, capsys):
    tok = make_tiny_tokenizer()
    prompts = ["hello w3 w4", "world", "w7 w8 w9"]
    res = G.generate(base, CFG, tok, prompts, max_new_tokens=6, chat=True, stop_ids=[],
                     stream=G.text_streamer(tok, row=2))
    assert capsys.readouterr().out.strip() == res["texts"][2].strip() != ""


# ------------------------------------------------------------------------------------ the script


@pytest.mark.slow
def test_script_generate_multitenant(base, tmp_path):
    from deltajax.io import delta_ckpt as delta_checkpoint
    from deltajax.io import hf

    src = hf.export_hf(base, CFG, tmp_path / "base")
    tok = make_tiny_tokenizer(src)
    comps = [_comp(base, BitDelta(), seed=s, keep_other=False) for s in (11, 12)]
    paths = [str(delta_checkpoint.save_delta(c, tmp_path / f"d{i}", cfg=CFG, base_params=base))
             for i, c in enumerate(comps)]
    prompts = ["hello w3 w4", "world", "w7 w8 w9"]
    pf = tmp_path / "prompts.jsonl"
    pf.write_text("\n".join(f'{{"prompt": "{p}"}}' for p in prompts[1:]) + "\n")
    r = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "generate.py"), f"--base={src}",
         f"--delta={paths[0]},{paths[1]}", f"--prompt={prompts[0]}", f"--prompts_file={pf}",
         "--tenant=1,-1,0", "--max_new_tokens=6"],
        cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO)),
        capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "tokens/s" in r.stdout and "chat=True" in r.stdout
    want = G.generate(delta.attach(base, comps), CFG, tok, prompts, max_new_tokens=6,
                      chat=True, tenant_ids=[1, -1, 0])
    for i, (p, label) in enumerate(zip(prompts, ["delta 1", "base", "delta 0"])):
        assert f"=== [{i}] ({label}) {p}\n{want['texts'][i]}\n" in r.stdout, r.stdout


CFG128 = M.ModelConfig(vocab_size=53, hidden_size=128, intermediate_size=256,
                       num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=32)


@pytest.mark.slow
def test_attach_prepare_hopper_layout_keeps_logits():
    """attach(prepare=True): 4-bit group-128 deltas in the Mosaic GPU serving layout (on CPU
    the prepared form runs its reference); same logits as the stored form."""
    from deltajax.containers import PreparedMatrix

    base = tiny_base(CFG128)
    ft = perturb(base, jax.random.PRNGKey(3))
    comp = delta.compress(base, ft, RTN(bits=4, group=128), progress=False)
    tok, mask = _prompts()
    stored = delta.attach(base, comp, prepare=False)
    prepared = delta.attach(base, comp, prepare=True)
    kinds = {type(w.delta.container).__name__ for w in jax.tree.leaves(
        prepared, is_leaf=lambda v: isinstance(v, ops.DeltaWeight))
        if isinstance(w, ops.DeltaWeight)}
    assert kinds == {"PreparedMatrix"}
    a = M.forward_jit(stored, tok, CFG128, mask)
    b = M.forward_jit(prepared, tok, CFG128, mask)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)
    assert np.abs(np.asarray(b - M.forward_jit(base, tok, CFG128, mask))).max() > 1e-2
    with pytest.raises(ValueError, match="prepare"):
        delta.attach(base, comp, prepare="yes")
    # act-order permutation (GPTQ's g_idx): dequantize and matmul agree with the stored form
    qm = comp["layers.0.mlp.down_proj.weight"].container  # (128, 256): K = 2 groups
    perm = jax.random.permutation(jax.random.PRNGKey(5), qm.k_pad).astype(jnp.int32)
    import dataclasses
    qp = dataclasses.replace(qm, perm=perm)
    pm = qp.prepared(jnp.float32)
    assert isinstance(pm, PreparedMatrix)
    np.testing.assert_allclose(np.asarray(pm.dequantize()), np.asarray(qp.dequantize()),
                               atol=1e-6)
    x = jax.random.normal(jax.random.PRNGKey(6), (3, qm.k))
    np.testing.assert_allclose(np.asarray(pm.matmul(x)), np.asarray(qp.matmul(x)),
                               atol=1e-4, rtol=1e-4)
