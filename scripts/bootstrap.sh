#!/usr/bin/env bash
# Installs everything glyphserve needs on a fresh Debian/Ubuntu machine, then runs it.
#   bash scripts/bootstrap.sh run  [glyphserve serve options]   -> web UI + API on http://127.0.0.1:7860
#   bash scripts/bootstrap.sh test [pytest options]             -> the whole test suite
# Safe to rerun: installed pieces are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

mode="${1:-}"
case "$mode" in
  run|test) shift ;;
  *) echo "usage: bash scripts/bootstrap.sh run|test [args...]" >&2; exit 2 ;;
esac

VENV="${GLYPHSERVE_VENV:-.venv}"
TORCH_VERSION="${GLYPHSERVE_TORCH_VERSION:-2.13.0}"

# Debian packages: fonts (English + Chinese, with a TrueType CJK font for the reference renderer),
# poppler (reference rasteriser), and for tests chromium (browser tests) and tesseract (OCR legibility).
debs=(python3-venv fonts-dejavu-core fonts-noto-cjk fonts-wqy-microhei poppler-utils)
if [ "$mode" = test ]; then debs+=(chromium tesseract-ocr tesseract-ocr-eng tesseract-ocr-chi-sim); fi
missing=()
for pkg in "${debs[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null; then
    sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
    echo "installing Debian packages: ${missing[*]}"
    $sudo_cmd apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "warning: apt-get not found; install ${missing[*]} yourself" >&2
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  # pyproject's requires-python: 3.11 or 3.12. A newer or older python3 would fail much later, inside pip.
  python="${GLYPHSERVE_PYTHON:-}"
  if [ -z "$python" ]; then
    for candidate in python3 python3.12 python3.11; do
      if command -v "$candidate" >/dev/null &&
         "$candidate" -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 12))'; then
        python="$candidate"; break
      fi
    done
  fi
  if [ -z "$python" ]; then
    echo "error: glyphserve needs Python 3.11 or 3.12, and python3 here is $(python3 --version 2>&1);" \
         "install python3.12 and python3.12-venv (or point GLYPHSERVE_PYTHON at one)" >&2
    exit 2
  fi
  "$python" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==$TORCH_VERSION"
fi
extras="engine,serve,eval"
[ "$mode" = test ] && extras="engine,serve,eval,test,cluster"
"$PY" -m pip install -q -e ".[${extras}]"

export GRADIO_ANALYTICS_ENABLED=False HF_HUB_DISABLE_TELEMETRY=1
if [ "$mode" = run ]; then
  exec "$VENV/bin/glyphserve" serve --host 127.0.0.1 --port 7860 "$@"
else
  exec "$PY" -m pytest "$@"
fi
