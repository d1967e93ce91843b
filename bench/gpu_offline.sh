#!/usr/bin/env bash
# bench/gpu_check.py on a GPU machine that has Python, CUDA PyTorch and the scientific stack
# (numpy, pandas, pyarrow, psutil, safetensors, nvidia-ml-py, click, matplotlib) but no network,
# as GPU images often are. It lacks epochd's other dependencies; they travel as wheels (3 MB).
#
#   bench/gpu_offline.sh fetch [PYTHON_VERSION]   on a machine with network: wheels into .whl/
#                                                  for that Python (default 3.12, x86_64 Linux)
#   bench/gpu_offline.sh run [gpu_check.py args]  on the GPU machine, from the repository root
#                                                  with .whl/ copied along: install them into a
#                                                  scratch folder, then run the checks
#
# The versions are the ones `make test` runs with. TensorFlow is not among them: its wheel is
# hundreds of MB; without it gpu_check.py reports the TensorFlow checks as skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
        orjson==3.13.0 watchdog==7.1.0)
SITE=${EPOCHD_GPU_SITE:-/tmp/epochd-gpu-site}   # where they are installed
WHEELS_DIR=${EPOCHD_GPU_WHEELS:-.whl}            # where they are kept

case "${1:-}" in
  fetch)
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "${2:-3.12}" \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d "$WHEELS_DIR" "${WHEELS[@]}"
    ls "$WHEELS_DIR"
    ;;
  run)
    shift
    python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$WHEELS_DIR"/*.whl
    # the daemon and its workers are started with this Python and inherit the path
    export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
    exec python3 bench/gpu_check.py "$@"
    ;;
  *)
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
