"""Evaluation harness: answer extraction, batched GSM8K accuracy, KL, reports, scripts/eval.py."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_pair import perturb, tiny_base

from deltajax import delta
from deltajax import model as M
from deltajax.eval import harness as E
from deltajax.methods import RTN
from deltajax.serve import generate as G

REPO = Path(__file__).resolve().parents[1]
WORDS = ([f"w{i}" for i in range(24)] + [str(i) for i in range(10)]
         + ["Question:", "Answer:", "####", "The", "answer", "is"])
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CFG = M.ModelConfig(vocab_size=len(SPECIALS) + len(WORDS), hidden_size=64, intermediate_size=96,
                    num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=16)


def make_tokenizer(out_dir: Path | None = None):
    """Word-level tokenizer whose vocabulary has digits, '####' and the GSM8K prompt words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIALS + WORDS)},
                                    unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="~~", cleanup=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", unk_token="<unk>")
    if out_dir is None:
        return tok
    tok.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(str(out_dir), local_files_only=True)


@pytest.fixture(scope="module")
def base():
    return tiny_base(CFG)


def _problems(n, seed=0, lengths=(2, 5)):
    rng = np.random.default_rng(seed)
    out = []
    for j in range(n):
        q = " ".join(f"w{i}" for i in rng.integers(0, 24, lengths[j % len(lengths)]))
        out.append({"question": q, "answer": f"w1 w2 #### {rng.integers(0, 10)}"})
    return out


# --------------------------------------------------------------------------------- extraction


@pytest.mark.parametrize("text,want", [
    ("so 3 + 4 = 7\n#### 7", "7"),
    ("#### $1,234.00.", "1234"),
    ("#### 1,234", "1234"),
    ("####42", "42"),
    ("#### -5", "-5"),
    ("#### 3.50", "3.5"),
    ("#### 18 dollars\n\nQuestion: next 99", "18"),
    ("She pays 5 + 6 = 11. The answer is $11.", "11"),
    ("The answer is: 2,000 apples", "2000"),
    ("so the answer is 12.\nThen 13", "12"),
    ("thus \\boxed{36}", "36"),
    ("first 3 then 4 then 25.", "25"),
    ("#### \n the total is 8", "8"),  # nothing after ####: fall back
    ("no number here", None),
    ("50% of them", "50"),
])
def test_extract_answer(text, want):
    assert E.extract_answer(text) == want


def test_reference_and_match():
    assert E.reference_answer("a\nb\n#### 1,000") == "1000"
    assert E.answers_match("5", "5") and E.answers_match("5.0", "5")
    assert not E.answers_match(None, "5") and not E.answers_match("6", "5")
    with pytest.raises(ValueError, match="####"):
        E.reference_answer("no marker 5")
    s = E.score_gsm8k(["#### 5", "the answer is 6", "7"], ["5", "6", "8"])
    assert s["num_correct"] == 2 and s["correct"] == [True, True, False]
    assert math.isclose(s["stderr"], math.sqrt(2 / 3 * 1 / 3 / 3))
    assert E.gain_kept(0.3, 0.1, 0.5) == pytest.approx(0.5)
    assert E.gain_kept(5.0, 8.0, 6.0) == pytest.approx(1.5)  # ppl: lower is better, same formula
    assert math.isnan(E.gain_kept(1.0, 2.0, 2.0))


# ------------------------------------------------------------------------------ GSM8K accuracy


@pytest.mark.slow
def test_batched_accuracy_equals_per_example_loop(base):
    from deltajax import data as D

    tok = make_tokenizer()
    params = perturb(base, jax.random.PRNGKey(3))
    ex = _problems(5)  # two prompt lengths: the shorter ones are left-padded in the batch
    # reference: one prompt at a time, no padding at all
    loop = []
    for e in ex:
        ids = tok(D.format_gsm8k(e)[0], add_special_tokens=False)["input_ids"]
        r = G.generate_tokens(params, CFG, np.asarray([ids]), max_new_tokens=6,
                              stop_ids=G.default_stop_ids(tok), pad_id=0)
        loop.append(G.decode_rows(tok, r["tokens"], r["lengths"], G.default_stop_ids(tok))[0])
    # make some references right and some wrong, so accuracy is strictly between 0 and 1
    preds = [E.extract_answer(t) for t in loop]
    assert sum(p is not None for p in preds) >= 2, loop
    for i, (e, p) in enumerate(zip(ex, preds)):
        ref = p if (p is not None and i % 2 == 0) else "123456"
        e["answer"] = f"w1 #### {ref}"
    want = [E.answers_match(p, E.reference_answer(e["answer"])) for p, e in zip(preds, ex)]
    assert 0 < sum(want) < len(want)
    got = E.gsm8k_accuracy(params, CFG, tok, ex, batch_size=2, max_new_tokens=6,
                           progress=False)  # 3 batches, the last padded
    assert got["texts"] == loop
    assert got["correct"] == want and got["accuracy"] == pytest.approx(sum(want) / 5)
    again = E.gsm8k_accuracy(params, CFG, tok, ex, batch_size=2, max_new_tokens=6,
                             progress=False)
    assert again["compile_seconds"] == 0.0  # fixed shapes: nothing recompiles


