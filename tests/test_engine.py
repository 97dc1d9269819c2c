"""Serving engine: continuous batching over fixed slots, delta pools, per-row fine-tunes.

Every greedy answer is compared with `serve.generate.generate` on `delta.attach(base, delta)`
(the single-request reference); seeds are fixed and named in the failure messages.
"""

from __future__ import annotations

import threading

import jax
import numpy as np
import pytest
from serve_tiny import CFG, RULES, finetune, tiny_finetunes, tiny_model, tiny_tokenizer

from deltajax import delta
from deltajax import model as M
from deltajax.io import delta_ckpt
from deltajax.methods import RTN, Keep
from deltajax.serve import engine as E
from deltajax.serve import generate as G
from deltajax.tree import PROJ_PATTERN, Rule

pytestmark = pytest.mark.slow  # the engine end to end (compiles per slot layout)

PROMPTS = ["hello w3 w4", "world w9", "w7 w8 w9 w10 w11", "w1"]
MODELS = ["base", "ft-rtn", "ft-lr", "ft-bd"]
N = 12  # tokens per answer


@pytest.fixture(scope="module")
def setup():
    cfg, base = tiny_model()
    return cfg, base, tiny_tokenizer(), tiny_finetunes(base)


@pytest.fixture(scope="module")
def engine(setup):
    cfg, base, tok, comps = setup
    return E.Engine(base, cfg, tok, deltas=comps, slots=3, max_len=64, pool_capacity=2,
                    prefill_buckets=(16, 64), seed=0)


_REFS: dict = {}


def reference(setup, model, prompt, n=N, comp=None, chat=False):
    """(token ids incl. a final stop token, text) of generate() on the fine-tune alone."""
    cfg, base, tok, comps = setup
    key = (model, str(prompt), n, chat, id(comp))
    if key not in _REFS:
        c = comp if comp is not None else (None if model == "base" else comps[model])
        params = base if c is None else delta.attach(base, c)
        out = G.generate(params, cfg, tok, [prompt], max_new_tokens=n, chat=chat)
        k = int(out["lengths"][0])
        _REFS[key] = ([int(t) for t in out["tokens"][0][:k]], out["texts"][0])
    return _REFS[key]


def test_mixed_batch_greedy_equals_generate(setup, engine):
    """12 requests over 3 slots: base and three fine-tunes of two+ methods in one batch."""
    pairs = [(p, m) for p in PROMPTS for m in MODELS]
    before = dict(engine.metrics()["stats"])
    outs = engine.generate([p for p, _ in pairs], model=[m for _, m in pairs], max_tokens=N)
    stats = engine.metrics()["stats"]
    for (p, m), o in zip(pairs, outs):
        ids, text = reference(setup, m, p)
        assert o.token_ids == ids, (m, p)
        assert o.text == text, (m, p)
        assert o.finish_reason == ("stop" if len(ids) < N else "length")
        assert o.prompt_tokens == len(setup[2](p)["input_ids"])
    # continuous batching: every request got a slot, and steps decoded several slots at once
    assert stats["prefills"] - before.get("prefills", 0) == len(pairs)
    tokens = sum(len(o.token_ids) for o in outs)
    steps = stats["decode_steps"] - before.get("decode_steps", 0)
    assert steps < tokens - len(pairs), (steps, tokens)
    assert engine.metrics()["active_slots"] == 0
    # each fine-tune answers differently from the base
    for m in MODELS[1:]:
        assert any(reference(setup, m, p) != reference(setup, "base", p) for p in PROMPTS), m


