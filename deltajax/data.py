"""Text data: locating the shared data sets, reading raw text / jsonl, and token windows.

GSM8K split used everywhere in deltajax (so anyone can rebuild it): `gsm8k_train.jsonl` in
order; the **last 500 problems are held out** (never trained on), the rest is the training set.
When `../shared/data` is absent, small samples shipped in `deltajax/assets` stand in.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

ASSETS = Path(__file__).parent / "assets"
GSM8K_HELDOUT = 500


def shared_data_dir() -> Path | None:
    """`$DELTAJAX_DATA`, else `../shared/data` next to the repository, if it exists."""
    env = os.environ.get("DELTAJAX_DATA")
    cands = [Path(env)] if env else []
    repo = Path(__file__).resolve().parent.parent
    cands += [repo.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    for c in cands:
        if c.is_dir():
            return c
    return None


def default_file(name: str) -> Path:
    """Path of a known data set: 'wikitext2', 'gsm8k_train', 'gsm8k_heldout', 'shakespeare'.

    Falls back to the shipped samples when the shared data directory is missing.
    """
    d = shared_data_dir()
    shared = {
        "wikitext2": "wikitext2_test.raw",
        "gsm8k_train": "gsm8k_train.jsonl",
        "gsm8k_heldout": "gsm8k_train.jsonl",
        "shakespeare": "tinyshakespeare.txt",
    }
    shipped = {
        "wikitext2": "shakespeare_excerpt.txt",
        "gsm8k_train": "gsm8k_sample.jsonl",
        "gsm8k_heldout": "gsm8k_heldout_sample.jsonl",
        "shakespeare": "shakespeare_excerpt.txt",
    }
    if name not in shared:
        raise ValueError(f"unknown data set {name!r}; known: {sorted(shared)}")
    if d is not None and (d / shared[name]).exists():
        return d / shared[name]
    return ASSETS / shipped[name]


def gsm8k_examples(path: str | os.PathLike, split: str = "all") -> list[dict]:
    """GSM8K problems from a jsonl file; split 'train' / 'heldout' follow the module's rule.

    The shipped samples are already one side of the split, so splitting applies only to the full
    7473-problem file (detected by size).
    """
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    for i, r in enumerate(rows):
        if "question" not in r or "answer" not in r:
            raise ValueError(f"{path}:{i + 1}: expected keys 'question' and 'answer'")
    if split == "all" or len(rows) <= 2 * GSM8K_HELDOUT:
        return rows
    if split == "train":
        return rows[:-GSM8K_HELDOUT]
    if split == "heldout":
        return rows[-GSM8K_HELDOUT:]
    raise ValueError(f"split must be 'all', 'train' or 'heldout', got {split!r}")


def format_gsm8k(ex: dict) -> tuple[str, str]:
    """(prompt, completion) for a GSM8K problem in a plain Question/Answer format."""
    return f"Question: {ex['question']}\nAnswer: ", f"{ex['answer']}"


def read_texts(path: str | os.PathLike, *, split: str = "all") -> list[str]:
    """Documents of a file: jsonl (GSM8K-style prompt+answer, or a 'text' field) or raw text."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.suffix == ".jsonl":
        first = json.loads(path.read_text().splitlines()[0])
        if "question" in first:
            return ["".join(format_gsm8k(e)) for e in gsm8k_examples(path, split)]
        texts = [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
        return texts
    return [path.read_text()]


def token_windows(
    tokenizer, texts: list[str], seq_len: int, num_windows: int | None = None, *,
    bos: bool = False,
) -> np.ndarray:
    """Concatenate tokenized texts (EOS-separated) and cut non-overlapping windows of seq_len.

    Returns int32 (n, seq_len). Raises if the text is too short for even one window.
    """
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        if eos is not None and len(texts) > 1:
            ids.append(eos)
        if num_windows is not None and len(ids) >= num_windows * seq_len:
            break
    n = len(ids) // seq_len
    if num_windows is not None:
        n = min(n, num_windows)
    if n == 0:
        raise ValueError(f"text has {len(ids)} tokens, fewer than one window of {seq_len}")
    arr = np.asarray(ids[: n * seq_len], np.int32).reshape(n, seq_len)
    if bos and tokenizer.bos_token_id is not None:
        arr[:, 0] = tokenizer.bos_token_id
    return arr


def sft_batches(
    tokenizer, examples: list[tuple[str, str]], seq_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize (prompt, completion) pairs into right-padded (n, seq_len) tokens and loss masks.

    The loss mask is 1 on completion tokens and the closing EOS, 0 on prompt and padding.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    toks = np.full((len(examples), seq_len), pad, np.int32)
    mask = np.zeros((len(examples), seq_len), np.float32)
    for i, (p, c) in enumerate(examples):
        pi = tokenizer(p, add_special_tokens=False)["input_ids"]
        ci = tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        seq = (pi + ci)[:seq_len]
        toks[i, : len(seq)] = seq
        mask[i, len(pi) : len(seq)] = 1.0
    return toks, mask


def training_sequences(
    tokenizer, path: str | os.PathLike, seq_len: int, *, loss_on_prompt: bool = False,
    max_sequences: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, loss mask) for fine-tuning: GSM8K jsonl -> SFT pairs (train); text -> windows."""
    path = Path(path)
    if path.suffix == ".jsonl" and "question" in path.read_text().split("\n", 1)[0]:
        ex = gsm8k_examples(path, "train")[:max_sequences]
        pairs = [format_gsm8k(e) for e in ex]
        if loss_on_prompt:
            pairs = [("", p + c) for p, c in pairs]
        return sft_batches(tokenizer, pairs, seq_len)
    toks = token_windows(tokenizer, read_texts(path), seq_len, max_sequences)
    return toks, np.ones_like(toks, np.float32)
