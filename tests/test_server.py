"""The OpenAI-compatible server, for real: scripts/serve.py in a subprocess on 127.0.0.1, driven
by the official `openai` client (and httpx for the raw error and SSE checks).

Every greedy answer is compared with `serve.generate.generate` on the same fine-tune applied with
`delta.attach` in this process (the offline answer).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from serve_tiny import RULES, finetune, tiny_finetunes, tiny_model, write_tiny_checkpoint

from deltajax import delta
from deltajax.io import delta_ckpt
from deltajax.serve import generate as G

pytestmark = pytest.mark.slow  # subprocesses (servers, scripts): make test-slow

REPO = Path(__file__).resolve().parents[1]
BASE = "tiny"
MAX_LEN = 64
N = 10
PROMPTS = ["hello w3 w4", "world w9", "w7 w8", "w1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, tmp: Path):
        cfg, base = tiny_model()
        self.cfg, self.base = cfg, base
        self.comps = tiny_finetunes(base)
        # loaded at runtime: the layout of ft-rtn (its pool has room), another fine-tune
        self.comps["ft-rtn2"] = delta.compress(base, finetune(base, 202, big=0.5), RULES["ft-rtn"],
                                               progress=False)
        self.src, self.paths = write_tiny_checkpoint(tmp, base, self.comps)
        other = tiny_model(seed=1)[1]
        self.wrong = str(delta_ckpt.save_delta(self.comps["ft-bd"], tmp / "wrong", cfg=cfg,
                                               base_params=other))
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "server.log"
        cmd = [sys.executable, str(REPO / "scripts" / "serve.py"), f"--base={self.src}",
               f"--base_name={BASE}",
               f"--delta=ft-rtn={self.paths['ft-rtn']},ft-lr={self.paths['ft-lr']}",
               f"--delta=ft-bd={self.paths['ft-bd']}",
               "--slots=4", f"--max_len={MAX_LEN}", f"--prefill_buckets=16,{MAX_LEN}",
               "--pool=2", "--max_queue=40", "--host=127.0.0.1", f"--port={self.port}",
               "--log_level=warning"]
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
        self._logf = open(self.log, "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self._logf,
                                     stderr=subprocess.STDOUT)
        self.tok = None
        self._refs: dict = {}

    def wait_ready(self, timeout=300):
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"server not ready after {timeout} s:\n{self.tail()}")

    def tail(self, n=3000):
        return self.log.read_text()[-n:]

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._logf.close()

    def client(self, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0,
                             timeout=kw.pop("timeout", 120), **kw)

    def ref(self, model: str, prompt: str, *, chat: bool = False, n: int = N) -> tuple:
        """(text, tokens, finish reason) of the offline greedy answer of `model` (generate on
        delta.attach)."""
        key = (model, prompt, chat, n)
        if key not in self._refs:
            if self.tok is None:
                from transformers import AutoTokenizer

                self.tok = AutoTokenizer.from_pretrained(str(self.src), local_files_only=True)
            params = self.base if model == BASE else delta.attach(self.base, self.comps[model])
            out = G.generate(params, self.cfg, self.tok, [prompt], max_new_tokens=n, chat=chat)
            k = int(out["lengths"][0])
            stopped = k < n or int(out["tokens"][0][k - 1]) in out["stop_ids"]
            self._refs[key] = (out["texts"][0], k, "stop" if stopped else "length")
        return self._refs[key]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("serve"))
    try:
        for m in (BASE, "ft-rtn", "ft-lr", "ft-bd", "ft-rtn2"):  # while the server warms up
            for p in PROMPTS:
                s.ref(m, p)
            s.ref(m, PROMPTS[0], chat=True)
        s.wait_ready()
        yield s
    finally:
        s.close()


def _metric(url, name, labels=""):
    text = httpx.get(url + "/metrics", timeout=10).text
    m = re.search(rf"^deltajax_{name}{re.escape(labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_models_health_and_metrics(server):
    assert httpx.get(server.url + "/health", timeout=10).json() == {"status": "ok"}
    ids = {m.id for m in server.client().models.list().data}
    assert ids == {BASE, "ft-rtn", "ft-lr", "ft-bd"}
    text = httpx.get(server.url + "/metrics", timeout=10).text
    for name in ("queue_length", "active_slots", "tokens_per_second", "requests_total"):
        assert f"# TYPE deltajax_{name} " in text, name


@pytest.mark.parametrize("model", [BASE, "ft-rtn", "ft-lr"])
def test_completions_and_chat_equal_offline(server, model):
    c = server.client()
    for p in PROMPTS[:2]:
        want, n, reason = server.ref(model, p)
        r = c.completions.create(model=model, prompt=p, max_tokens=N, temperature=0)
        assert r.choices[0].text == want, (model, p)
        assert r.choices[0].finish_reason == reason
        assert r.usage.completion_tokens == n and r.usage.prompt_tokens == len(p.split())
        assert r.usage.total_tokens == n + len(p.split()) and r.model == model
        chunks = list(c.completions.create(model=model, prompt=p, max_tokens=N, temperature=0,
                                           stream=True, stream_options={"include_usage": True}))
        assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == \
            r.choices[0].finish_reason
        assert chunks[-1].usage.completion_tokens == n and not chunks[-1].choices
    want, n, reason = server.ref(model, PROMPTS[0], chat=True)
    msgs = [{"role": "user", "content": PROMPTS[0]}]
    r = c.chat.completions.create(model=model, messages=msgs, max_tokens=N, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == 8 and r.usage.completion_tokens == n  # template: 8 tokens
    chunks = list(c.chat.completions.create(model=model, messages=msgs, max_tokens=N,
                                            temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want
    assert chunks[-1].choices[0].finish_reason == reason


def test_fine_tunes_differ_and_stop_n_seed(server):
    c = server.client()
    models = (BASE, "ft-rtn", "ft-lr", "ft-bd", "ft-rtn2")
    answers = {m: server.ref(m, PROMPTS[0])[0] for m in models}
    assert len(set(answers.values())) == 5, answers
    text = answers["ft-lr"]
    stop = " " + text.split()[2]
    r = c.completions.create(model="ft-lr", prompt=PROMPTS[0], max_tokens=N, temperature=0,
                             stop=[stop])
    assert r.choices[0].text == text[:text.index(stop)] and r.choices[0].finish_reason == "stop"
    kw = dict(model="ft-rtn", prompt=PROMPTS[1], max_tokens=N, temperature=1.0, seed=5, n=3)
    a = c.completions.create(**kw)
    b = c.completions.create(**kw)
    assert [ch.text for ch in a.choices] == [ch.text for ch in b.choices], "seed 5"
    assert len({ch.text for ch in a.choices}) > 1 and [ch.index for ch in a.choices] == [0, 1, 2]
    assert 3 <= a.usage.completion_tokens <= 3 * N
    # a batch of prompts: one choice each, in order
    r = c.completions.create(model=BASE, prompt=PROMPTS[:3], max_tokens=N, temperature=0)
    assert [ch.text for ch in r.choices] == [server.ref(BASE, p)[0] for p in PROMPTS[:3]]


def _load(server, name, path):
    return httpx.post(server.url + "/v1/load_lora_adapter",
                      json={"lora_name": name, "lora_path": path}, timeout=60)


def test_load_and_unload_at_runtime(server):
    c = server.client()
    url = server.url + "/v1"
    compiled = _metric(server.url, "compiled_executables", '{step="decode"}')
    assert compiled >= 1
    r = _load(server, "ft-rtn2", server.paths["ft-rtn2"])
    assert r.status_code == 200, r.text
    assert "ft-rtn2" in {m.id for m in c.models.list().data}
    for p in PROMPTS[:2]:
        out = c.completions.create(model="ft-rtn2", prompt=p, max_tokens=N, temperature=0)
        assert out.choices[0].text == server.ref("ft-rtn2", p)[0]
    # the pool had room: loading wrote into it, nothing recompiled
    assert _metric(server.url, "compiled_executables", '{step="decode"}') == compiled
    again = _load(server, "ft-rtn2", server.paths["ft-rtn2"])
    assert again.status_code == 400 and "already loaded" in again.json()["error"]["message"]
    wrong = _load(server, "w", server.wrong)
    assert wrong.status_code == 400, wrong.text
    err = wrong.json()["error"]
    assert "different base" in err["message"] and err["param"] == "lora_path"
    for body, param in [({"lora_name": "x", "lora_path": "/nonexistent"}, "lora_path"),
                        ({"lora_path": server.paths["ft-bd"]}, "lora_name")]:
        r = httpx.post(url + "/load_lora_adapter", json=body, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert httpx.post(url + "/unload_lora_adapter", json={"lora_name": "ft-rtn2"},
                      timeout=60).status_code == 200
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="ft-rtn2", prompt="w1", max_tokens=2)
    assert httpx.post(url + "/unload_lora_adapter", json={"lora_name": "ft-rtn2"},
                      timeout=60).status_code == 404
    assert "ft-rtn2" not in {m.id for m in c.models.list().data}


def test_errors_are_openai_shaped_and_harmless(server):
    c = server.client()
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="nope", prompt="w1", max_tokens=2)
    assert e.value.param == "model" and e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=BASE, prompt=" ".join(["w1"] * MAX_LEN), max_tokens=2)
    assert str(MAX_LEN) in e.value.message and e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "w1"}],
                                  max_tokens=MAX_LEN)
    assert e.value.param == "max_tokens" and str(MAX_LEN) in e.value.message
    for kw, param in [(dict(temperature=-1), "temperature"), (dict(top_p=2), "top_p"),
                      (dict(n=0), "n"), (dict(max_tokens=0), "max_tokens"),
                      (dict(logprobs=2), "logprobs"), (dict(seed=-3), "seed"),
                      (dict(extra_body={"top_k": -5}), "top_k")]:
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(**{"model": BASE, "prompt": "w1", "max_tokens": 2, **kw})
        assert e.value.param == param and e.value.type == "invalid_request_error", kw
    raw = [httpx.post(server.url + "/v1/completions", content=b"{not json", timeout=10),
           httpx.post(server.url + "/v1/completions", json={"model": BASE, "prompt": [1, "a"]},
                      timeout=10),
           httpx.post(server.url + "/v1/chat/completions", json={"model": BASE,
                                                                  "messages": "hi"}, timeout=10),
           httpx.post(server.url + "/v1/completions", json={"prompt": "w1"}, timeout=10)]
    for r in raw:
        assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param",
                                                                   "code"}, r.text
    assert httpx.get(server.url + "/v1/nothing", timeout=10).status_code == 404
    # queue full: 3 prompts x n=16 = 48 sequences > --max_queue=40
    with pytest.raises(openai.RateLimitError) as e:
        c.completions.create(model=BASE, prompt=PROMPTS[:3], n=16, max_tokens=2)
    assert e.value.code == "queue_full"
    # the engine is fine
    out = c.completions.create(model="ft-lr", prompt=PROMPTS[0], max_tokens=N, temperature=0)
    assert out.choices[0].text == server.ref("ft-lr", PROMPTS[0])[0]


def test_client_disconnect_mid_stream_frees_the_slot(server):
    cancelled = _metric(server.url, "requests_finished_total", '{reason="cancelled"}')
    body = {"model": "ft-rtn", "prompt": "w1", "max_tokens": MAX_LEN - 2, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30) as h:
        with h.stream("POST", server.url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            got = 0
            for line in r.iter_lines():
                if line.startswith("data: "):
                    json.loads(line[6:])
                    got += 1
                    if got == 3:
                        break
    t0 = time.monotonic()
    while time.monotonic() - t0 < 30:
        if _metric(server.url, "requests_finished_total", '{reason="cancelled"}') > cancelled \
                and _metric(server.url, "active_slots") == 0:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the disconnected stream was not cancelled:\n" + server.tail())


def test_32_concurrent_requests_over_three_finetunes_and_base(server):
    models = [BASE, "ft-rtn", "ft-lr", "ft-bd"]
    jobs = [(models[i % 4], PROMPTS[(i // 4) % 4], i % 3) for i in range(32)]

    def run(job):
        model, prompt, kind = job
        c = server.client(timeout=120)
        if kind == 0:
            return c.completions.create(model=model, prompt=prompt, max_tokens=N,
                                        temperature=0).choices[0].text
        if kind == 1:
            return "".join(ch.choices[0].text for ch in c.completions.create(
                model=model, prompt=prompt, max_tokens=N, temperature=0, stream=True))
        return c.chat.completions.create(
            model=model, messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=N,
            temperature=0).choices[0].message.content

    t0 = time.monotonic()
    with cf.ThreadPoolExecutor(max_workers=32) as ex:
        futs = [ex.submit(run, j) for j in jobs]
        done, pending = cf.wait(futs, timeout=240)
    assert not pending, f"{len(pending)} requests hung:\n{server.tail()}"
    for (model, prompt, kind), f in zip(jobs, futs):
        want = server.ref(model, PROMPTS[0], chat=True)[0] if kind == 2 else \
            server.ref(model, prompt)[0]
        assert f.result() == want, (model, prompt, kind)
    assert time.monotonic() - t0 < 240
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    assert _metric(server.url, "active_slots") == 0 and _metric(server.url, "queue_length") == 0
    assert _metric(server.url, "requests_total", '{model="ft-bd"}') >= 8
    assert server.proc.poll() is None


def test_script_user_errors(server, tmp_path):
    """Flag mistakes: one error: line and exit code 1, before any model is loaded."""
    from deltajax.serve.server import parse_delta_specs

    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    script = str(REPO / "scripts" / "serve.py")
    cases = [(["--mesh=data:1,model:2"], "--mesh is not implemented"),
             ([f"--port={server.port}"], "cannot listen")]
    procs = [subprocess.Popen([sys.executable, script, f"--base={server.src}", *args], cwd=REPO,
                              env=env, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for args, _ in cases]
    for (args, msg), p in zip(cases, procs):
        _, err = p.communicate(timeout=120)
        lines = [x for x in err.splitlines() if x.startswith("error:")]
        assert p.returncode == 1 and len(lines) == 1 and msg in lines[0], (args, err[-800:])
    for values, msg in [(["oops"], "is not name=path"), ([f"a={tmp_path}", f"a={tmp_path}"],
                                                        "given twice"),
                        ([f"a={tmp_path / 'none'}"], "no such directory")]:
        with pytest.raises(ValueError, match=msg):
            parse_delta_specs(values)
    assert parse_delta_specs([f"a={tmp_path}, b={tmp_path}"]) == {"a": str(tmp_path),
                                                                  "b": str(tmp_path)}


def test_api_key_in_process():
    """create_app(api_key=...): /v1/ needs the bearer key (in process, the engine not started)."""
    from fastapi.testclient import TestClient

    from deltajax.serve.engine import Engine
    from deltajax.serve.server import create_app

    cfg, base = tiny_model()
    eng = Engine(base, cfg, None, base_name=BASE, slots=1, max_len=16)
    with TestClient(create_app(eng, start_engine=False, api_key="k1")) as tc:
        r = tc.get("/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = tc.get("/v1/models", headers={"Authorization": "Bearer k1"})
        assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == [BASE]
        assert tc.get("/health").status_code == 503  # open, and honest: no engine thread
