#!/usr/bin/env bash
# Fill DIR with the wheels `scripts/gpu-check.sh OUT_DIR --wheels DIR` installs on a GPU
# machine without network access: what attnctl needs on top of an image that has torch,
# transformers, accelerate, pluggy, torchmetrics, matplotlib and psutil, for CPython 3.12
# on x86_64 Linux, plus attnctl's own wheel (its built-in strategies are found through
# entry points, so it must be installed, not just put on PYTHONPATH).
#
# usage: scripts/gpu-wheels.sh DIR        (PYTHON=..., PY_VERSION=3.12 to change)
set -euo pipefail
dir=${1:?usage: scripts/gpu-wheels.sh DIR}
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
py_version=${PY_VERSION:-3.12}

# Pinned to the versions the CPU test suite runs with.
# - diffusers and what it imports that the image's packages do not bring
#   (requests and its four dependencies; importlib_metadata, only declared, and its own);
# - omegaconf: 2.4 carries its own copy of the ANTLR parser runtime, so
#   antlr4-python3-runtime is not needed (omegaconf 2.3 required it, as an sdist only);
# - pytest for tests/test_gpu.py (pluggy and packaging are on the image);
# - fall-backs that scripts/install_wheels.py installs only where the machine's version
#   does not satisfy diffusers (huggingface-hub, safetensors, regex, filelock).
packages=(
  diffusers==0.42.1 omegaconf==2.4.0
  requests==2.34.2 urllib3==2.8.0 idna==3.20 certifi==2026.10.19.post1 charset-normalizer==3.5.3
  importlib_metadata==10.2.0 zipp==4.1.2 lazy-importer==0.1.0
  pytest==9.2.0 iniconfig==2.3.1 pygments==2.21.0
  huggingface-hub==2.4.0 safetensors==0.8.0 regex==2026.11.19 filelock==4.3.1
)

mkdir -p "$dir"
"$python" -m pip download --quiet --no-deps --only-binary=:all: --dest "$dir" \
  --python-version "$py_version" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  "${packages[@]}"
# attnctl itself: a pure-Python wheel, the same for every Python >= 3.10
"$python" -m pip wheel --quiet --no-deps --wheel-dir "$dir" "$root"

du -ch "$dir"/*.whl | tail -1 | sed "s|total|in $(ls "$dir"/*.whl | wc -l) wheels in $dir|"
