"""Evaluation: perplexity, GSM8K accuracy, logit KL and quality reports of compressed deltas.

Building blocks (all batched with fixed shapes and jitted, so nothing recompiles per example or
per method: dense merged params of any method share one compiled forward):

* `perplexity` / `token_nll`: next-token NLL over token windows;
* `nll_kl`: perplexity and per-token KL(fine-tune ‖ compressed) in one pass (the fine-tune's
  log-probabilities cached once by `reference_logprobs`);
* `gsm8k_accuracy`: greedy generation through `generate.generate_tokens` (prompts in the
  fine-tune's `data.format_gsm8k` format, one padded length, the last batch filled up),
  `extract_answer` (robust to '####', commas, '$', trailing '.', 'The answer is', last-number
  fallback) and exact match with a binomial standard error;
* `output_errors`: layer-output error of compressed projections;
* `Evaluator` (the harness behind `scripts/eval.py`): base and fine-tune evaluated once, then
  every compressed delta; `gain_kept` = (m_compressed − m_base) / (m_ft − m_base);
  `write_report` writes JSON and a markdown table.

Protocol followed: GSM8K exact match on the number after '####' with greedy decoding, as in
Delta-CoMe's WizardMath evaluation (../shared/METHODS.md §1.3); we differ in prompt (the plain
Question/Answer format our fine-tune was trained on) and scale (a held-out slice of GSM8K train,
since the fine-tune saw the rest of it).
"""

from __future__ import annotations

import decimal
import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from deltajax import model as M
from deltajax import tree as T
from deltajax.eval.metrics import (
    GAIN_METRICS,
    gain_kept,  # noqa: F401  (re-exported: harness is the eval API)
    metric_gain_kept,
    nll_kl,
    perplexity,
    reference_logprobs,
)
from deltajax.progress import bar as tqdm  # process 0 only

# =============================================================================================
# Quality evaluation harness (issue 8): GSM8K accuracy, logit KL, reports.
# =============================================================================================

_NUMBER = re.compile(r"-?\$?\s?\d[\d,]*(?:\.\d+)?")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:|=)\s*:?\s*", re.IGNORECASE)


def normalize_number(s: str | None) -> str | None:
    """Canonical text of a number ('$1,234.50.' -> '1234.5', '-3.0' -> '-3'), None if none.

    Drops `$`, thousands commas, spaces, a trailing '.' and a trailing '%'; integral values lose
    their decimals, others their trailing zeros.
    """
    if s is None:
        return None
    t = s.strip().replace("$", "").replace(",", "").replace(" ", "").rstrip(".%")
    if t.startswith("+"):
        t = t[1:]
    try:
        d = decimal.Decimal(t)
    except decimal.InvalidOperation:
        return None
    if not d.is_finite():
        return None
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def _first_number(s: str) -> str | None:
    m = _NUMBER.search(s)
    return normalize_number(m.group(0)) if m else None


def extract_answer(text: str) -> str | None:
    """The final numeric answer of a GSM8K-style completion, normalized (None if no number).

    In order: the first number after the first '####' (the GSM8K format the fine-tune learnt);
    after the last 'The answer is' / 'answer:'; inside the last \\boxed{...}; else the last
    number in the text.
    """
    if "####" in text:
        got = _first_number(text.split("####", 1)[1].split("\n", 1)[0])
        if got is not None:
            return got
    hits = list(_ANSWER_IS.finditer(text))
    if hits:
        got = _first_number(text[hits[-1].end():][:40])
        if got is not None:
            return got
    boxed = re.findall(r"\\boxed\{([^}]*)\}", text)
    if boxed:
        got = _first_number(boxed[-1])
        if got is not None:
            return got
    nums = _NUMBER.findall(text)
    return normalize_number(nums[-1]) if nums else None


def reference_answer(answer: str) -> str:
    """The normalized reference number of a GSM8K `answer` field (after '####')."""
    if "####" not in answer:
        raise ValueError(f"GSM8K answer has no '####': {answer[-80:]!r}")
    got = _first_number(answer.split("####", 1)[1])
    if got is None:
        raise ValueError(f"no number after '####' in GSM8K answer: {answer[-80:]!r}")
    return got


def answers_match(pred: str | None, ref: str) -> bool:
    """Exact match of normalized numbers (numerically: '5' == '5.00')."""
    if pred is None:
        return False
    try:
        return decimal.Decimal(pred) == decimal.Decimal(ref)
    except decimal.InvalidOperation:
        return pred == ref


