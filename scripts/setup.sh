#!/usr/bin/env bash
# Sets up a fresh machine (Python >= 3.10 + pip) for mlcrl_tf; idempotent.
#   - Debian's dataset-fashion-mnist (real photos for the demo and tests), via apt when root
#   - a virtualenv at .venv with mlcrl_tf installed editable, TensorFlow CPU build and test tools
# Source it (". scripts/setup.sh") to keep the venv active.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== installing dataset-fashion-mnist (Debian)"
    apt-get update -qq >/dev/null || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "== Fashion-MNIST not found under /usr/share/datasets/fashion-mnist;" \
         "pipelines.fashion_mnist will try ~/.keras/datasets and a download."
  fi
fi

python_bin="${PYTHON:-python3}"
if [ ! -x "$repo/.venv/bin/python" ]; then
  echo "== creating $repo/.venv"
  "$python_bin" -m venv "$repo/.venv"
fi
# shellcheck disable=SC1091
. "$repo/.venv/bin/activate"
if ! python -c "import mlcrl_tf, pytest, sklearn, tensorflow_datasets" >/dev/null 2>&1 \
    || ! python -m ruff --version >/dev/null 2>&1; then
  echo "== installing mlcrl_tf[test] (tensorflow-cpu 2.21, keras 3, ...)"
  python -m pip install -q --upgrade pip >/dev/null
  python -m pip install -q -e "$repo[test]"
fi
# KerasHub (Python >= 3.11) for the keras_hub backbone tests: its other dependencies
# from the extra, then keras-hub itself without dependencies, since it requires
# tensorflow-text, which would bring the full `tensorflow` next to tensorflow-cpu
# (docs/ecosystem.md).
if python -c "import sys; sys.exit(sys.version_info < (3, 11))" \
    && ! python -c "import keras_hub" >/dev/null 2>&1; then
  echo "== installing keras-hub without tensorflow-text"
  python -m pip install -q -e "$repo[test,keras_hub]"
  python -m pip install -q --no-deps "keras-hub==0.32.0"
fi
# tf2onnx + onnxruntime for the ONNX export tests (the `onnx` extra).
if ! python -c "import tf2onnx, onnxruntime" >/dev/null 2>&1; then
  echo "== installing the ONNX extra (tf2onnx, onnx, onnxruntime)"
  python -m pip install -q -e "$repo[test,onnx]"
fi
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
