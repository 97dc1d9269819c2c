"""OpenAI-compatible HTTP server over a serving `Engine` (FastAPI + uvicorn).

    engine = Engine(base, cfg, tok, deltas={"math": "/d/math"}, slots=8, max_len=2048)
    serve(engine, host="127.0.0.1", port=8000)      # or: scripts/serve.py, deltajax-serve

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.chat.completions.create(model="math", messages=[{"role": "user", "content": "2+3?"}])

Endpoints:

* ``GET /v1/models``: the base (its name) and every registered fine-tune;
* ``POST /v1/completions``, ``POST /v1/chat/completions`` (the tokenizer's chat template):
  ``model`` names the fine-tune (or the base), ``prompt`` / ``messages``, ``max_tokens`` (chat
  also ``max_completion_tokens``), ``temperature``, ``top_p``, ``seed``, ``stop``, ``n``,
  ``stream`` (server-sent events; ``stream_options.include_usage`` adds a usage chunk), and the
  vLLM extensions ``top_k``, ``ignore_eos``, ``stop_token_ids``; ``usage`` counts tokens;
* ``POST /v1/load_lora_adapter`` ``{"lora_name", "lora_path"}`` and
  ``POST /v1/unload_lora_adapter`` ``{"lora_name"}`` (vLLM's request shape): load a saved delta
  directory (checked against the base) / unload it at runtime;
* ``GET /health`` (200 while the engine thread runs, else 503), ``GET /metrics`` (Prometheus
  text: queue length, active slots, tokens/s, per-fine-tune request counts, ...).

The engine runs in its own thread and owns the device; handlers only submit requests and read
their events (through `loop.call_soon_threadsafe` into an asyncio queue). Batching never happens
here. Errors are OpenAI-shaped, ``{"error": {"message", "type", "param", "code"}}``: unknown
model 404, prompt longer than the context 400 (with the limit), bad parameters 400 (naming the
field), queue full 429. A client that disconnects (mid-stream or while waiting) cancels its
requests, which frees their slots. Parameters this engine does not implement (logprobs, echo,
penalties, logit_bias, best_of > n, suffix) are refused with 400 rather than ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from absl import app, flags
from absl import logging as absl_logging
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from deltajax import jax_cache
from deltajax.serve.engine import Engine, EngineError, Event, InvalidRequestError

log = logging.getLogger(__name__)

MAX_N = 16


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict:
    """The OpenAI error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _error(status: int, message: str, **kw) -> JSONResponse:
    return JSONResponse(error_body(message, **kw), status_code=status)


# --------------------------------------------------------------------------- request parsing


def _field(body: dict, name: str, kinds: tuple, default: Any = None, *, what: str = "") -> Any:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) and bool not in kinds:
        raise InvalidRequestError(f"{name} must be {what}, got {v!r}", param=name)
    if not isinstance(v, kinds):
        raise InvalidRequestError(f"{name} must be {what}, got {v!r}", param=name)
    return v


