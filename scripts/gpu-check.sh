#!/usr/bin/env bash
# The GPU numbers in one command (about 8 minutes on an H200; see docs/benchmarks.md):
#
#   scripts/gpu-check.sh OUT_DIR [--wheels DIR] [attnctl gpu-check options]
#
# On a machine without network access, carry the wheels made by scripts/gpu-wheels.sh DIR
# and pass --wheels DIR: they are installed into $ATTNCTL_SITE (/tmp/attnctl-site) and put
# on PYTHONPATH. Without --wheels, attnctl and its dependencies must be installed already.
# Runs from the repository root (tests/test_gpu.py is one of the parts), with $PYTHON
# (python3). Exits 0 when every part that ran succeeded, 1 when one failed or was stopped,
# 2 when attnctl cannot run at all.
set -euo pipefail
t0=$(date +%s.%N)
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
python=${PYTHON:-python3}

usage="usage: scripts/gpu-check.sh OUT_DIR [--wheels DIR] [attnctl gpu-check options, e.g. --arch tiny]"
if [[ $# -lt 1 || $1 == -* ]]; then
  echo "$usage" >&2
  exit 2
fi
out=$1
shift
wheels=""
args=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --wheels) wheels=${2:?--wheels needs the folder made by scripts/gpu-wheels.sh}; shift 2 ;;
    --wheels=*) wheels=${1#--wheels=}; shift ;;
    *) args+=("$1"); shift ;;
  esac
done

if [[ -n $wheels ]]; then
  site=${ATTNCTL_SITE:-/tmp/attnctl-site}
  "$python" scripts/install_wheels.py "$wheels" "$site"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

# fail here, in one line, rather than in every part
if ! "$python" - <<'PY'
import importlib.metadata as md
import diffusers, omegaconf, attnctl, harmonpaint_recipe.runner  # noqa: F401
names = {e.name for e in md.entry_points(group="attnctl.strategies")}
missing = {"region_mask", "kv_bank", "latent_guidance", "timestep_gate"} - names
assert not missing, f"built-in strategies not registered: {sorted(missing)} (attnctl is not installed)"
PY
then
  echo "gpu-check: attnctl cannot run here; install it (pip install -e .) or pass --wheels DIR" \
    "(made by scripts/gpu-wheels.sh DIR)" >&2
  exit 2
fi

exec "$python" -m attnctl gpu-check "$out" --t0 "$t0" ${args[@]+"${args[@]}"}