@pytest.mark.parametrize("name", ["ft-rtn", "ft-lr"])
def test_non_projection_deltas_take_effect(setup, engine, name):
    """The norm / embedding / lm_head deltas are served: dropping them changes the answers."""
    comps = setup[3]
    proj_only = {n: lf for n, lf in comps[name].items() if n.endswith("_proj.weight")}
    assert len(proj_only) < len(comps[name])
    full = [reference(setup, name, p)[0] for p in PROMPTS]
    outs = engine.generate(PROMPTS, model=name, max_tokens=N)
    assert [o.token_ids for o in outs] == full
    # projection deltas only (merged: dense params, the base's compiled generate)
    cfg, base, tok = setup[:3]
    merged = delta.merge(base, proj_only)
    proj = [G.generate(merged, cfg, tok, [p], max_new_tokens=N)["tokens"][0] for p in PROMPTS]
    assert any(list(a[:len(f)]) != f for a, f in zip(proj, full)), name


def test_streaming_stop_strings_and_limits(setup, engine):
    ids, text = reference(setup, "ft-lr", PROMPTS[0])
    # the token iterator yields the same tokens, the events' text adds up to the answer
    assert list(engine.stream(PROMPTS[0], model="ft-lr", max_tokens=N)) == ids
    r = engine.submit(PROMPTS[0], model="ft-lr", max_tokens=N)
    evs = list(r.events())
    assert "".join(e.text for e in evs) == text == r.result().text
    assert [t for e in evs for t in e.token_ids] == ids and evs[-1].finish_reason
    # a stop string: the text ends before it; a stop token: generation ends after it
    words = text.split()
    assert len(words) >= 4, text
    stop = " " + words[2]
    o = engine.generate([PROMPTS[0]], model="ft-lr", max_tokens=N, stop=[stop])[0]
    assert o.finish_reason == "stop" and o.text == text[:text.index(stop)], (o.text, words)
    k = ids.index(ids[1]) + 1
    o = engine.generate([PROMPTS[0]], model="ft-lr", max_tokens=N, stop_token_ids=[ids[1]])[0]
    assert o.token_ids == ids[:k] and o.finish_reason == "stop"
    assert o.text == setup[2].decode(ids[:k - 1], skip_special_tokens=True)
    o = engine.generate([PROMPTS[0]], model="ft-lr", max_tokens=3)[0]
    assert o.token_ids == ids[:3] and o.finish_reason == "length"
    # chat template
    ids_c, text_c = reference(setup, "ft-bd", "hello w5", chat=True)
    o = engine.generate(["hello w5"], model="ft-bd", max_tokens=N, chat=True)[0]
    assert (o.token_ids, o.text) == (ids_c, text_c)


def test_no_recompile_across_loads_unloads_and_lru_eviction(setup, engine):
    """Pool writes, LRU evictions and reloads reuse the compiled steps."""
    cfg, base, tok, comps = setup
    engine.generate(PROMPTS[:1], model="ft-rtn", max_tokens=2)  # warm (bucket 16 compiled)
    more = {f"ft-rtn{i}": delta.compress(base, finetune(base, 200 + i, big=0.5), RULES["ft-rtn"],
                                         progress=False)
            for i in (2, 3)}
    counts = E.compile_counts()
    ev0 = engine.metrics()["stats"].get("evictions", 0)
    # pool 0 (RTN layout, capacity 2) holds ft-rtn; ft-rtn2 fills it; ft-rtn3 evicts ft-rtn
    assert engine.load("ft-rtn2", more["ft-rtn2"])["resident"]
    info = engine.load("ft-rtn3", more["ft-rtn3"])
    assert info["resident"] and info["pool"] == 0
    pool0 = engine.metrics()["pools"][0]
    assert pool0["resident"] == ["ft-rtn2", "ft-rtn3"], pool0
    assert engine.metrics()["stats"]["evictions"] == ev0 + 1
    # a request for the evicted one brings it back (evicting the LRU idle ft-rtn2)
    pairs = [(p, m) for p in PROMPTS[:2] for m in ["ft-rtn", "ft-rtn3", "ft-rtn2", "ft-bd"]]
    outs = engine.generate([p for p, _ in pairs], model=[m for _, m in pairs], max_tokens=N)
    for (p, m), o in zip(pairs, outs):
        ref = reference(setup, m, p, comp=more.get(m))[0]
        assert o.token_ids == ref, (m, p)
    assert engine.metrics()["stats"]["evictions"] >= ev0 + 2
    assert reference(setup, "ft-rtn3", PROMPTS[0], comp=more["ft-rtn3"]) != \
        reference(setup, "ft-rtn", PROMPTS[0])
    # unload / reload
    engine.unload("ft-bd")
    with pytest.raises(E.UnknownModelError):
        engine.submit("w1", model="ft-bd")
    with pytest.raises(E.UnknownModelError):
        engine.unload("ft-bd")
    engine.load("ft-bd", comps["ft-bd"])
    with pytest.raises(E.FineTuneError, match="already loaded"):
        engine.load("ft-bd", comps["ft-bd"])
    o = engine.generate([PROMPTS[1]], model="ft-bd", max_tokens=N)[0]
    assert o.token_ids == reference(setup, "ft-bd", PROMPTS[1])[0]
    for m in more:
        engine.unload(m)
    assert E.compile_counts() == counts, "loading, evicting or unloading recompiled a step"
    assert "ft-rtn2" not in engine.models() and "ft-bd" in engine.models()


