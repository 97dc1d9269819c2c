r"""Bad input and faults, tried as a careful user would: what each script does now.

  python benchmarks/bench_reliability.py                       # all cases -> reliability.md
  python benchmarks/bench_reliability.py --quick --json=/tmp/r.json --out=

Every case runs one script's ``main`` in this process (through `deltajax.cli.run`, exactly as
from the shell; the script module is imported fresh for each case and its flags removed after)
on tiny models built here (tests/hf_tiny.py), or a subprocess where the case needs one (a
real kill, the log output of a whole run). Each outcome is classified:

- **clear error**: exit code 1, one ``error: ...`` line naming what it must name, no traceback;
- **handled correctly**: exit code 0 and the result checks out;
- **traceback**: a Python traceback (or an ``error:`` line that misses the flag / file / key);
- **silently wrong**: exit code 0 for a mistake, or a wrong result;
- **data loss**: an input changed or vanished, or an output left half-written;
- **wrongly refused**: a valid run that failed with a clean error.

An error that comes after a model was loaded where the case says it must come before is marked
"late" in the table. Adding a case is one `Case(...)` entry in `CASES`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import hashlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO, REPO / "benchmarks", REPO / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

CLASSES = ("clear error", "handled correctly", "traceback", "silently wrong", "data loss",
           "wrongly refused")


# ------------------------------------------------------------------------ running a script


@dataclasses.dataclass
class Outcome:
    rc: int
    stdout: str
    stderr: str
    seconds: float
    loads: int = 0  # models loaded (load_model / converter reads) before the end
    crashed: bool = False  # an exception escaped main (a traceback)


def _load_script(script: str):

    from deltajax import cli

    cli._CONFIG_FLAGS.clear()
    name = f"_reliability_{Path(script).stem}"
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / script)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        _unload(name)
        raise
    return name, mod


def _unload(name: str) -> None:
    from absl import flags

    from deltajax import cli

    for f in list(flags.FLAGS.flags_by_module_dict().get(name, [])):
        with contextlib.suppress(AttributeError):
            delattr(flags.FLAGS, f.name)
    cli._CONFIG_FLAGS.clear()
    sys.modules.pop(name, None)


def run_script(script: str, argv: list[str], *, env: dict | None = None,
               cwd: str | os.PathLike | None = None) -> Outcome:
    """Run ``scripts/<script>`` with `argv` in this process, as ``python scripts/<script> ...``
    would (exit code, stdout, stderr; a traceback if an exception escaped)."""
    from absl import flags

    from deltajax import cli

    name, mod = _load_script(script)
    loads = [0]
    for attr in ("load_model",):
        if hasattr(mod, attr):
            real = getattr(mod, attr)

            def counted(*a, _real=real, **k):
                r = _real(*a, **k)
                loads[0] += 1  # a model that loaded (a missing one is not a load)
                return r

            setattr(mod, attr, counted)
    flags.FLAGS.unparse_flags()
    old_argv, old_env, old_cwd = sys.argv, dict(os.environ), os.getcwd()
    sys.argv = [str(REPO / "scripts" / script), *argv]
    os.environ.pop("DELTAJAX_TRACEBACK", None)
    os.environ.update(env or {})
    out, err = io.StringIO(), io.StringIO()
    rc, crashed = 0, False
    t0 = time.perf_counter()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.run(mod.main, user_errors=getattr(mod, "_USER_ERRORS", ()))
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)  # what the interpreter prints
            except BaseException:  # noqa: BLE001 - what the shell would print
                rc, crashed = 1, True
                traceback.print_exc(file=err)
            gc.collect()  # what the garbage of this run prints belongs to this run
    finally:
        os.chdir(old_cwd)
        sys.argv = old_argv
        os.environ.clear()
        os.environ.update(old_env)
        flags.FLAGS.unparse_flags()
        _unload(name)
    return Outcome(rc, out.getvalue(), err.getvalue(), time.perf_counter() - t0, loads[0],
                   crashed)


def run_subprocess(script: str, argv: list[str], *, env: dict | None = None,
                   timeout: int = 120) -> Outcome:
    e = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), **(env or {}))
    e.pop("DELTAJAX_TRACEBACK", None) if "DELTAJAX_TRACEBACK" not in (env or {}) else None
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(REPO / "scripts" / script), *argv], cwd=REPO, env=e,
                       capture_output=True, text=True, timeout=timeout)
    return Outcome(r.returncode, r.stdout, r.stderr, time.perf_counter() - t0,
                   crashed="Traceback" in r.stderr)


# ---------------------------------------------------------------------------- the workspace


def _digest(p: Path) -> str:
    h = hashlib.sha256()
    if p.is_symlink():
        h.update(f"link:{os.readlink(p)}".encode())
    elif p.is_file():
        h.update(p.read_bytes())
    elif p.is_dir():
        for q in sorted(p.rglob("*")):
            h.update(str(q.relative_to(p)).encode())
            if q.is_file() and not q.is_symlink():
                h.update(q.read_bytes())
    else:
        return "missing"
    return h.hexdigest()


def _tiny_tokenizer(out_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<unk>"]
    words = [f"w{i}" for i in range(40)] + ["user", "assistant", "hello", "world"]
    tk = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + words)},
                                    unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", unk_token="<unk>")
    tok.save_pretrained(out_dir)


class Workspace:
    """Tiny inputs shared by the cases (read-only for them: every case's inputs are hashed
    before and after it) and a fresh scratch directory per case (``{tmp}``)."""

    def __init__(self, root: Path):
        import jax
        from hf_tiny import make_tiny_hf

        from deltajax import compress, delta, load_model, save_delta
        from deltajax.config import RunConfig
        from deltajax.io import hf
        from deltajax.methods import RTN

        self.root = root
        p = {}
        p["base"] = make_tiny_hf("llama_gqa", root / "base", seed=0)
        _tiny_tokenizer(p["base"])
        base, cfg, _, _ = load_model(str(p["base"]))
        keys = iter(jax.random.split(jax.random.PRNGKey(1), 64))
        ft = jax.tree.map(lambda w: w + 0.02 * jax.random.normal(next(keys), w.shape), base)
        p["ft"] = hf.export_hf(ft, cfg, root / "ft", tokenizer_from=p["base"])
        p["other"] = make_tiny_hf("llama_gqa", root / "other", seed=2, intermediate_size=96)
        p["base2"] = make_tiny_hf("llama_gqa", root / "base2", seed=3)  # same shape, other weights
        _tiny_tokenizer(p["base2"])
        p["notok"] = make_tiny_hf("llama_gqa", root / "notok", seed=0)  # no tokenizer files
        p["ckpt"] = hf.convert_hf_to_checkpoint(p["base"], root / "ckpt").out_dir
        comp = compress(base, ft, RunConfig(method=RTN(bits=4, group=32), calib_windows=0),
                        cfg=cfg)
        p["delta"] = save_delta(comp, root / "delta", cfg=cfg, base_params=base)
        del delta
        p["calib"] = root / "calib.txt"
        p["calib"].write_text("\n".join(" ".join(f"w{(i * 7 + j) % 40}" for j in range(40))
                                        for i in range(20)) + "\n")
        self.paths = {k: Path(v) for k, v in p.items()}
        self.pristine = root / ".pristine"
        self.pristine.mkdir()
        for k, v in self.paths.items():
            (shutil.copytree if v.is_dir() else shutil.copy2)(v, self.pristine / k)
        self.digests = {k: _digest(v) for k, v in self.paths.items()}
        self.n = 0

    def scratch(self) -> Path:
        self.n += 1
        d = self.root / f"case{self.n:03d}"
        d.mkdir()
        return d

    def copy(self, key: str, tmp: Path) -> Path:
        """A private copy of input `key` in the case's scratch dir (for cases that aim at it)."""
        dst = tmp / f"{key}-copy"
        (shutil.copytree if self.paths[key].is_dir() else shutil.copy2)(self.paths[key], dst)
        return dst

    def damaged(self) -> list[str]:
        """Shared inputs that changed (restored from the pristine copy)."""
        bad = [k for k, v in self.paths.items() if _digest(v) != self.digests[k]]
        for k in bad:
            v = self.paths[k]
            if v.is_dir() and not v.is_symlink():
                shutil.rmtree(v)
            elif v.exists() or v.is_symlink():
                v.unlink()
            (shutil.copytree if (self.pristine / k).is_dir() else shutil.copy2)(
                self.pristine / k, v)
        return bad