# ---------------------------------------------------------------------------------------- KL


def _np_kl(p_params, q_params, tokens):
    lp = np.asarray(jax.nn.log_softmax(M.forward_jit(p_params, jnp.asarray(tokens), CFG)
                                       .astype(jnp.float64 if jax.config.x64_enabled
                                               else jnp.float32), -1), np.float64)
    lq = np.asarray(jax.nn.log_softmax(M.forward_jit(q_params, jnp.asarray(tokens), CFG), -1),
                    np.float64)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)[:, :-1]
    return kl.mean()


def test_kl_zero_for_identical_and_matches_numpy(base):
    toks = np.asarray(jax.random.randint(jax.random.PRNGKey(5), (5, 12), 0, CFG.vocab_size))
    same = E.nll_kl(base, CFG, toks, ref_params=base, batch_size=2)
    assert abs(same["kl"]) < 1e-6
    assert same["ppl"] == pytest.approx(E.perplexity(base, CFG, toks, batch_size=2,
                                                     progress=False)["ppl"], rel=1e-5)
    ft = perturb(base, jax.random.PRNGKey(1))
    cached = E.reference_logprobs(ft, CFG, toks, batch_size=2)
    got = E.nll_kl(base, CFG, toks, ref_logprobs=cached, batch_size=2)
    direct = E.nll_kl(base, CFG, toks, ref_params=ft, batch_size=2)
    want = _np_kl(ft, base, toks)
    assert got["kl"] > 1e-3
    assert got["kl"] == pytest.approx(want, rel=1e-4)
    assert direct["kl"] == pytest.approx(want, rel=1e-4)
    assert got["tokens"] == 5 * 11
    with pytest.raises(ValueError, match="exactly one"):
        E.nll_kl(base, CFG, toks)
    with pytest.raises(ValueError, match="batches"):
        E.nll_kl(base, CFG, toks[:2], ref_logprobs=cached, batch_size=2)


# ------------------------------------------------------------------------------------ reports


def _fake_report():
    m = {"wikitext2_ppl": 10.0, "domain_ppl": 5.0, "kl": 0.0, "kl_max": 0.0, "gsm8k_acc": 0.2,
         "gsm8k_stderr": 0.04, "gsm8k_n": 100}
    b = dict(m, domain_ppl=8.0, kl=0.3, gsm8k_acc=0.05)
    row = {"label": "X α=1/16", "target": "1/16", "linear_ratio": 16.1, "whole_ratio": 3.8,
           "bits_per_param": 0.99, "rel_error": 0.5, "methods": ["x"],
           "metrics": dict(m, gsm8k_acc=0.15, kl=float("nan")),
           "gain_kept": {"gsm8k_acc": 2 / 3, "domain_ppl": float("nan")}}
    return {"meta": {"date": "d"}, "base": b, "finetune": m, "rows": [row],
            "skipped": [{"label": "Y", "reason": "method 'y' not registered"}]}


def test_write_report_json_and_markdown(tmp_path):
    rep = _fake_report()
    text = E.write_report(rep, tmp_path / "q.md", tmp_path / "q.json", header=["# T"],
                          footer=["end"])
    assert (tmp_path / "q.md").read_text() == text
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    assert len(lines) == 1 + 2 + 1  # header, base + fine-tune, one row
    assert "| X α=1/16 | 1/16 | 16.1x | 3.80x | 0.990 | 0.500 |" in text
    assert "15.0% ± 4.0 | 67%" in text and "– |" in text  # NaN shows as –
    assert "- Y: method 'y' not registered" in text and text.startswith("# T")
    back = json.loads((tmp_path / "q.json").read_text())
    assert back["rows"][0]["metrics"]["kl"] is None  # NaN -> null, valid JSON
    assert back["rows"][0]["gain_kept"]["gsm8k_acc"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="rows"):
        E.write_report({"base": {}, "finetune": {}}, tmp_path / "x.md")
    # a fine-tune gain within the noise: the accuracy gain kept is not shown
    rep["base"]["gsm8k_acc"] = 0.19
    assert "15.0% ± 4.0 | n.s. |" in E.markdown_table(rep)


def test_plots_write_pngs(tmp_path):
    from deltajax.eval import plots

    rep = _fake_report()
    rep["rows"][0]["metrics"]["kl"] = 0.01
    rep["rows"][0].update(method_config={"name": "deltacome", "ratio": 1 / 16},
                          band_allocation={"576x576": [[8, 2], [3, 32], [2, 100]]})
    spectra = {"q_proj": np.abs(np.random.default_rng(0).normal(size=(3, 20))) + 0.1}
    paths = plots.write_plots(rep, tmp_path, prefix="q", spectra=spectra)
    assert [Path(p).name for p in paths] == ["q_spectra.png", "q_error_vs_bits.png",
                                            "q_deltacome_bands.png"]
    assert all(Path(p).read_bytes()[:4] == b"\x89PNG" for p in paths)


