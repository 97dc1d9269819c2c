r"""Serve a base model and its compressed fine-tunes over an OpenAI-compatible HTTP API.

Example:
  python scripts/serve.py --base=smollm2 --delta=math=/tmp/d-math,chat=/tmp/d-chat \
      --slots=16 --max_len=2048 --pool=4 --port=8000
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
      -d '{"model": "math", "prompt": "12*7=", "max_tokens": 8, "temperature": 0}'

Same program as the `deltajax-serve` console entry (`deltajax.serve.server.run`); `--help`
lists the flags.
"""

from __future__ import annotations

from deltajax.serve.server import run

if __name__ == "__main__":
    run()