# ------------------------------------------------------------------------------------ cases


@dataclasses.dataclass
class Ctx:
    """What a case's `argv` / `check` see: the shared inputs (`p`), its scratch dir (`tmp`),
    private copies (`copies`, by key) and the outcome (in `check`)."""

    ws: Workspace
    tmp: Path
    copies: dict[str, Path] = dataclasses.field(default_factory=dict)

    @property
    def p(self) -> dict[str, Path]:
        return self.ws.paths


@dataclasses.dataclass(frozen=True)
class Case:
    """One bad input or fault.

    Attributes:
      cls: the issue class it belongs to (a heading of the table).
      what: what was tried, one line.
      script: ``scripts/<script>``.
      argv: argv (after the script name) from the context; ``{base}`` etc. are str.format
        fields of `Ctx.p`, ``{tmp}`` the scratch dir, ``{copy:key}`` a private copy of input key.
      expect: "error" (a clear ``error:`` line containing every string of `needles`) or "ok"
        (exit code 0 and `check` true).
      needles: strings the error line must contain (case-insensitive).
      check: for expect="ok" (and extra checks after an error): ``check(ctx, outcome) -> str |
        None`` — a problem ("silently wrong" / "data loss: ...") or None.
      early: the error must come before any model is loaded.
      setup: prepares the scratch dir before the run (``setup(ctx)``).
      subprocess: run in a real subprocess (log output, environment, kills).
      env: environment variables for the run.
      cwd: "tmp" to run from the scratch dir.
      quick: part of the fast subset (the test suite).
    """

    cls: str
    what: str
    script: str
    argv: tuple[str, ...]
    expect: str = "error"
    needles: tuple[str, ...] = ()
    check: Callable | None = None
    early: bool = False
    setup: Callable | None = None
    subprocess: bool = False
    env: dict | None = None
    cwd: str | None = None
    quick: bool = True


def _fmt(ctx: Ctx, a: str) -> str:
    while "{copy:" in a:
        i = a.index("{copy:")
        j = a.index("}", i)
        key = a[i + 6:j]
        if key not in ctx.copies:
            ctx.copies[key] = ctx.ws.copy(key, ctx.tmp)
        a = a[:i] + str(ctx.copies[key]) + a[j + 1:]
    return a.format(tmp=ctx.tmp, **{k: str(v) for k, v in ctx.p.items()})


def _loads_delta(ctx, o, path="{tmp}/out"):
    from deltajax import load_delta

    try:
        load_delta(_fmt(ctx, path))
    except Exception as e:  # noqa: BLE001
        return f"silently wrong: the written delta does not load ({type(e).__name__}: {e})"
    return None


def _intact(key):
    def check(ctx, o):
        c = ctx.copies.get(key)
        if c is None:
            return None
        want = _digest(ctx.ws.pristine / key)
        return None if _digest(c) == want else f"data loss: {key} changed"
    return check


def _no_out(path="{tmp}/out"):
    def check(ctx, o):
        return f"silently wrong: {path} was written" if Path(_fmt(ctx, path)).exists() else None
    return check


def _stdout_has(*words):
    def check(ctx, o):
        miss = [w for w in words if w not in o.stdout]
        return f"silently wrong: output lacks {miss}" if miss else None
    return check


def _no_info_lines(ctx, o):
    bad = [ln for ln in o.stderr.splitlines() if ln[:1] in "IW" and ln[1:5].isdigit()]
    info = [ln for ln in bad if ln.startswith("I")]
    return f"silently wrong: {len(info)} INFO log lines, e.g. {info[0][:120]}" if info else None