def binomial_stderr(p: float, n: int) -> float:
    """Standard error sqrt(p(1−p)/n) of an accuracy over n problems."""
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n > 0 else float("nan")


def score_gsm8k(texts: Sequence[str], references: Sequence[str]) -> dict:
    """Exact-match accuracy of completions against normalized reference numbers."""
    if len(texts) != len(references):
        raise ValueError(f"{len(texts)} completions for {len(references)} references")
    preds = [extract_answer(t) for t in texts]
    correct = [answers_match(p, r) for p, r in zip(preds, references)]
    n = len(correct)
    acc = sum(correct) / n if n else float("nan")
    return {"accuracy": acc, "stderr": binomial_stderr(acc, n), "n": n,
            "num_correct": int(sum(correct)), "predictions": preds, "correct": correct}


def blank_line_stop_ids(tokenizer) -> list[int]:
    """Ids of vocabulary tokens made only of 2+ newlines (a blank line: end of a GSM8K answer)."""
    out = []
    for tok_str, i in tokenizer.get_vocab().items():
        s = tokenizer.convert_tokens_to_string([tok_str])
        if len(s) >= 2 and set(s) == {"\n"}:
            out.append(int(i))
    return sorted(out)


def encode_fixed(tokenizer, prompts: Sequence[str], *, length: int | None = None,
                 multiple: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded (n, L) ids and mask, prompts tokenized as in training (no special tokens).

    L = `length`, else the longest prompt rounded up to `multiple`, so that every batch cut from
    these arrays has the same shape (one compile).
    """
    if not prompts:
        raise ValueError("no prompts given")
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    empty = [i for i, x in enumerate(ids) if not x]
    if empty:
        raise ValueError(f"prompts {empty} tokenize to no tokens")
    longest = max(len(x) for x in ids)
    t = -(-longest // multiple) * multiple if length is None else int(length)
    if t < longest:
        raise ValueError(f"length={t} is shorter than the longest prompt ({longest} tokens)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    toks = np.full((len(ids), t), pad, np.int32)
    mask = np.zeros((len(ids), t), bool)
    for r, x in enumerate(ids):
        toks[r, t - len(x):] = x
        mask[r, t - len(x):] = True
    return toks, mask


def generate_texts(
    params, cfg: M.ModelConfig, tokenizer, prompts: Sequence[str], *, batch_size: int = 32,
    max_new_tokens: int = 256, stop_ids: Iterable[int] | None = None, progress: bool = True,
    desc: str = "generate",
) -> dict:
    """Greedy continuations of `prompts`, batched with fixed shapes (one compile for all batches).

    Prompts share one padded length; the last batch is filled with copies of the first prompt
    (their outputs are dropped), so every call of `generate.generate_tokens` has the same
    shapes. A tqdm bar counts examples done, with ETA. Returns "texts", "lengths", "seconds"
    (compile excluded), "compile_seconds", "tokens" (generated, stop tokens included).
    """
    from deltajax.serve import generate as G

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    stops = G.default_stop_ids(tokenizer) if stop_ids is None else sorted({int(s)
                                                                          for s in stop_ids})
    toks, mask = encode_fixed(tokenizer, prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
        stops[0] if stops else 0)
    n = len(prompts)
    texts, lengths, secs, comp = [], [], 0.0, 0.0
    bar = tqdm(total=n, desc=desc, disable=not progress, unit="ex", leave=False)
    for s in range(0, n, batch_size):
        tb, mb = toks[s:s + batch_size], mask[s:s + batch_size]
        real = tb.shape[0]
        if real < batch_size:
            tb = np.concatenate([tb, np.repeat(toks[:1], batch_size - real, 0)])
            mb = np.concatenate([mb, np.repeat(mask[:1], batch_size - real, 0)])
        res = G.generate_tokens(params, cfg, tb, mb, max_new_tokens=max_new_tokens,
                                stop_ids=stops, pad_id=pad)
        texts += G.decode_rows(tokenizer, res["tokens"][:real], res["lengths"][:real], stops)
        lengths += [int(x) for x in res["lengths"][:real]]
        secs += res["seconds"]
        comp += res["compile_seconds"]
        bar.update(real)
    bar.close()
    return {"texts": texts, "lengths": lengths, "seconds": secs, "compile_seconds": comp,
            "tokens": int(sum(lengths))}


def gsm8k_accuracy(
    params, cfg: M.ModelConfig, tokenizer, examples: Sequence[Mapping], *, batch_size: int = 32,
    max_new_tokens: int = 256, stop_ids: Iterable[int] | None = None, progress: bool = True,
    desc: str = "gsm8k",
) -> dict:
    """Greedy GSM8K exact-match accuracy (prompts in the fine-tune's `data.format_gsm8k` format).

    Returns `score_gsm8k`'s dict (accuracy, binomial stderr, per-problem predictions) plus the
    completions and generation timings.
    """
    from deltajax import data as D

    if not examples:
        raise ValueError("no GSM8K examples given")
    prompts = [D.format_gsm8k(e)[0] for e in examples]
    refs = [reference_answer(e["answer"]) for e in examples]
    gen = generate_texts(params, cfg, tokenizer, prompts, batch_size=batch_size,
                         max_new_tokens=max_new_tokens, stop_ids=stop_ids, progress=progress,
                         desc=desc)
    out = score_gsm8k(gen["texts"], refs)
    out.update(texts=gen["texts"], references=refs, gen_seconds=gen["seconds"],
               gen_tokens=gen["tokens"], compile_seconds=gen["compile_seconds"])
    return out


# --------------------------------------------------------------------------------- logit KL


class Evaluator:
    """Evaluates a base, its fine-tune, and any number of compressed deltas on the same data.

    The fine-tune's log-probabilities on the domain windows are computed once (for the KL), base
    and fine-tune metrics once (`base_metrics`, `ft_metrics`); every compressed delta is merged
    into dense params, so all rows share the compiled forward and generation loop.

    Args:
      base, ft: params of the base and the fine-tune (same config).
      cfg: the model config.
      tokenizer: the models' tokenizer.
      wiki_tokens: (n, L) general-text windows (WikiText-2).
      domain_tokens: (n, L) held-out windows of the fine-tune's domain (perplexity and KL).
      gsm8k_examples: held-out GSM8K problems for greedy accuracy (empty: skipped).
      batch_size: windows per perplexity / KL batch.
      gen_batch: prompts per generation batch.
      max_new_tokens: generated tokens at most per problem.
      stop_ids: generation stop tokens (default: the tokenizer's eos / end-of-turn tokens).
      progress: show progress bars.
      log: printer for one-line summaries.
    """

    def __init__(self, base, ft, cfg: M.ModelConfig, tokenizer, *, wiki_tokens: np.ndarray,
                 domain_tokens: np.ndarray, gsm8k_examples: Sequence[Mapping] = (),
                 batch_size: int = 4, gen_batch: int = 32, max_new_tokens: int = 256,
                 stop_ids: Iterable[int] | None = None, progress: bool = True, log=print):
        from deltajax import delta

        delta.check_pair(base, ft)
        self.base, self.ft, self.cfg, self.tok = base, ft, cfg, tokenizer
        self.wiki_tokens = np.asarray(wiki_tokens, np.int32)
        self.domain_tokens = np.asarray(domain_tokens, np.int32)
        self.examples = list(gsm8k_examples)
        self.batch_size, self.gen_batch, self.max_new_tokens = batch_size, gen_batch, max_new_tokens
        self.stop_ids = None if stop_ids is None else sorted({int(s) for s in stop_ids})
        self.progress, self.log = progress, log
        self.ref_logprobs = reference_logprobs(ft, cfg, self.domain_tokens, batch_size=batch_size)
        self.base_metrics = self.evaluate(base, "base")
        self.ft_metrics = self.evaluate(ft, "fine-tune")

    def evaluate(self, params, label: str = "") -> dict:
        """WikiText-2 ppl, domain ppl, KL to the fine-tune and GSM8K accuracy of dense params."""
        t0 = time.perf_counter()
        wiki = perplexity(params, self.cfg, self.wiki_tokens, batch_size=self.batch_size,
                          progress=False)
        dom = nll_kl(params, self.cfg, self.domain_tokens, ref_logprobs=self.ref_logprobs,
                     batch_size=self.batch_size)
        out = {"wikitext2_ppl": wiki["ppl"], "domain_ppl": dom["ppl"], "kl": dom["kl"],
               "kl_max": dom["kl_max"], "ppl_seconds": wiki["seconds"] + dom["seconds"]}
        if self.examples:
            g = gsm8k_accuracy(params, self.cfg, self.tok, self.examples,
                               batch_size=self.gen_batch, max_new_tokens=self.max_new_tokens,
                               stop_ids=self.stop_ids, progress=self.progress,
                               desc=f"gsm8k {label}"[:40])
            out.update(gsm8k_acc=g["accuracy"], gsm8k_stderr=g["stderr"], gsm8k_n=g["n"],
                       gsm8k_correct=[bool(c) for c in g["correct"]],
                       gsm8k_predictions=g["predictions"], gsm8k_gen_tokens=g["gen_tokens"],
                       gsm8k_seconds=g["gen_seconds"], gsm8k_example=g["texts"][0])
        out["seconds"] = time.perf_counter() - t0
        acc = (f", GSM8K {100 * out['gsm8k_acc']:.1f}% ± {100 * out['gsm8k_stderr']:.1f}"
               if self.examples else "")
        self.log(f"[eval] {label}: WikiText-2 ppl {out['wikitext2_ppl']:.3f}, domain ppl "
                 f"{out['domain_ppl']:.3f}, KL {out['kl']:.4f}{acc} ({out['seconds']:.0f} s)")
        return out

    def gains(self, m: Mapping) -> dict:
        """`gain_kept` of each metric against the base and the fine-tune (KL: 1 − KL/KL_base);
        NaN where the fine-tune moves the metric less than `metrics.GAIN_MIN_CHANGE`."""
        b, f = self.base_metrics, self.ft_metrics
        return {k: metric_gain_kept(k, m[k], b[k], f[k]) for k in GAIN_METRICS
                if k in m and k in b}

    def evaluate_compressed(self, label: str, compressed: Mapping, deltas=None, *,
                            accounting: Mapping | None = None, extra: Mapping | None = None,
                            ) -> dict:
        """A result row for a compressed delta: accounting, per-matrix errors, metrics, gains."""
        from deltajax import accounting as A
        from deltajax import delta

        if deltas is None:
            deltas = delta.extract(self.base, self.ft)
        if accounting is None:
            shapes = {n: tuple(x.shape) for n, x in T.flatten(self.base).items()}
            accounting = A.account(compressed, shapes)
        proj = {n: leaf for n, leaf in compressed.items() if leaf.method.on_the_fly}
        rel = delta.relative_errors(deltas, proj)
        methods = sorted({leaf.method.name for leaf in proj.values()})
        alloc = {}
        for leaf in proj.values():
            if hasattr(leaf.method, "allocation"):
                alloc[f"{leaf.shape[0]}x{leaf.shape[1]}"] = [list(b) for b in
                                                            leaf.method.allocation(*leaf.shape)]
        metrics = self.evaluate(delta.merge(self.base, compressed), label)
        row = {
            "label": label,
            "methods": methods,
            "method_config": next(iter(proj.values())).method.to_config() if proj else None,
            "linear_ratio": accounting["linear_ratio"],
            "whole_ratio": accounting["total_ratio"],
            "bits_per_param": accounting["linear_bits_per_param"],
            "linear_bytes": accounting["linear_bytes"],
            "total_bytes": accounting["total_bytes"],
            "rel_error": float(np.mean(list(rel.values()))) if rel else float("nan"),
            "rel_error_by_type": delta.errors_by_type(rel),
            "rel_error_per_matrix": rel,
            "band_allocation": alloc,
            "metrics": metrics,
            "gain_kept": self.gains(metrics),
        }
        row.update(dict(extra or {}))
        return row


def run_sweep(ev: Evaluator, rows: Sequence, *, registry=None, defaults: Mapping | None = None,
              only: Sequence[str] = (), log=print, on_row=None,
              deadline: float | None = None) -> tuple[list[dict], list[dict]]:
    """Compress the fine-tune's delta with each row's method on the fly and evaluate it.

    Args:
      ev: the evaluator (holds base, fine-tune, tokenizer, data).
      rows: (label, method dict, options) entries (options: target, calib_windows,
        calib_seq_len, keep_other, distill_steps, seed, ...; see configs/eval_sweep.py).
      registry: method registry (default `deltajax.methods.REGISTRY`); rows whose method is not
        registered are skipped with a notice.
      defaults: compression options applied under each row's own options.
      only: keep only rows whose label starts with one of these.
      log: printer.
      on_row: called with each finished result row (e.g. to save partial results).
      deadline: `time.time()` after which no new row is started (the rest are skipped).

    Returns:
      (result rows, skipped rows with their reasons). A row whose compression or evaluation
      raises is skipped with the error, the sweep goes on.
    """
    import traceback

    from deltajax import delta
    from deltajax.methods import REGISTRY

    registry = REGISTRY if registry is None else registry
    deltas = delta.extract(ev.base, ev.ft)
    results, skipped = [], []
    for entry in rows:
        if len(entry) not in (2, 3):
            raise ValueError(f"sweep row must be (label, method dict[, options]), got {entry!r}")
        label, mcfg = entry[0], dict(entry[1])
        opts = {**dict(defaults or {}), **(dict(entry[2]) if len(entry) == 3 else {})}
        if only and not any(label.startswith(o) for o in only):
            continue
        if deadline is not None and time.time() > deadline:
            log(f"[sweep] SKIP {label}: time budget spent")
            skipped.append({"label": label, "reason": "time budget spent (not run)"})
            continue
        if mcfg.get("name") not in registry:
            log(f"[sweep] SKIP {label}: method {mcfg.get('name')!r} is not registered "
                f"(registered: {sorted(registry)})")
            skipped.append({"label": label, "reason": f"method {mcfg.get('name')!r} not "
                            "registered"})
            continue
        target = opts.pop("target", None)
        config = {"method": mcfg, "keep_other": True, "seed": 0, "calib_batch_size": 8, **opts}
        t0 = time.perf_counter()
        try:
            comp = delta.compress(ev.base, ev.ft, config, cfg=ev.cfg, tokenizer=ev.tok,
                                  progress=False)
            t_comp = time.perf_counter() - t0
            row = ev.evaluate_compressed(label, comp, deltas,
                                         extra={"target": target, "compress_seconds": t_comp,
                                                "options": opts})
        except Exception as e:  # a broken method must not kill the sweep
            log(f"[sweep] SKIP {label}: {type(e).__name__}: {e}")
            log("".join(traceback.format_exception(e)[-3:]))
            skipped.append({"label": label, "reason": f"{type(e).__name__}: {str(e)[:300]}"})
            continue
        log(f"[sweep] {label}: linear {row['linear_ratio']:.2f}x, whole {row['whole_ratio']:.2f}x,"
            f" rel. error {row['rel_error']:.3f}, compress {t_comp:.0f} s")
        results.append(row)
        if on_row is not None:
            on_row(row)
    return results, skipped


# ------------------------------------------------------------------------------------ reports


def _fmt(x, spec=".3f", pct=False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{100 * x:{spec}}%" if pct else f"{x:{spec}}"


def accuracy_gain_significant(base: Mapping, ft: Mapping, z: float = 2.0) -> bool:
    """Whether the fine-tune's GSM8K gain exceeds z combined binomial standard errors."""
    d = ft["gsm8k_acc"] - base["gsm8k_acc"]
    return abs(d) > z * math.hypot(base["gsm8k_stderr"], ft["gsm8k_stderr"])


def markdown_table(report: Mapping) -> str:
    """The results table: ratios, errors, every metric and the fraction of the gain kept.

    The accuracy gain kept is shown only when the fine-tune's accuracy gain over the base is
    significant (> 2 combined standard errors), else "n.s.": a ratio of two noise-level
    differences means nothing. Any gain kept is "n/a" where the fine-tune moves the metric less
    than `metrics.GAIN_MIN_CHANGE` (1 % of the base's perplexity, 1 accuracy point); the gains
    are computed here from the metrics, so older reports are shown the same way.
    """
    has_acc = "gsm8k_acc" in report["base"]
    head = ["method", "target", "linear ratio", "whole ratio", "bits/param", "rel. error",
            "WikiText-2 ppl", "domain ppl", "KL to FT"]
    if has_acc:
        head += ["GSM8K acc (± s.e.)", "gain kept (acc)"]
    head += ["gain kept (domain ppl)"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]

    acc_sig = has_acc and accuracy_gain_significant(report["base"], report["finetune"])

    def gain(m, k):
        b, f = report["base"], report["finetune"]
        if not all(k in x and x[k] is not None for x in (m, b, f)):
            return "n/a"
        g = metric_gain_kept(k, m[k], b[k], f[k])
        return "n/a" if not math.isfinite(g) else _fmt(g, ".0f" if k == "gsm8k_acc" else ".1f",
                                                          pct=True)

    def metric_cells(m):
        c = [_fmt(m["wikitext2_ppl"]), _fmt(m["domain_ppl"]), _fmt(m["kl"], ".3g")]
        if has_acc:
            c += [f"{100 * m['gsm8k_acc']:.1f}% ± {100 * m['gsm8k_stderr']:.1f}",
                  gain(m, "gsm8k_acc") if acc_sig else "n.s."]
        c += [gain(m, "domain_ppl")]
        return c

    for name, m in (("base", report["base"]), ("fine-tune", report["finetune"])):
        lines.append("| " + " | ".join([f"**{name}**", "–", "–", "–", "–", "–"]
                                        + metric_cells(m)) + " |")
    for r in report["rows"]:
        cells = [r["label"], str(r.get("target") or "–"), f"{r['linear_ratio']:.1f}x",
                 f"{r['whole_ratio']:.2f}x", f"{r['bits_per_param']:.3f}",
                 _fmt(r["rel_error"])]
        lines.append("| " + " | ".join(cells + metric_cells(r["metrics"]))
                     + " |")
    return "\n".join(lines)


def _jsonable(x):
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.generic,)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_report(report: Mapping, md_path, json_path=None, *, header: Sequence[str] = (),
                 footer: Sequence[str] = ()) -> str:
    """Write `report` (base, finetune, rows, skipped, meta) as markdown (+ JSON); returns the md.

    NaN / inf become null in the JSON. `header` / `footer` lines frame the table.
    """
    import json
    from pathlib import Path

    for k in ("base", "finetune", "rows"):
        if k not in report:
            raise ValueError(f"report is missing {k!r}")
    lines = list(header) + ["", markdown_table(report), ""]
    if report.get("skipped"):
        lines += ["Skipped rows:", ""]
        lines += [f"- {s['label']}: {s['reason']}" for s in report["skipped"]]
        lines += [""]
    lines += list(footer)
    text = "\n".join(lines).rstrip() + "\n"
    Path(md_path).parent.mkdir(parents=True, exist_ok=True)
    if json_path is not None:
        write_text_atomic(json_path, json.dumps(_jsonable(report), indent=1, allow_nan=False))
    write_text_atomic(md_path, text)
    return text


def write_text_atomic(path, text: str) -> None:
    """Write a file through a sibling temporary file and one rename (never half a report)."""
    import os
    import tempfile
    from pathlib import Path

    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def delta_spectra(deltas, *, pattern: str = r"(\w+_proj)\.weight$") -> dict[str, np.ndarray]:
    """Singular values of every projection delta, grouped by type: {type: (layers, r) array}."""
    from deltajax.tree import flatten

    out: dict[str, list] = {}
    for name, d in flatten(deltas).items():
        m = re.search(pattern, name)
        if m is None:
            continue
        out.setdefault(m.group(1), []).append(np.asarray(_svals(d)))
    return {k: np.stack(v) for k, v in out.items()}


@jax.jit
def _svals(d):
    return jnp.linalg.svd(d.astype(jnp.float32), compute_uv=False)


# ----------------------------------------------------------------------- end-to-end helpers


def load_sweep(path) -> list:
    """Rows of a sweep config file (`get_config()` returning (label, method dict, options))."""
    import importlib.util
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"sweep config not found: {p}")
    spec = importlib.util.spec_from_file_location(f"sweep_{p.stem}", p)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not hasattr(mod, "get_config"):
        raise ValueError(f"{p}: a sweep config must define get_config()")
    rows = list(mod.get_config())
    for r in rows:
        if not (isinstance(r, (tuple, list)) and len(r) in (2, 3) and isinstance(r[0], str)
                and isinstance(r[1], Mapping) and "name" in r[1]):
            raise ValueError(f"{p}: bad sweep row {r!r}: expected (label, {{'name': ...}}, "
                             "options)")
    return rows


def load_compressed(path, base, cfg) -> tuple[dict, dict]:
    """A saved compressed delta checked against `base` (clear errors for missing / wrong base)."""
    from pathlib import Path

    from deltajax.io import delta_ckpt as delta_checkpoint

    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"compressed delta not found: {p}")
    return delta_checkpoint.load_delta(p, base_params=base, cfg=cfg)


def evaluate_saved(ev: Evaluator, paths: Sequence, *, log=print) -> list[dict]:
    """Result rows for saved compressed deltas (`scripts/compress.py --out=...`)."""
    from deltajax import delta

    deltas = delta.extract(ev.base, ev.ft)
    rows = []
    for p in paths:
        comp, meta = load_compressed(p, ev.base, ev.cfg)
        t0 = time.perf_counter()
        row = ev.evaluate_compressed(str(p), comp, deltas, accounting=meta.get("accounting"),
                                     extra={"path": str(p), "target": None})
        log(f"[eval] {p}: linear {row['linear_ratio']:.2f}x ({time.perf_counter() - t0:.0f} s)")
        rows.append(row)
    return rows