def _common(body: dict, *, chat: bool) -> tuple[int, bool, bool, dict]:
    """(n, stream, include_usage, engine.submit kwargs) of a completion request body."""
    if body.get("model") is None:
        raise InvalidRequestError("model is required", param="model")
    model = _field(body, "model", (str,), what="a string")
    n = _field(body, "n", (int,), 1, what="an integer")
    if not 1 <= n <= MAX_N:
        raise InvalidRequestError(f"n must be in [1, {MAX_N}], got {n}", param="n")
    stream = _field(body, "stream", (bool,), False, what="a boolean")
    opts = _field(body, "stream_options", (dict,), {}, what="an object")
    if opts and not stream:
        raise InvalidRequestError("stream_options needs stream=true", param="stream_options")
    include_usage = bool(opts.get("include_usage", False))
    names = ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
    max_tokens, mt_name = None, names[-1]
    for name in names:
        if body.get(name) is not None:
            max_tokens, mt_name = _field(body, name, (int,), what="an integer"), name
            break
    else:
        if not chat:
            max_tokens = 16  # the OpenAI completions default
    if max_tokens is not None and max_tokens < 1:
        raise InvalidRequestError(f"{mt_name} must be >= 1, got {max_tokens}", param=mt_name)
    for name, bad in [("logprobs", lambda v: v not in (None, False, 0)),
                      ("top_logprobs", lambda v: v not in (None, 0)),
                      ("echo", lambda v: v not in (None, False)),
                      ("presence_penalty", lambda v: v not in (None, 0, 0.0)),
                      ("frequency_penalty", lambda v: v not in (None, 0, 0.0)),
                      ("repetition_penalty", lambda v: v not in (None, 1, 1.0)),
                      ("logit_bias", lambda v: v not in (None, {})),
                      ("suffix", lambda v: v not in (None, "")),
                      ("best_of", lambda v: v not in (None, 1, n)),
                      ("tools", lambda v: v not in (None, [])),
                      ("response_format", lambda v: v not in (None, {"type": "text"}))]:
        if name in body and bad(body[name]):
            raise InvalidRequestError(f"{name}={body[name]!r} is not supported by this server",
                                      param=name, code="unsupported_parameter")
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or (
            isinstance(stop, list) and all(isinstance(s, str) for s in stop))):
        raise InvalidRequestError("stop must be a string or a list of strings", param="stop")
    kw = dict(
        model=model, max_tokens=max_tokens,
        temperature=_field(body, "temperature", (int, float), 1.0, what="a number"),
        top_p=_field(body, "top_p", (int, float), 1.0, what="a number"),
        top_k=_field(body, "top_k", (int,), 0, what="an integer"),
        seed=_field(body, "seed", (int,), None, what="an integer"),
        stop=stop,
        stop_token_ids=_field(body, "stop_token_ids", (list,), [], what="a list of token ids"),
        ignore_eos=_field(body, "ignore_eos", (bool,), False, what="a boolean"),
    )
    if kw["max_tokens"] is not None and mt_name != "max_tokens":
        kw["max_tokens_param"] = mt_name
    return n, stream, include_usage, kw


def _prompts(body: dict) -> list:
    p = body.get("prompt")
    if p is None:
        raise InvalidRequestError("prompt is required", param="prompt")
    if isinstance(p, str):
        return [p]
    if isinstance(p, list) and p:
        if all(isinstance(x, str) for x in p):
            return list(p)
        if all(isinstance(x, int) and not isinstance(x, bool) for x in p):
            return [p]
        if all(isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool)
                                                  for t in x) for x in p):
            return list(p)
    raise InvalidRequestError("prompt must be a string, a list of strings, a list of token ids "
                              "or a list of lists of token ids (none empty)", param="prompt")


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise InvalidRequestError("messages must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InvalidRequestError(f"messages[{i}] must be an object with a role",
                                      param=f"messages[{i}]")
        c = m.get("content")
        if isinstance(c, list):  # content parts: text only
            parts = []
            for part in c:
                if not isinstance(part, dict) or part.get("type") != "text" or \
                        not isinstance(part.get("text"), str):
                    raise InvalidRequestError(f"messages[{i}].content: only text parts are "
                                              "supported", param=f"messages[{i}].content")
                parts.append(part["text"])
            c = "".join(parts)
        if c is None:
            c = ""
        if not isinstance(c, str):
            raise InvalidRequestError(f"messages[{i}].content must be a string or text parts",
                                      param=f"messages[{i}].content")
        out.append({"role": m["role"], "content": c})
    return out