def _all(*checks):
    def check(ctx, o):
        for c in checks:
            r = c(ctx, o)
            if r:
                return r
        return None
    return check


def _debris(ctx):
    out = ctx.tmp / "out"
    shutil.copytree(ctx.p["delta"], out)
    (ctx.tmp / ".out.tmp-4194999-stale").mkdir()  # pid above pid_max: a dead run
    (ctx.tmp / ".out.tmp-4194999-stale" / "half").write_text("x")


def _no_debris(ctx, o):
    left = [p.name for p in ctx.tmp.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    return f"silently wrong: debris left {left}" if left else None


def _calib_copy(ctx):
    shutil.copy2(ctx.p["calib"], ctx.tmp / "calib.txt")


def _config_copy(ctx):
    shutil.copy2(REPO / "configs" / "rtn4.py", ctx.tmp / "rtn.py")


def _existing_report(ctx):
    (ctx.tmp / "eval.md").write_text("old report\n")


def _report_kept(ctx, o):
    return None if (ctx.tmp / "eval.md").read_text() == "old report\n" else \
        "data loss: the earlier report was replaced"


def _symlink_ft(ctx):
    ctx.copies["ft"] = ctx.ws.copy("ft", ctx.tmp)
    (ctx.tmp / "link").symlink_to(ctx.copies["ft"])


def _corrupt_ckpt(ctx):
    c = ctx.ws.copy("ckpt", ctx.tmp)
    ctx.copies["ckpt"] = c
    data = sorted((p for p in (c / "params").rglob("*") if p.is_file() and p.stat().st_size
                   > 4096), key=lambda p: -p.stat().st_size)
    data[0].write_bytes(data[0].read_bytes()[:100])  # truncated array data


def _corrupt_delta(ctx):
    c = ctx.ws.copy("delta", ctx.tmp)
    ctx.copies["delta"] = c
    data = max((p for p in (c / "arrays").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[:100])


def _truncated_safetensors(ctx):
    c = ctx.ws.copy("base", ctx.tmp)
    ctx.copies["base"] = c
    f = c / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _edit_tensor(key, fn):
    """A setup: a private copy of HF dir `key` whose first projection weight is fn(w)."""
    def setup(ctx):
        from safetensors.numpy import load_file, save_file

        c = ctx.ws.copy(key, ctx.tmp)
        ctx.copies[key] = c
        f = c / "model.safetensors"
        t = load_file(f)
        name = "model.layers.0.self_attn.q_proj.weight"
        t[name] = fn(t[name].copy())
        save_file(t, f, metadata={"format": "pt"})
    return setup


def _nan_weight(w):
    w[0, :3] = float("nan")
    return w


def _huge_weight(w):
    w[0, 0] = 1e6
    return w


def _nudged_weight(w):
    w[5, 7] += 1e-3  # one entry of one matrix: another base
    return w


def _rope_both_layouts(kind):
    def setup(ctx):
        c = ctx.ws.copy("base", ctx.tmp)
        ctx.copies["base"] = c
        cfg = json.loads((c / "config.json").read_text())
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
        cfg["rope_scaling"] = {"linear": {"rope_type": "linear", "factor": 2.0},
                               "dynamic": {"rope_type": "dynamic", "factor": 2.0},
                               "yarn": {"rope_type": "yarn", "factor": 2.0,
                                        "original_max_position_embeddings": 128}}[kind]
        (c / "config.json").write_text(json.dumps(cfg))
    return setup


def _delta_edit(fn):
    def setup(ctx):
        c = ctx.ws.copy("delta", ctx.tmp)
        ctx.copies["delta"] = c
        fn(c)
    return setup


def _flip_bytes(c):
    data = max((p for p in (c / "arrays").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)
    b = bytearray(data.read_bytes())
    for i in range(len(b) // 3, len(b) // 3 + 64):
        b[i] ^= 0xFF
    data.write_bytes(bytes(b))


def _meta_edit(fn):
    def edit(c):
        m = json.loads((c / "meta.json").read_text())
        fn(m)
        (c / "meta.json").write_text(json.dumps(m))
    return edit


def _set_bits(m):
    leaf = next(v for v in m["leaves"].values() if v["method"].get("name") == "rtn")
    leaf["method"]["bits"] = 3


def _set_version(m):
    m["format_version"] = 99


def _bad_vocab(ctx):
    c = ctx.ws.copy("base", ctx.tmp)
    ctx.copies["base"] = c
    cfg = json.loads((c / "config.json").read_text())
    cfg["vocab_size"] = [64]
    (c / "config.json").write_text(json.dumps(cfg))


def _no_weights(ctx):
    c = ctx.ws.copy("base", ctx.tmp)
    ctx.copies["base"] = c
    for f in c.glob("*.safetensors"):
        f.unlink()


def _delta_no_meta(ctx):
    c = ctx.ws.copy("delta", ctx.tmp)
    ctx.copies["delta"] = c
    (c / "meta.json").unlink()


def _bad_config_file(ctx):
    (ctx.tmp / "cfg.py").write_text("def get_config(:\n")


def _bad_jsonl(ctx):
    (ctx.tmp / "p.jsonl").write_text('{"prompt": "hello"}\nnot json\n')


def _a_file(ctx):
    (ctx.tmp / "afile").write_text("x")


def _generated(ctx, o):
    return None if "tokens/s" in o.stdout else "silently wrong: no generation output"


B, F = "--base={base}", "--finetuned={ft}"
OUT = "--out={tmp}/out"
C0 = "--config.calib_windows=0"
RTN = ("--config=configs/rtn4.py", "--config.method.group=32")
GEN = ("--base={base}", "--max_new_tokens=3")

SILENT = "Silently wrong (other helpers' fixes, same table)"
DATA_LOSS = "Data loss"
EARLY = "Clear errors, early"

CASES: list[Case] = [
    # ------------------------------------------------------------------ silently wrong
    Case(SILENT, "convert: NaN bytes inside a valid safetensors file", "convert.py",
         ("--hf_dir={tmp}/base-copy", OUT), needles=("q_proj",), setup=_edit_tensor(
             "base", _nan_weight), check=_no_out()),
    Case(SILENT, "convert --dtype=float16 of a weight beyond fp16 range", "convert.py",
         ("--hf_dir={tmp}/base-copy", OUT, "--dtype=float16"), needles=("q_proj",),
         setup=_edit_tensor("base", _huge_weight), check=_no_out()),
    Case(SILENT, "generate: --base with one entry changed, --delta of the original", "generate.py",
         ("--base={tmp}/base-copy", "--delta={delta}", "--prompt=hello"),
         needles=("--delta", "different base"), setup=_edit_tensor("base", _nudged_weight)),
    Case(SILENT, "generate: 64 flipped bytes inside a delta's array data", "generate.py",
         (*GEN, "--delta={tmp}/delta-copy", "--prompt=hello"), needles=("--delta",),
         setup=_delta_edit(_flip_bytes)),
    Case(SILENT, "generate: a leaf's bits edited in the delta's meta.json", "generate.py",
         (*GEN, "--delta={tmp}/delta-copy", "--prompt=hello"), needles=("--delta",),
         setup=_delta_edit(_meta_edit(_set_bits))),
    Case(SILENT, "generate: unknown format_version in the delta's meta.json", "generate.py",
         (*GEN, "--delta={tmp}/delta-copy", "--prompt=hello"),
         needles=("--delta", "format_version"), setup=_delta_edit(_meta_edit(_set_version))),
    *[Case(SILENT, f"compress: rope_parameters default + rope_scaling {k} (layouts disagree)",
           "compress.py", ("--base={tmp}/base-copy", "--finetuned={tmp}/base-copy", OUT, *RTN),
           needles=("rope",), setup=_rope_both_layouts(k), check=_no_out())
      for k in ("linear", "dynamic", "yarn")],
    *[Case(SILENT, f"compress: LowRank --config.method.ratio={r}", "compress.py",
           (B, F, OUT, "--config=configs/lowrank.py", f"--config.method.ratio={r}"),
           needles=("ratio",), early=True, check=_no_out()) for r in ("-0.5", "1e-5", "4")],
    Case(SILENT, "compress: Delta-CoMe --config.method.ratio=1e-5", "compress.py",
         (B, F, OUT, "--config=configs/deltacome_16.py", "--config.method.ratio=1e-5", C0),
         needles=("ratio",), check=_no_out()),
    # ----------------------------------------------------------------------- data loss
    Case(DATA_LOSS, "compress --out = --finetuned, --overwrite", "compress.py",
         (B, "--finetuned={copy:ft}", "--out={copy:ft}", "--overwrite", *RTN),
         needles=("--out", "input"), check=_intact("ft"), early=True),
    Case(DATA_LOSS, "compress --out = --base, --overwrite", "compress.py",
         ("--base={copy:base}", F, "--out={copy:base}", "--overwrite", *RTN),
         needles=("--out", "input"), check=_intact("base"), early=True),
    Case(DATA_LOSS, "compress --out inside --finetuned", "compress.py",
         (B, "--finetuned={copy:ft}", "--out={copy:ft}/delta", "--overwrite", *RTN),
         needles=("--out", "inside"), check=_intact("ft"), early=True),
    Case(DATA_LOSS, "compress --out containing --finetuned (its parent), --overwrite",
         "compress.py", (B, "--finetuned={copy:ft}", "--out={tmp}", "--overwrite", *RTN),
         needles=("--out", "contains"), check=_intact("ft"), early=True),
    Case(DATA_LOSS, "compress --out = a symlink to --finetuned, --overwrite", "compress.py",
         (B, "--finetuned={tmp}/ft-copy", "--out={tmp}/link", "--overwrite", *RTN),
         needles=("--out",), check=_intact("ft"), early=True, setup=_symlink_ft),
    Case(DATA_LOSS, "convert --out = --hf_dir, --overwrite", "convert.py",
         ("--hf_dir={copy:base}", "--out={copy:base}", "--overwrite"),
         needles=("--out", "input"), check=_intact("base"), early=True),
    Case(DATA_LOSS, "convert --out inside --hf_dir", "convert.py",
         ("--hf_dir={copy:base}", "--out={copy:base}/ckpt"),
         needles=("--out", "inside"), check=_intact("base"), early=True),
    Case(DATA_LOSS, "export_hf --out = --ckpt, --overwrite", "export_hf.py",
         ("--ckpt={copy:ckpt}", "--out={copy:ckpt}", "--overwrite"),
         needles=("--out", "input"), check=_intact("ckpt"), early=True),
    Case(DATA_LOSS, "export_hf --out = --tokenizer_from, --overwrite", "export_hf.py",
         ("--ckpt={ckpt}", "--tokenizer_from={copy:base}", "--out={copy:base}", "--overwrite"),
         needles=("--out", "input"), check=_intact("base"), early=True),
    Case(DATA_LOSS, "finetune --out = --base, --overwrite", "finetune.py",
         ("--base={copy:base}", "--out={copy:base}", "--overwrite", "--steps=1"),
         needles=("--out", "input"), check=_intact("base"), early=True),
    Case(DATA_LOSS, "finetune --out = the folder holding --data, --overwrite", "finetune.py",
         ("--base={base}", "--data={tmp}/calib.txt", "--out={tmp}", "--overwrite"),
         needles=("--out", "contains"), early=True, setup=_calib_copy,
         check=lambda ctx, o: None if (ctx.tmp / "calib.txt").is_file() else
         "data loss: --data deleted"),
    Case(DATA_LOSS, "compress --out = the folder holding --config, --overwrite", "compress.py",
         (B, F, "--config={tmp}/rtn.py", "--out={tmp}", "--overwrite"),
         needles=("--out", "contains"), early=True, setup=_config_copy,
         check=lambda ctx, o: None if (ctx.tmp / "rtn.py").is_file() else
         "data loss: --config deleted"),
    Case(DATA_LOSS, "export_hf --out inside --ckpt", "export_hf.py",
         ("--ckpt={copy:ckpt}", "--out={copy:ckpt}/hf"), needles=("--out", "inside"),
         check=_intact("ckpt"), early=True),
    Case(DATA_LOSS, "eval --out inside --finetuned", "eval.py",
         (B, "--finetuned={copy:ft}", "--delta={delta}", "--out={copy:ft}/eval.md"),
         needles=("--out", "inside"), check=_intact("ft"), early=True),
    Case(DATA_LOSS, "eval --out inside a --delta", "eval.py",
         (B, F, "--delta={copy:delta}", "--out={copy:delta}/eval.md"),
         needles=("--out", "inside"), check=_intact("delta"), early=True),
    Case(DATA_LOSS, "eval --out = an existing report, no --overwrite", "eval.py",
         (B, F, "--delta={delta}", "--out={tmp}/eval.md"),
         needles=("--out", "--overwrite"), check=_report_kept, early=True,
         setup=_existing_report),
    Case(DATA_LOSS, "demo --out = --finetuned", "demo.py",
         (B, "--finetuned={copy:ft}", "--out={copy:ft}"),
         needles=("--out", "input"), check=_intact("ft"), early=True),
    Case(DATA_LOSS, "compress onto an existing delta, no --overwrite", "compress.py",
         (B, F, "--out={copy:delta}", *RTN), needles=("--overwrite",), check=_intact("delta"),
         early=True),
    Case(DATA_LOSS, "compress --overwrite of an earlier delta, with stale .tmp-* debris of a "
         "killed run beside it", "compress.py", (B, F, OUT, "--overwrite", *RTN), expect="ok",
         setup=_debris, check=_all(_loads_delta, _no_debris)),
    Case(DATA_LOSS, "convert --out is an existing file", "convert.py",
         ("--hf_dir={base}", "--out={tmp}/afile", "--overwrite"), needles=("afile",),
         setup=_a_file, early=True),
    # ------------------------------------------------------------- clear errors, early
    Case(EARLY, "compress: --base of another architecture (mismatched pair)", "compress.py",
         ("--base={other}", F, OUT, *RTN), needles=("--finetuned", "intermediate_size"),
         check=_no_out()),
    Case(EARLY, "generate: --delta made for another base (same shape)", "generate.py",
         ("--base={base2}", "--delta={delta}", "--prompt=hello", "--max_new_tokens=2"),
         needles=("--delta", "different base")),
    Case(EARLY, "compress: --config.method.bits=0", "compress.py",
         (B, F, OUT, *RTN, "--config.method.bits=0"), needles=("bits",), early=True,
         check=_no_out()),
    Case(EARLY, "compress: --config.method.bits=9", "compress.py",
         (B, F, OUT, *RTN, "--config.method.bits=9"), needles=("bits",), early=True,
         check=_no_out()),
    Case(EARLY, "compress: --config.method.bits=33", "compress.py",
         (B, F, OUT, *RTN, "--config.method.bits=33"), needles=("bits",), early=True,
         check=_no_out()),
    Case(EARLY, "compress: --config.method.group=0", "compress.py",
         (B, F, OUT, "--config=configs/rtn4.py", "--config.method.group=0"),
         needles=("group",), early=True, check=_no_out()),
    Case(EARLY, "compress: --config.method.group=-4", "compress.py",
         (B, F, OUT, "--config=configs/rtn4.py", "--config.method.group=-4"),
         needles=("group",), early=True, check=_no_out()),
    Case(EARLY, "compress: unknown method --config.method=foo", "compress.py",
         (B, F, OUT, "--config.method=foo"), needles=("foo", "unknown method"), early=True),
    Case(EARLY, "compress: option typo --config.method.bitz=4", "compress.py",
         (B, F, OUT, "--config.method.bitz=4"), needles=("bitz",), early=True),
    Case(EARLY, "compress: option typo --config.calib_windowz=3", "compress.py",
         (B, F, OUT, "--config.calib_windowz=3"), needles=("calib_windowz",), early=True),
    Case(EARLY, "compress: flag typo --outt", "compress.py",
         (B, F, "--outt={tmp}/out", *RTN), needles=("outt",), early=True),
    Case(EARLY, "compress: bad value --config.method.bits=four", "compress.py",
         (B, F, OUT, "--config.method.bits=four"), needles=("bits", "four"), early=True),
    Case(EARLY, "compress: --config file missing", "compress.py",
         (B, F, OUT, "--config={tmp}/nope.py"), needles=("--config", "nope.py"), early=True),
    Case(EARLY, "compress: --config file with a syntax error", "compress.py",
         (B, F, OUT, "--config={tmp}/cfg.py"), needles=("--config", "cfg.py"), early=True,
         setup=_bad_config_file),
    Case(EARLY, "compress: missing calibration file (--config.calib_data)", "compress.py",
         (B, F, OUT, "--config=configs/gptq4.py", "--config.method.group=32",
          "--config.calib_data={tmp}/missing.jsonl", "--config.calib_windows=2"),
         needles=("calib_data", "missing.jsonl"), early=True, check=_no_out()),
    Case(EARLY, "compress: missing --base directory", "compress.py",
         ("--base={tmp}/nobase", F, OUT, *RTN), needles=("--base", "nobase"), early=True),
    Case(EARLY, "compress: --base has no weights", "compress.py",
         ("--base={tmp}/base-copy", F, OUT, *RTN), needles=("--base", "safetensors"),
         setup=_no_weights),
    Case(EARLY, "compress: config.json vocab_size is a list", "compress.py",
         ("--base={tmp}/base-copy", F, OUT, *RTN), needles=("vocab_size",), setup=_bad_vocab),
    Case(EARLY, "compress: unwritable --out (parent is a file)", "compress.py",
         (B, F, "--out={tmp}/afile/out", *RTN), needles=("--out", "afile"), early=True,
         setup=_a_file),
    Case(EARLY, "compress: unwritable --out (/proc)", "compress.py",
         (B, F, "--out=/proc/deltajax-out", *RTN), needles=("--out", "/proc"), early=True),
    Case(EARLY, "compress: --mesh=data:3 on one device", "compress.py",
         (B, F, OUT, *RTN, "--mesh=data:3"), needles=("mesh",), early=True),
    Case(EARLY, "compress: stray positional argument", "compress.py",
         (B, F, OUT, *RTN, "stray"), needles=("stray",), early=True),
    Case(EARLY, "compress: required --out missing", "compress.py", (B, F, *RTN),
         needles=("--out",), early=True),
    Case(EARLY, "compress: --config default found from another working directory", "compress.py",
         (B, F, OUT, "--config.method.group=32"), expect="ok", cwd="tmp", check=_loads_delta),
    Case(EARLY, "compress --verbosity=1: a user mistake shows its traceback (asked for)",
         "compress.py", (B, F, OUT, "--config.method.bitz=4", "--verbosity=1"), expect="ok",
         check=lambda ctx, o: None if "Traceback" in o.stderr and o.rc == 1 else
         "silently wrong: no traceback with --verbosity=1"),
    Case(EARLY, "compress DELTAJAX_TRACEBACK=1: traceback shown (asked for)", "compress.py",
         (B, F, OUT, "--config.method.bitz=4"), expect="ok", env={"DELTAJAX_TRACEBACK": "1"},
         check=lambda ctx, o: None if "Traceback" in o.stderr and o.rc != 0 else
         "silently wrong: no traceback with DELTAJAX_TRACEBACK=1"),
    Case(EARLY, "compress: a normal run prints no orbax/absl INFO lines", "compress.py",
         (B, F, OUT, *RTN), expect="ok", subprocess=True,
         check=_all(_no_info_lines, _loads_delta)),
    Case(EARLY, "generate: a run with a delta prints no orbax/absl INFO lines", "generate.py",
         ("--base={ckpt}", "--delta={delta}", "--prompt=hello", "--max_new_tokens=2"),
         expect="ok", subprocess=True, check=_all(_no_info_lines, _generated)),
    Case(EARLY, "generate: missing --delta directory", "generate.py",
         (*GEN, "--delta={tmp}/nodelta", "--prompt=hello"),
         needles=("--delta", "does not exist"), early=True),
    Case(EARLY, "generate: --delta is not a delta (an HF dir)", "generate.py",
         (*GEN, "--delta={ft}", "--prompt=hello"), needles=("--delta", "meta.json")),
    Case(EARLY, "generate: --delta without meta.json", "generate.py",
         (*GEN, "--delta={tmp}/delta-copy", "--prompt=hello"), needles=("--delta", "meta.json"),
         setup=_delta_no_meta),
    Case(EARLY, "generate: empty prompt", "generate.py", (*GEN, "--prompt="),
         needles=("--prompt", "empty"), early=True),
    Case(EARLY, "generate: no prompt", "generate.py", GEN, needles=("--prompt",), early=True),
    Case(EARLY, "generate: --max_new_tokens=0", "generate.py",
         ("--base={base}", "--prompt=hello", "--max_new_tokens=0"),
         needles=("--max_new_tokens",), early=True),
    Case(EARLY, "generate: --max_new_tokens=-3", "generate.py",
         ("--base={base}", "--prompt=hello", "--max_new_tokens=-3"),
         needles=("--max_new_tokens",), early=True),
    Case(EARLY, "generate: --temperature=-1", "generate.py",
         (*GEN, "--prompt=hello", "--temperature=-1"), needles=("--temperature",), early=True),
    Case(EARLY, "generate: --temperature=nan", "generate.py",
         (*GEN, "--prompt=hello", "--temperature=nan"), needles=("--temperature",), early=True),
    Case(EARLY, "generate: --top_p=0", "generate.py",
         (*GEN, "--prompt=hello", "--top_p=0"), needles=("--top_p",), early=True),
    Case(EARLY, "generate: --top_p=1.5", "generate.py",
         (*GEN, "--prompt=hello", "--top_p=1.5"), needles=("--top_p",), early=True),
    Case(EARLY, "generate: --top_k=-1", "generate.py",
         (*GEN, "--prompt=hello", "--top_k=-1"), needles=("--top_k",), early=True),
    Case(EARLY, "generate: --tenant out of range", "generate.py",
         (*GEN, "--delta={delta}", "--prompt=hello", "--tenant=3"), needles=("--tenant",),
         early=True),
    Case(EARLY, "generate: --prompts_file missing", "generate.py",
         (*GEN, "--prompts_file={tmp}/nope.txt"), needles=("--prompts_file", "nope.txt"),
         early=True),
    Case(EARLY, "generate: --prompts_file .jsonl with a bad line", "generate.py",
         (*GEN, "--prompts_file={tmp}/p.jsonl"), needles=("--prompts_file", ":2"), early=True,
         setup=_bad_jsonl),
    Case(EARLY, "generate: --base without tokenizer files", "generate.py",
         ("--base={notok}", "--prompt=hello"), needles=("--base", "tokenizer")),
    Case(EARLY, "generate: --base = a checkpoint made by convert.py", "generate.py",
         ("--base={ckpt}", "--prompt=hello", "--max_new_tokens=3"), expect="ok",
         check=_generated),
    Case(EARLY, "generate: a converted --base with a delta", "generate.py",
         ("--base={ckpt}", "--delta={delta}", "--prompt=hello", "--max_new_tokens=3"),
         expect="ok", check=_generated),
    Case(EARLY, "generate: corrupt converted checkpoint (truncated array file)", "generate.py",
         ("--base={tmp}/ckpt-copy", "--prompt=hello"), needles=("--base", "weight"),
         setup=_corrupt_ckpt),
    Case(EARLY, "generate: corrupt delta (truncated array file)", "generate.py",
         (*GEN, "--delta={tmp}/delta-copy", "--prompt=hello"),
         needles=("--delta", "truncated or corrupt"), setup=_corrupt_delta),
    Case(EARLY, "convert: truncated model.safetensors", "convert.py",
         ("--hf_dir={tmp}/base-copy", OUT), needles=("--hf_dir", "model.safetensors"),
         setup=_truncated_safetensors, check=_no_out()),
    Case(EARLY, "eval: missing --delta directory", "eval.py",
         (B, F, "--delta={tmp}/nodelta", "--out={tmp}/e.md"),
         needles=("--delta", "does not exist"), early=True),
    Case(EARLY, "eval: no --finetuned", "eval.py", (B, "--delta={delta}", "--out={tmp}/e.md"),
         needles=("--finetuned",), early=True),
    Case(EARLY, "eval: neither --delta nor --sweep", "eval.py", (B, F, "--out={tmp}/e.md"),
         needles=("--delta",), early=True),
    Case(EARLY, "eval: mismatched pair", "eval.py",
         ("--base={other}", F, "--delta={delta}", "--out={tmp}/e.md"),
         needles=("--finetuned", "intermediate_size")),
    Case(EARLY, "eval: unwritable --out", "eval.py",
         (B, F, "--delta={delta}", "--out={tmp}/afile/e.md"), needles=("--out", "afile"),
         early=True, setup=_a_file),
    Case(EARLY, "eval: --seq_len=0", "eval.py",
         (B, F, "--delta={delta}", "--out={tmp}/e.md", "--seq_len=0"), needles=("--seq_len",),
         early=True),
    Case(EARLY, "eval: --max_new_tokens=0", "eval.py",
         (B, F, "--delta={delta}", "--out={tmp}/e.md", "--max_new_tokens=0"),
         needles=("--max_new_tokens",), early=True),
    Case(EARLY, "eval: --sweep file missing", "eval.py",
         (B, F, "--sweep={tmp}/nosweep.py", "--out={tmp}/e.md"), needles=("--sweep", "nosweep"),
         early=True),
    Case(EARLY, "eval: --render file missing", "eval.py",
         ("--render={tmp}/nothere.json", "--out={tmp}/e.md"), needles=("--render", "nothere"),
         early=True),
    Case(EARLY, "eval: --out names the .json", "eval.py",
         (B, F, "--delta={delta}", "--out={tmp}/e.json"), needles=("--out",), early=True),
    Case(EARLY, "compress: missing --finetuned directory", "compress.py",
         (B, "--finetuned={tmp}/noft", OUT, *RTN), needles=("--finetuned", "noft"),
         check=_no_out()),
    Case(EARLY, "generate: --dtype=int8", "generate.py", (*GEN, "--prompt=hello", "--dtype=int8"),
         needles=("--dtype",), early=True),
    Case(EARLY, "generate: --tenant=abc", "generate.py",
         (*GEN, "--delta={delta}", "--prompt=hello", "--tenant=abc"), needles=("--tenant",),
         early=True),
    Case(EARLY, "export_hf: --max_shard_mb=0", "export_hf.py",
         ("--ckpt={ckpt}", OUT, "--max_shard_mb=0"), needles=("--max_shard_mb",), early=True,
         check=_no_out()),
    Case(EARLY, "export_hf: a converted checkpoint exports with its own tokenizer", "export_hf.py",
         ("--ckpt={ckpt}", OUT), expect="ok",
         check=lambda ctx, o: None if (ctx.tmp / "out" / "tokenizer.json").is_file() else
         "silently wrong: the export lost the tokenizer"),
    Case(EARLY, "finetune: --seq_len=1", "finetune.py",
         ("--base={base}", "--data={calib}", OUT, "--seq_len=1"), needles=("--seq_len",),
         early=True),
    Case(EARLY, "convert: missing --hf_dir", "convert.py",
         ("--hf_dir={tmp}/nope", OUT), needles=("--hf_dir", "nope"), check=_no_out()),
    Case(EARLY, "convert: --dtype=int3", "convert.py", ("--hf_dir={base}", OUT, "--dtype=int3"),
         needles=("--dtype",), early=True),
    Case(EARLY, "convert: unwritable --out", "convert.py",
         ("--hf_dir={base}", "--out={tmp}/afile/x"), needles=("--out", "afile"), early=True,
         setup=_a_file),
    Case(EARLY, "convert then generate from the result (tokenizer copied)", "convert.py",
         ("--hf_dir={base}", OUT), expect="ok",
         check=lambda ctx, o: None if (ctx.tmp / "out" / "tokenizer.json").is_file() else
         "silently wrong: the converted checkpoint has no tokenizer"),
    Case(EARLY, "export_hf: missing --ckpt", "export_hf.py", ("--ckpt={tmp}/nope", OUT),
         needles=("--ckpt", "nope"), check=_no_out()),
    Case(EARLY, "export_hf: --ckpt is an HF dir, not a converted checkpoint", "export_hf.py",
         ("--ckpt={base}", OUT), needles=("--ckpt", "meta.json"), check=_no_out()),
    Case(EARLY, "export_hf: --tokenizer_from missing", "export_hf.py",
         ("--ckpt={ckpt}", OUT, "--tokenizer_from={tmp}/nope"),
         needles=("--tokenizer_from", "nope"), early=True, check=_no_out()),
    Case(EARLY, "finetune: --data missing", "finetune.py",
         ("--base={base}", "--data={tmp}/nope.jsonl", OUT), needles=("--data", "nope.jsonl"),
         early=True),
    Case(EARLY, "finetune: --steps=0", "finetune.py",
         ("--base={base}", "--data={calib}", OUT, "--steps=0"), needles=("--steps",),
         early=True),
    Case(EARLY, "finetune: --batch_size=0", "finetune.py",
         ("--base={base}", "--data={calib}", OUT, "--batch_size=0"),
         needles=("--batch_size",), early=True),
    Case(EARLY, "finetune: --lr=-1", "finetune.py",
         ("--base={base}", "--data={calib}", OUT, "--lr=-1"), needles=("--lr",), early=True),
    Case(EARLY, "finetune: unwritable --out", "finetune.py",
         ("--base={base}", "--out={tmp}/afile/x"), needles=("--out", "afile"), early=True,
         setup=_a_file),
]


# ---------------------------------------------------------------------------- classification


def classify(case: Case, ctx: Ctx, o: Outcome, damaged: list[str]) -> tuple[str, str]:
    """(class, what the tool does now) of one outcome."""
    err_lines = [ln for ln in o.stderr.splitlines() if ln.startswith("error: ")]
    last = err_lines[-1] if err_lines else ""
    problem = case.check(ctx, o) if case.check is not None else None
    if damaged:
        return "data loss", f"shared input(s) {damaged} changed"
    if problem and problem.startswith("data loss"):
        return "data loss", problem
    if case.expect == "ok":
        if o.crashed and "Traceback" in o.stderr and not case.env and "--verbosity=1" not in \
                case.argv:
            return "traceback", _tail(o.stderr)
        if o.rc != 0 and not (case.env or "--verbosity=1" in case.argv):
            return "wrongly refused", f"exit {o.rc}: {last or _tail(o.stderr)}"
        if problem:
            return "silently wrong", problem
        return "handled correctly", _summary(o)
    # expect an error
    if o.rc == 0:
        return "silently wrong", "exit 0: accepted" + (f"; {problem}" if problem else "")
    if "Traceback" in o.stderr or o.crashed or not last:
        return "traceback", _tail(o.stderr)
    missing = [n for n in case.needles if n.lower() not in last.lower()]
    if missing or len(err_lines) != 1:
        return "traceback", f"obscure: {last[:200]} (lacks {missing})"
    if problem:
        return "silently wrong", problem
    note = " (late: after loading a model)" if case.early and o.loads else ""
    return "clear error", f"`{last[:220]}`{note}"


def _tail(s: str) -> str:
    lines = [ln for ln in s.splitlines() if ln.strip()]
    return "traceback: " + (lines[-1][:200] if lines else "(none)")


def _summary(o: Outcome) -> str:
    lines = [ln for ln in o.stdout.splitlines() if ln.strip()]
    return f"exit 0; {lines[-1][:160]}" if lines else "exit 0"


def run_cases(cases: list[Case], root: Path, *, log=print) -> list[dict]:
    ws = Workspace(root)
    rows = []
    for i, case in enumerate(cases):
        ctx = Ctx(ws, ws.scratch())
        if case.setup is not None:
            case.setup(ctx)
        argv = [_fmt(ctx, a) for a in case.argv]
        cwd = ctx.tmp if case.cwd == "tmp" else None
        if case.subprocess:
            o = run_subprocess(case.script, argv, env=case.env)
        else:
            o = run_script(case.script, argv, env=case.env, cwd=cwd)
        damaged = ws.damaged()
        cls, now = classify(case, ctx, o, damaged)
        rows.append({"id": i + 1, "class": case.cls, "what": case.what,
                     "script": case.script + (" (subprocess)" if case.subprocess else ""),
                     "outcome": cls, "now": now, "seconds": round(o.seconds, 2),
                     "late": bool(case.early and o.loads and cls == "clear error")})
        log(f"[{i + 1:3d}/{len(cases)}] {cls:17s} {o.seconds:5.1f}s  {case.script}: {case.what}"
            + ("" if cls in ("clear error", "handled correctly") else f"\n      {now}"))
    return rows


def markdown(rows: list[dict], seconds: float) -> list[str]:
    import _common as C

    counts = {c: sum(r["outcome"] == c for r in rows) for c in CLASSES}
    lines = C.header("Reliability: bad input and faults through the scripts", [
        f"- {len(rows)} cases on tiny models (tests/hf_tiny.py), each script's `main` run in "
        f"process through `deltajax.cli.run` as from the shell (a real subprocess where marked: "
        f"log output), {seconds:.0f} s in all (2-core CPU shared with other test runs)",
        "- outcome: " + ", ".join(f"{c} **{n}**" for c, n in counts.items()),
        "- clear error = exit 1, one `error: ...` line naming the flag / file / key, no "
        "traceback; handled correctly = exit 0 and the result checked; data loss = an input "
        "changed or vanished; \"late\" = the error came after a model was loaded",
        "- every input is hashed before and after each case; cases aimed at an input use a "
        "private copy",
    ])
    for cls in dict.fromkeys(r["class"] for r in rows):
        lines += ["", f"## {cls}", "", "| # | script | what was tried | outcome | what the tool "
                  "does now |", "|---:|---|---|---|---|"]
        for r in rows:
            if r["class"] == cls:
                now = r["now"].replace("|", "\\|").replace("\n", " ")
                lines.append(f"| {r['id']} | {r['script']} | {r['what']} | {r['outcome']} | "
                             f"{now} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "reliability.md"),
                    help="markdown table ('' : none)")
    ap.add_argument("--json", default="", help="also write the rows as JSON here")
    ap.add_argument("--quick", action="store_true", help="only the fast subset (cases marked "
                    "quick and not subprocess)")
    ap.add_argument("--only", default="", help="run cases whose description contains this")
    args = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    cases = [c for c in CASES if (not args.quick or (c.quick and not c.subprocess))
             and args.only in c.what]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="deltajax-reliability-") as root:
        rows = run_cases(cases, Path(root))
    seconds = time.perf_counter() - t0
    counts = {c: sum(r["outcome"] == c for r in rows) for c in CLASSES}
    print(f"[reliability] {len(rows)} cases in {seconds:.0f} s: " +
          ", ".join(f"{c} {n}" for c, n in counts.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"counts": counts, "rows": rows}, indent=1))
    if args.out:
        import _common as C

        C.write_markdown(args.out, markdown(rows, seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
