#!/usr/bin/env bash
# Set up moe_tut on a RunPod (or any CUDA) machine that already has PyTorch, then check the GPU.
#   bash docker/runpod_setup.sh
# The same install the Dockerfile runs. pyproject.toml is the one list of dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch; print('PyTorch', torch.__version__, '| CUDA available:', torch.cuda.is_available())"
python -m pip install --upgrade pip
python -m pip install -e ".[notebooks]"
python -m moe_tut.bench --list