async def _json_body(request: Request) -> dict:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidRequestError(f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    return body


# --------------------------------------------------------------------------------- the app


class _Run:
    """The engine requests of one HTTP request and their events, bridged into asyncio."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.reqs: list = []

    def submit(self, items: list, n: int, kw: dict, *, chat: bool) -> None:
        """Queue n choices per item; all or nothing (a refusal cancels those already queued)."""
        if self.engine.queue_capacity() < len(items) * n:
            from deltajax.serve.engine import QueueFullError

            raise QueueFullError(f"the request queue cannot take {len(items) * n} more "
                                 f"sequences now ({self.engine.max_queue} at most waiting); "
                                 "retry later", code="queue_full")
        kw = dict(kw)
        mt_param = kw.pop("max_tokens_param", None)
        try:
            for item in items:
                for c in range(n):
                    i = len(self.reqs)
                    self.reqs.append(self.engine.submit(
                        item, **kw, choice=c, chat=chat,
                        on_event=lambda ev, i=i: self.loop.call_soon_threadsafe(
                            self.queue.put_nowait, (i, ev))))
        except EngineError as e:
            self.cancel()
            if mt_param and e.param == "max_tokens":
                e.param = mt_param
            raise

    def cancel(self) -> None:
        for r in self.reqs:
            if not r.done:
                r.cancel()


def create_app(engine: Engine, *, start_engine: bool = True,
               api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving `engine` (started in its background thread at startup).

    With `api_key`, every /v1/ request must send ``Authorization: Bearer <api_key>`` (401
    otherwise); /health and /metrics stay open.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if start_engine:
            engine.start()
        try:
            yield
        finally:
            if start_engine:
                engine.stop()

    app = FastAPI(title="deltajax", lifespan=lifespan)
    http_errors: Counter = Counter()
    created = int(time.time())

    if api_key:
        @app.middleware("http")
        async def _auth(request: Request, call_next):
            if request.url.path.startswith("/v1/") and \
                    request.headers.get("authorization") != f"Bearer {api_key}":
                http_errors[401] += 1
                return _error(401, "invalid or missing API key (Authorization: Bearer ...)",
                              type="authentication_error", code="invalid_api_key")
            return await call_next(request)

    @app.exception_handler(EngineError)
    async def _engine_error(request, e: EngineError):
        http_errors[e.status] += 1
        return _error(e.status, e.message, type=e.type, param=e.param, code=e.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        http_errors[e.status_code] += 1
        return _error(e.status_code, str(e.detail), code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        http_errors[400] += 1
        errs = e.errors()
        param = ".".join(str(x) for x in errs[0]["loc"][1:]) if errs else None
        return _error(400, f"invalid request: {errs}", param=param)

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        http_errors[500] += 1
        log.exception("internal error")
        return _error(500, f"internal error: {type(e).__name__}: {e}", type="server_error")

    @app.get("/health")
    async def health():
        if not engine.running:
            return _error(503, "the engine thread is not running", type="server_error")
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        names = engine.models()
        return {"object": "list", "data": [
            {"id": n, "object": "model", "created": created, "owned_by": "deltajax",
             "root": n, "parent": None if n == engine.base_name else engine.base_name}
            for n in names]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus_text(engine.metrics(), http_errors),
                                 media_type="text/plain; version=0.0.4")

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(request: Request):
        body = await _json_body(request)
        name = _field(body, "lora_name", (str,), None, what="a string")
        path = _field(body, "lora_path", (str,), None, what="a string")
        if not name:
            raise InvalidRequestError("lora_name is required", param="lora_name")
        if not path:
            raise InvalidRequestError("lora_path is required", param="lora_path")
        info = await asyncio.to_thread(engine.load, name, path)
        log.info("loaded %s from %s: %s", name, path, info)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(request: Request):
        body = await _json_body(request)
        name = _field(body, "lora_name", (str,), None, what="a string")
        if not name:
            raise InvalidRequestError("lora_name is required", param="lora_name")
        await asyncio.to_thread(engine.unload, name)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _json_body(request)
        n, stream, include_usage, kw = _common(body, chat=False)
        items = _prompts(body)
        return await _respond(engine, request, items, n, kw, chat=False, stream=stream,
                              include_usage=include_usage)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _json_body(request)
        n, stream, include_usage, kw = _common(body, chat=True)
        msgs = _messages(body)
        return await _respond(engine, request, [msgs], n, kw, chat=True, stream=stream,
                              include_usage=include_usage)

    return app


async def _respond(engine: Engine, request: Request, items: list, n: int, kw: dict, *,
                   chat: bool, stream: bool, include_usage: bool):
    run = _Run(engine)
    run.submit(items, n, kw, chat=chat)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    model = kw["model"]
    obj = "chat.completion" if chat else "text_completion"
    prompt_tokens = sum(run.reqs[i * n].prompt_tokens for i in range(len(items)))
    if stream:
        return StreamingResponse(_stream(run, rid, created, model, chat, include_usage,
                                         prompt_tokens),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    texts = [""] * len(run.reqs)
    finish: dict[int, Event] = {}
    try:
        while len(finish) < len(run.reqs):
            try:
                i, ev = await asyncio.wait_for(run.queue.get(), timeout=0.5)
            except TimeoutError:
                if await request.is_disconnected():
                    run.cancel()
                    return _error(499, "client disconnected", code="client_closed_request")
                continue
            texts[i] += ev.text
            if ev.finish_reason is not None:
                finish[i] = ev
    except BaseException:
        run.cancel()
        raise
    errors = [ev.error for ev in finish.values() if ev.finish_reason == "error"]
    if errors:
        return _error(500, f"generation failed: {errors[0]}", type="server_error")
    completion_tokens = sum(len(r.output_ids) for r in run.reqs)
    choices = []
    for i in range(len(run.reqs)):
        reason = finish[i].finish_reason
        if chat:
            choices.append({"index": i, "message": {"role": "assistant", "content": texts[i]},
                            "logprobs": None, "finish_reason": reason})
        else:
            choices.append({"index": i, "text": texts[i], "logprobs": None,
                            "finish_reason": reason})
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


async def _stream(run: _Run, rid: str, created: int, model: str, chat: bool,
                  include_usage: bool, prompt_tokens: int):
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(i, text=None, reason=None, role=False):
        if chat:
            d = {}
            if role:
                d["role"] = "assistant"
            if text is not None:
                d["content"] = text
            c = {"index": i, "delta": d, "logprobs": None, "finish_reason": reason}
        else:
            c = {"index": i, "text": text or "", "logprobs": None, "finish_reason": reason}
        out = {"id": rid, "object": obj, "created": created, "model": model, "choices": [c]}
        if include_usage:
            out["usage"] = None
        return _sse(out)

    done = 0
    try:
        if chat:
            for i in range(len(run.reqs)):
                yield chunk(i, "", role=True)
        while done < len(run.reqs):
            i, ev = await run.queue.get()
            if ev.finish_reason == "error":
                yield _sse(error_body(f"generation failed: {ev.error}", type="server_error"))
                return
            if ev.finish_reason is not None:
                done += 1
                if ev.text:
                    yield chunk(i, ev.text)
                yield chunk(i, None if chat else "", reason=ev.finish_reason)
            elif ev.text:
                yield chunk(i, ev.text)
        if include_usage:
            ct = sum(len(r.output_ids) for r in run.reqs)
            yield _sse({"id": rid, "object": obj, "created": created, "model": model,
                        "choices": [], "usage": {"prompt_tokens": prompt_tokens,
                                                 "completion_tokens": ct,
                                                 "total_tokens": prompt_tokens + ct}})
        yield "data: [DONE]\n\n"
    finally:  # client gone (cancelled), or finished: free whatever still runs
        run.cancel()


# ---------------------------------------------------------------------------------- metrics


def _label(v: Any) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus_text(m: dict, http_errors: Counter | None = None) -> str:
    """Prometheus exposition text of `Engine.metrics()` (plus HTTP error counts)."""
    st = m["stats"]
    lines: list[str] = []

    def metric(name, kind, help_, samples):
        lines.append(f"# HELP deltajax_{name} {help_}")
        lines.append(f"# TYPE deltajax_{name} {kind}")
        for labels, v in samples:
            lab = ",".join(f'{k}="{_label(x)}"' for k, x in labels.items())
            lines.append(f"deltajax_{name}{{{lab}}} {v}" if lab else f"deltajax_{name} {v}")

    metric("queue_length", "gauge", "Requests waiting for a decode slot.",
           [({}, m["queue_length"])])
    metric("active_slots", "gauge", "Decode slots in use.", [({}, m["active_slots"])])
    metric("slots", "gauge", "Decode slots.", [({}, m["slots"])])
    metric("tokens_per_second", "gauge", "Generated tokens per second over the last 10 s.",
           [({}, f"{m['tokens_per_s']:.3f}")])
    metric("generated_tokens_total", "counter", "Tokens generated.",
           [({}, st.get("generated_tokens", 0))])
    metric("requests_total", "counter", "Sequences submitted, per model (fine-tune or base).",
           [({"model": k}, v) for k, v in sorted(m["requests_per_model"].items())])
    metric("requests_finished_total", "counter", "Sequences finished, per finish reason.",
           [({"reason": k[len("finished_"):]}, v) for k, v in sorted(st.items())
            if k.startswith("finished_")])
    metric("requests_rejected_total", "counter", "Sequences refused because the queue was full.",
           [({"reason": "queue_full"}, st.get("rejected_queue_full", 0))])
    for key, help_ in [("prefills", "Prefills run."), ("decode_steps", "Decode steps run."),
                       ("decode_calls", "Decode device calls (decode_steps steps each)."),
                       ("evictions", "Idle fine-tunes evicted from a full pool."),
                       ("loads", "Fine-tunes registered."), ("unloads", "Fine-tunes unloaded.")]:
        metric(f"{key}_total", "counter", help_, [({}, st.get(key, 0))])
    metric("resident_finetunes", "gauge", "Fine-tunes resident on the device, per pool.",
           [({"pool": i, "layout": p["layout"]}, len(p["resident"]))
            for i, p in enumerate(m["pools"])])
    metric("registered_finetunes", "gauge", "Fine-tunes registered.",
           [({}, len(m["registered"]))])
    metric("compiled_executables", "gauge", "Executables compiled for the engine's steps.",
           [({"step": k}, v) for k, v in sorted(m["compiles"].items())])
    if http_errors is not None:
        metric("http_errors_total", "counter", "Error responses, per HTTP status.",
               [({"status": k}, v) for k, v in sorted(http_errors.items())])
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ serve


def parse_delta_specs(values: Sequence[str]) -> dict[str, str]:
    """{name: path} of 'name=path[,name=path...]' strings (the --delta flag).

    Raises:
      ValueError: an entry that is not name=path, a name given twice, or a path that is not a
        directory.
    """
    out: dict[str, str] = {}
    for v in (x.strip() for s in values for x in s.split(",")):
        if not v:
            continue
        name, sep, path = v.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise ValueError(f"entry {v!r} is not name=path")
        if name in out:
            raise ValueError(f"name {name!r} is given twice")
        p = Path(os.path.expanduser(path))
        if not p.is_dir():
            raise ValueError(f"{name}={path}: no such directory")
        out[name] = str(p)
    return out


def serve(engine: Engine, *, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info", api_key: str | None = None) -> None:
    """Run the server until interrupted (the engine thread starts with the app)."""
    import uvicorn

    uvicorn.run(create_app(engine, api_key=api_key), host=host, port=port, log_level=log_level,
                timeout_graceful_shutdown=5)

# ------------------------------------------------------------------------------ command line
# Serve a base model and its compressed fine-tunes (the `deltajax-serve` console entry):
# Serve a base model and its compressed fine-tunes over an OpenAI-compatible HTTP API.
#
# Example:
#   deltajax-serve --base=smollm2 --delta=math=/tmp/d-math,chat=/tmp/d-chat \
#       --slots=16 --max_len=2048 --pool=4 --port=8000
#   # (or: python scripts/serve.py ...), then:
#   curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \
#       -d '{"model": "math", "messages": [{"role": "user", "content": "12*7?"}]}'
#   curl http://127.0.0.1:8000/v1/load_lora_adapter -H 'Content-Type: application/json' \
#       -d '{"lora_name": "code", "lora_path": "/tmp/d-code"}'
#
# --base: an HF directory, a converted checkpoint or 'smollm2' (its own tokenizer is used);
# requests name it by --base_name (default: the directory's name). --delta: saved delta
# directories (scripts/compress.py) as name=path, comma separated or repeated; each is checked
# against the base's fingerprint. --slots decode slots of --max_len positions each (prompt +
# completion); --pool fine-tunes resident per pool (one pool per delta layout; the least recently
# used idle one is evicted when a pool is full). Listens on --host (default 127.0.0.1: only this
# machine) at --port; --api_key (or $DELTAJAX_API_KEY) requires a bearer key on /v1/. --mesh is
# refused: the serving engine runs on one device for now.
#
# The flags live here (not in scripts/serve.py) so that the `deltajax-serve` console entry and
# the script share them.

FLAGS = flags.FLAGS

def parse_deltas(values: list[str]) -> dict[str, str]:
    """`server.parse_delta_specs`, a mistake as SystemExit("error: ...")."""
    try:
        return parse_delta_specs(values)
    except ValueError as e:
        raise SystemExit(f"error: --delta {e}") from None


def _check_port(host: str, port: int) -> None:
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise SystemExit(f"error: cannot listen on {host}:{port}: {e.strerror or e}") from None


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every restore at INFO
    if FLAGS.mesh:
        raise SystemExit("error: --mesh is not implemented by the serving engine (it runs on one "
                         "device); serve without --mesh (scripts/generate.py --mesh shards "
                         "offline generation)")
    for name, lo in [("slots", 1), ("max_len", 2), ("pool", 1), ("max_queue", 1),
                     ("prefills_per_step", 1), ("default_max_tokens", 1), ("port", 0)]:
        if getattr(FLAGS, name) < lo:
            raise SystemExit(f"error: --{name} must be >= {lo}, got {getattr(FLAGS, name)}")
    if FLAGS.port > 65535:
        raise SystemExit(f"error: --port must be <= 65535, got {FLAGS.port}")
    try:
        buckets = [int(b) for b in FLAGS.prefill_buckets] or None
    except ValueError:
        raise SystemExit(f"error: --prefill_buckets must be integers, got "
                         f"{FLAGS.prefill_buckets}") from None
    if buckets and (max(buckets) != FLAGS.max_len or min(buckets) < 1):
        raise SystemExit(f"error: --prefill_buckets {buckets} must be >= 1 and end at "
                         f"--max_len={FLAGS.max_len}")
    deltas = parse_deltas(FLAGS.delta)
    _check_port(FLAGS.host, FLAGS.port)

    import jax

    from deltajax.io.resolve import describe, load_model

    t0 = time.perf_counter()
    try:
        base, cfg, tok, src = load_model(FLAGS.base)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: --base={FLAGS.base}: {e}") from None
    if tok is None:
        raise SystemExit(f"error: {src} has no tokenizer files (tokenizer.json / "
                         "tokenizer_config.json); serving needs the checkpoint's tokenizer")
    base_name = FLAGS.base_name or Path(src).name
    if base_name in deltas:
        raise SystemExit(f"error: --delta name {base_name!r} is the base's name (--base_name)")
    try:
        engine = Engine(base, cfg, tok, base_name=base_name, slots=FLAGS.slots,
                        max_len=FLAGS.max_len, pool_capacity=FLAGS.pool,
                        prefill_buckets=buckets, max_queue=FLAGS.max_queue,
                        prefills_per_step=FLAGS.prefills_per_step,
                        default_max_tokens=FLAGS.default_max_tokens,
                        implementation=FLAGS.implementation, dtype=FLAGS.dtype,
                        decode_steps=FLAGS.decode_steps, lookahead=FLAGS.lookahead)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    for name, path in deltas.items():  # checked against the stored base, before any cast
        try:
            info = engine.load(name, path)
        except EngineError as e:
            raise SystemExit(f"error: --delta {name}={path}: {e.message}") from None
        print(f"[serve] fine-tune {name}: {path} ({info['layout']})", flush=True)
    print(f"[serve] base {base_name} ({src}): {describe(cfg)}; {jax.devices()[0].device_kind}; "
          f"loaded in {time.perf_counter() - t0:.1f} s", flush=True)
    if FLAGS.warmup:
        print(f"[serve] compiled prefill buckets {list(engine.buckets)} and decode in "
              f"{engine.warmup():.1f} s", flush=True)
    print(f"[serve] {FLAGS.slots} slots x {FLAGS.max_len} positions; listening on "
          f"http://{FLAGS.host}:{FLAGS.port}/v1", flush=True)
    serve(engine, host=FLAGS.host, port=FLAGS.port, log_level=FLAGS.log_level,
          api_key=FLAGS.api_key or os.environ.get("DELTAJAX_API_KEY") or None)


def define_flags() -> None:
    """The command line's absl flags (defined on first use, so importing this module defines
    none: the HTTP app can be embedded in a program with flags of its own)."""
    if "slots" in FLAGS:
        return
    flags.DEFINE_string("base", None, "Base model: HF dir, converted checkpoint, or 'smollm2'.",
                        required=True)
    flags.DEFINE_string("base_name", None, "Model name of the bare base (default: the base "
                        "directory's name).")
    flags.DEFINE_multi_string("delta", [], "Fine-tunes as name=path (saved delta dirs); comma-"
                              "separated or repeated.")
    flags.DEFINE_integer("slots", 8, "Decode slots (concurrent sequences).")
    flags.DEFINE_integer("max_len", 2048, "Positions per slot: prompt + completion tokens.")
    flags.DEFINE_integer("pool", 4, "Fine-tunes resident at once per pool (delta layout).")
    flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
    flags.DEFINE_integer("port", 8000, "Port to listen on.")
    flags.DEFINE_string("mesh", None, "Device mesh: not implemented by the serving engine "
                        "(refused).")
    flags.DEFINE_integer("max_queue", 1024, "Waiting sequences at most; beyond, requests get 429.")
    flags.DEFINE_list("prefill_buckets", [], "Prompt lengths compiled for prefill (default 16, 32, "
                      "... up to --max_len; the last must be --max_len).")
    flags.DEFINE_integer("prefills_per_step", 1, "Prefills between two decode steps while "
                         "decoding.")
    flags.DEFINE_integer("decode_steps", 4, "Decode steps per device call: tokens reach the "
                         "host (and streams, stops, admissions are handled) every N steps; "
                         "outputs do not depend on it, larger hides the per-call host cost.")
    flags.DEFINE_bool("lookahead", True, "Dispatch the next decode call before reading the last "
                      "one's tokens (hides the host's share of a step; outputs do not depend on "
                      "it).")
    flags.DEFINE_integer("default_max_tokens", 256, "Completion length when a chat request sets "
                         "none (capped by the context).")
    flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                      "Cast the base weights to this dtype after loading (default: keep).")
    flags.DEFINE_enum("implementation", "auto", ["auto", "xla", "pallas_gpu", "pallas_tpu"],
                      "Multi-tenant delta kernels.")
    flags.DEFINE_bool("warmup", True, "Compile every prefill bucket and the decode step before "
                      "listening.")
    flags.DEFINE_string("api_key", None, "Require 'Authorization: Bearer <key>' on /v1/ requests "
                        "(default: the DELTAJAX_API_KEY environment variable, else open).")
    flags.DEFINE_enum("log_level", "info", ["critical", "error", "warning", "info", "debug"],
                      "uvicorn log level.")


def run():
    """Console entry point (`deltajax-serve`, `scripts/serve.py`)."""
    define_flags()
    jax_cache.enable()  # compiled prefill buckets and the decode step survive a restart
    app.run(main)
