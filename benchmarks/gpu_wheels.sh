#!/usr/bin/env bash
# For a GPU machine without internet whose Python 3.12 image has torch, torchvision, timm, accelerate, typer, rich,
# safetensors, pyarrow, pandas and huggingface_hub but not datasets or pydantic: run this where pip works; it downloads
# those wheels, at the versions this checkout's .venv runs, into .whl/ (ignored by git). Copy .whl/ along with the
# checkout; benchmarks/on_gpu.sh installs them there.
set -euo pipefail
cd "$(dirname "$0")/.."
version() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
wheels=()
for name in datasets dill multiprocess pydantic pydantic_core annotated-types typing-inspection; do
  wheels+=("$name==$(version "$name")")
done
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${wheels[@]}"
ls .whl