# ------------------------------------------------------------------------------ the script


@pytest.mark.slow
def test_script_end_to_end(base, tmp_path):
    from deltajax.io import delta_ckpt as delta_checkpoint
    from deltajax.io import hf

    ft = perturb(base, jax.random.PRNGKey(7))
    bdir = hf.export_hf(base, CFG, tmp_path / "base")
    fdir = hf.export_hf(ft, CFG, tmp_path / "ft")
    make_tokenizer(bdir)
    make_tokenizer(fdir)
    comp = delta.compress(base, ft, RTN(bits=4, group=32), progress=False)
    saved = delta_checkpoint.save_delta(comp, tmp_path / "rtn4", cfg=CFG, base_params=base)
    other = perturb(base, jax.random.PRNGKey(9))
    wrong = delta_checkpoint.save_delta(comp, tmp_path / "wrong", cfg=CFG, base_params=other)
    with pytest.raises(delta_checkpoint.WrongBaseError, match="different base"):
        E.load_compressed(wrong, base, CFG)
    with pytest.raises(FileNotFoundError, match="not found"):
        E.load_compressed(tmp_path / "nope", base, CFG)
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    (data / "gsm8k_train.jsonl").write_text("".join(json.dumps(e) + "\n" for e in _problems(8)))
    (data / "wikitext2_test.raw").write_text(" ".join(f"w{i}" for i in rng.integers(0, 24, 400)))
    sweep = tmp_path / "sweep.py"
    sweep.write_text(
        "def get_config():\n"
        "    return [('RTN 2-bit', {'name': 'rtn', 'bits': 2, 'group': 32}, {'target': '1/8'}),\n"
        "            ('Missing', {'name': 'not_a_method'}, {})]\n")
    out = tmp_path / "res" / "q.md"
    r = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "eval.py"), f"--base={bdir}",
         f"--finetuned={fdir}", f"--delta={saved}", f"--sweep={sweep}", f"--out={out}",
         "--gsm8k_problems=3", "--gen_batch=2", "--max_new_tokens=4", "--wiki_windows=2",
         "--domain_windows=2", "--seq_len=16", "--batch_size=2", "--noprogress"],
        cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu", DELTAJAX_DATA=str(data),
                              PYTHONPATH=str(REPO)),
        capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "SKIP Missing" in r.stdout
    rep = json.loads(out.with_suffix(".json").read_text())
    assert [row["label"] for row in rep["rows"]] == [str(saved), "RTN 2-bit"]
    assert rep["finetune"]["kl"] == pytest.approx(0.0, abs=1e-6) and rep["base"]["kl"] > 0
    assert rep["base"]["gsm8k_n"] == 3 and len(rep["base"]["gsm8k_correct"]) == 3
    r4, r2 = rep["rows"]
    assert r4["bits_per_param"] > r2["bits_per_param"]
    assert r4["rel_error"] < r2["rel_error"] and 0 < r4["metrics"]["kl"] < r2["metrics"]["kl"]
    assert len(r4["rel_error_per_matrix"]) == 7  # one layer, seven projections
    assert rep["skipped"] == [{"label": "Missing", "reason": "method 'not_a_method' not "
                               "registered"}]
    md = out.read_text()
    assert "| RTN 2-bit | 1/8 |" in md and "fine-tune recipe" in md
    assert (out.parent / "q_spectra.png").exists() and (out.parent / "q_error_vs_bits.png").exists()


def test_gain_kept_is_na_when_the_fine_tune_barely_moves_the_metric():
    # the case of issue 18: the fine-tune moves the domain ppl by 0.01 % -> "13403 %" before
    assert math.isnan(E.metric_gain_kept("domain_ppl", 9.0, 10.0, 9.999))
    assert E.metric_gain_kept("domain_ppl", 9.5, 10.0, 9.0) == pytest.approx(0.5)  # a 10 % move
    assert math.isnan(E.metric_gain_kept("gsm8k_acc", 0.30, 0.200, 0.205))  # half a point
    assert E.metric_gain_kept("gsm8k_acc", 0.25, 0.2, 0.3) == pytest.approx(0.5)
    assert E.gain_kept(9.0, 10.0, 9.999) == pytest.approx(1000.0)  # no threshold: the raw ratio
    rep = _fake_report()
    rep["finetune"]["domain_ppl"] = rep["base"]["domain_ppl"] * (1 - 1e-4)
    rep["rows"][0]["metrics"]["domain_ppl"] = 7.0
    rows = [ln for ln in E.markdown_table(rep).splitlines() if ln.startswith("| X")]
    assert rows and rows[0].endswith("| n/a |"), rows
    assert "%" not in rows[0].rsplit("|", 2)[-2]
    rep["finetune"]["domain_ppl"] = 6.0  # a real move: base 8 -> 6, compressed 7 keeps half
    rows = [ln for ln in E.markdown_table(rep).splitlines() if ln.startswith("| X")]
    assert rows[0].endswith("| 50.0% |"), rows