def test_load_from_disk_and_wrong_base_refused(setup, engine, tmp_path):
    cfg, base, tok, comps = setup
    other = tiny_model(seed=1)[1]
    p_ok = delta_ckpt.save_delta(comps["ft-lr"], tmp_path / "ok", cfg=cfg, base_params=base)
    p_bad = delta_ckpt.save_delta(comps["ft-lr"], tmp_path / "bad", cfg=cfg, base_params=other)
    with pytest.raises(E.FineTuneError, match="different base") as e:
        engine.load("wrong", p_bad)
    assert e.value.param == "lora_path" and "wrong" not in engine.models()
    with pytest.raises(E.FineTuneError, match="not a directory"):
        engine.load("missing", tmp_path / "nope")
    engine.load("ft-lr-disk", p_ok)
    o = engine.generate([PROMPTS[2]], model="ft-lr-disk", max_tokens=N)[0]
    assert o.token_ids == reference(setup, "ft-lr", PROMPTS[2])[0]
    engine.unload("ft-lr-disk")


def test_seeded_sampling_reproducible_and_batch_independent(setup, engine):
    kw = dict(model="ft-lr", max_tokens=N, temperature=0.9, top_p=0.95, top_k=50)
    for seed in (7, 8):
        alone = engine.generate([PROMPTS[3]], seed=seed, **kw)[0].token_ids
        # the same request in a full, mixed batch (more requests than slots, other seeds)
        others = [dict(model=m, temperature=1.0, seed=100 + i, max_tokens=N)
                  for i, m in enumerate(MODELS * 2)]
        reqs = [engine.submit(PROMPTS[i % 4], **o) for i, o in enumerate(others[:3])]
        mine = engine.submit(PROMPTS[3], seed=seed, **kw)
        reqs += [engine.submit(PROMPTS[i % 4], **o) for i, o in enumerate(others[3:])]
        assert mine.result().token_ids == alone, f"seed {seed}: batch changed the sample"
        for r in reqs:
            r.result()
    a = engine.generate([PROMPTS[3]] * 2, seed=7, **kw)
    assert a[0].token_ids == a[1].token_ids, "seed 7: not reproducible"
    b = engine.generate([PROMPTS[3]], seed=8, **kw)[0]
    c = engine.generate([PROMPTS[3]], seed=7, choice=1, **kw)[0]
    g = reference(setup, "ft-lr", PROMPTS[3])[0]
    assert len({tuple(a[0].token_ids), tuple(b.token_ids), tuple(c.token_ids), tuple(g)}) == 4


def test_sample_rows_rules():
    rng = jax.random.PRNGKey(3)
    logits = jax.random.normal(rng, (64, 50)) * 3
    keys = jax.random.split(jax.random.PRNGKey(4), 64)
    one = np.ones(64, np.float32)
    f = jax.jit(E.sample_rows)
    am = np.asarray(logits.argmax(-1))
    np.testing.assert_array_equal(f(logits, keys, one * 0, one.astype(int) * 5, one), am)
    np.testing.assert_array_equal(f(logits, keys, one * 2, one.astype(int), one), am)  # top_k=1
    np.testing.assert_array_equal(f(logits, keys, one, one.astype(int) * 0, one * 1e-6), am)
    # nucleus: probabilities .5 .3 .15 .05, top_p=0.7 keeps the first two, in ratio 5:3
    n = 4000
    lg = np.log(np.tile([[0.05, 0.5, 0.15, 0.3]], (n, 1))).astype(np.float32)
    ks = jax.random.split(jax.random.PRNGKey(0), n)
    d = np.asarray(f(lg, ks, np.ones(n, np.float32), np.zeros(n, int),
                     np.full(n, 0.7, np.float32)))
    assert set(d.tolist()) == {1, 3} and abs((d == 1).mean() - 0.5 / 0.8) < 0.04
    d = np.asarray(f(lg, ks, np.ones(n, np.float32), np.full(n, 3), np.ones(n, np.float32)))
    assert set(d.tolist()) == {1, 2, 3}  # top_k=3 drops the least likely
    np.testing.assert_array_equal(E.seed_key(5), np.asarray(jax.random.PRNGKey(5)))
    np.testing.assert_array_equal(E.seed_key(2**40 + 3), [256, 3])


def test_bad_requests_are_refused_and_cancel_frees_the_slot(setup, engine):
    with pytest.raises(E.UnknownModelError) as e:
        engine.submit("w1", model="nope")
    assert e.value.status == 404 and e.value.param == "model"
    with pytest.raises(E.ContextLengthError, match="64"):
        engine.submit(" ".join(["w1"] * 64))
    with pytest.raises(E.ContextLengthError, match="64"):
        engine.submit("w1 w2", max_tokens=63)
    for kw, param in [(dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"),
                      (dict(top_p=1.5), "top_p"), (dict(max_tokens=0), "max_tokens"),
                      (dict(top_k=-2), "top_k"), (dict(seed=-1), "seed"),
                      (dict(stop=[1]), "stop"), (dict(stop_token_ids=[10**6]), "stop_token_ids"),
                      (dict(temperature="hot"), "temperature")]:
        with pytest.raises(E.InvalidRequestError) as e:
            engine.submit("w1", **kw)
        assert e.value.param == param and e.value.status == 400, kw
    with pytest.raises(E.InvalidRequestError, match="empty"):
        engine.submit("")
    with pytest.raises(E.InvalidRequestError, match="vocabulary"):
        engine.submit([1, 2, CFG.vocab_size])
    old = engine.max_queue
    engine.max_queue = 1
    try:
        first = engine.submit("w1", max_tokens=2)
        with pytest.raises(E.QueueFullError) as e:
            engine.submit("w2", max_tokens=2)
        assert e.value.status == 429
    finally:
        engine.max_queue = old
    assert first.result().completion_tokens == 2
    # cancel: a long request stops, frees its slot, and the engine keeps serving
    r = engine.submit("w1", max_tokens=60, ignore_eos=True)
    for i, _ in enumerate(r.events()):
        if i == 2:
            r.cancel()
    assert r.result().finish_reason == "cancelled" and r.result().completion_tokens < 60
    assert engine.metrics()["active_slots"] == 0
    o = engine.generate([PROMPTS[0]], model="ft-bd", max_tokens=N)[0]
    assert o.token_ids == reference(setup, "ft-bd", PROMPTS[0])[0]


def test_prefill_interleaves_with_decoding(setup, engine):
    """While slots decode, at most `prefills_per_step` waiting requests are prefilled per
    decode call: the running stream gets `decode_steps` tokens at every call."""
    assert engine.prefills_per_step == 1 and not engine.running
    long = engine.submit(PROMPTS[0], model="ft-rtn", max_tokens=40, ignore_eos=True)
    engine.step()  # nothing was decoding: prefill, then one decode step
    n0 = len(long.output_ids)
    pre0 = engine.metrics()["stats"]["prefills"]
    others = [engine.submit(p, model=m, max_tokens=4)
              for p, m in zip(PROMPTS[1:3], ["base", "ft-lr"])]
    for k in (1, 2):
        engine.step()
        assert engine.metrics()["stats"]["prefills"] == pre0 + k
        assert len(long.output_ids) == n0 + k * engine.decode_steps, \
            "the running stream stalled during a prefill"
    for r, (p, m) in zip(others, zip(PROMPTS[1:3], ["base", "ft-lr"])):
        got = r.result().token_ids
        assert got == reference(setup, m, p)[0][:len(got)] and len(got) in range(1, 5), (m, p)
    assert long.result().completion_tokens == 40


def test_background_thread_serves_concurrent_submitters(setup, engine):
    engine.start()
    try:
        pairs = [(PROMPTS[i % 4], MODELS[(i // 4) % 4]) for i in range(16)]
        out = [None] * len(pairs)

        def client(i):
            p, m = pairs[i]
            out[i] = engine.submit(p, model=m, max_tokens=N).result(timeout=120)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(pairs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(150)
        assert not any(t.is_alive() for t in threads)
        for (p, m), o in zip(pairs, out):
            assert o.token_ids == reference(setup, m, p)[0], (m, p)
        with pytest.raises(RuntimeError, match="background thread"):
            engine.step()
    finally:
        engine.stop()
    assert not engine.running


@pytest.mark.slow
def test_tied_embedding_delta_per_row():
    """Tied embeddings: a kept embedding delta changes both the input rows and the output head."""
    cfg = M.ModelConfig(vocab_size=CFG.vocab_size, hidden_size=64, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=16, tie_word_embeddings=True)
    _, base = tiny_model(cfg, seed=3)
    tok = tiny_tokenizer()
    ft = finetune(base, 301, big=0.5)
    rules = (Rule(PROJ_PATTERN, RTN(bits=4, group=32)), Rule("embed_tokens", Keep()),
             Rule(".", None))
    comp = delta.compress(base, ft, rules, progress=False)
    eng = E.Engine(base, cfg, tok, deltas={"tied": comp}, slots=2, max_len=32,
                   prefill_buckets=(16, 32))
    proj = {n: lf for n, lf in comp.items() if n != "embed_tokens.weight"}
    want, want_proj, want_base = [], [], []
    for p in PROMPTS[:3]:
        for params, acc in [(delta.attach(base, comp), want), (delta.merge(base, proj),
                                                               want_proj), (base, want_base)]:
            r = G.generate(params, cfg, tok, [p], max_new_tokens=8)
            acc.append([int(t) for t in r["tokens"][0][:int(r["lengths"][0])]])
    got = eng.generate(PROMPTS[:3] * 2, model=["tied"] * 3 + ["base"] * 3, max_tokens=8)
    assert [o.token_ids for o in got[:3]] == want
    assert [o.token_ids for o in got[3:]] == want_base
    assert want != want_proj and want != want_base


def test_decode_steps_per_call_do_not_change_outputs(setup):
    """One token per device call, read at once, or three per call read one call late
    (lookahead): the same greedy answers, fewer host round trips."""
    cfg, base, tok, comps = setup
    pairs = [(PROMPTS[0], "ft-rtn"), (PROMPTS[1], "base"), (PROMPTS[2], "ft-bd")]
    calls = {}
    for k, ahead in ((1, False), (3, True)):
        eng = E.Engine(base, cfg, tok, deltas={m: comps[m] for _, m in pairs if m != "base"},
                       slots=2, max_len=64, prefill_buckets=(16, 64), seed=0, decode_steps=k,
                       lookahead=ahead)
        outs = eng.generate([p for p, _ in pairs], model=[m for _, m in pairs], max_tokens=N)
        for (p, m), o in zip(pairs, outs):
            assert o.token_ids == reference(setup, m, p)[0], (k, m, p)
        calls[k] = eng.metrics()["stats"]["decode_calls"]
    assert calls[3] < calls[1], calls
