#!/usr/bin/env bash
# The CUDA checks of the core, emulator and recipe issues, as one script (results under $OUT).
#   OUT=gpu-results bash bench/gpu_checks.sh
# Needs a CUDA machine with torch, lightning, transformers; carry jsonargparse (+ docstring-parser,
# typeshed-client, importlib_resources) and diffusers wheels where they are missing.
set -u
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline MPLBACKEND=Agg
export LIGHTNING_DFA_CACHE="$OUT/cache"
step() { echo "=== $1"; shift; start=$(date +%s); timeout "$@"; echo "=== rc=$? in $(( $(date +%s) - start )) s"; }

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, lightning, transformers; print(torch.__version__, lightning.__version__, transformers.__version__)"
} > "$OUT/machine.txt" 2>&1

# 1. Tests: the CUDA ones, and the engine's exactness on this torch / transformers.
step "pytest cuda + engine" 100 python3 -m pytest -q -p no:cacheprovider tests/test_lightning.py::test_dfa_strategy_trains_on_cuda \
  tests/test_feedback_gradients.py tests/test_feedback_models.py tests/test_projectors.py > "$OUT/pytest.txt" 2>&1
# 2. DFA versus backprop step time and memory on CUDA.
step "bench/step.py" 45 python3 bench/step.py --device cuda --json "$OUT/step.json" > "$OUT/step.txt" 2>&1
# 3. Projectors at the sizes, with CPU and CUDA matrices compared.
step "bench/projectors.py" 120 python3 bench/projectors.py --device cuda --repeats 3 --check-devices \
  --json "$OUT/projectors.json" > "$OUT/projectors.txt" 2>&1
# 4. The quick start recipe on the GPU, DFA alone (the CLI end to end).
step "quickstart on cuda" 90 python3 -m lightning_dfa.cli fit --config quickstart --baselines='[]' --trainer.logger=false \
  --trainer.enable_progress_bar=false --trainer.max_steps=200 --trainer.default_root_dir="$OUT/quickstart" \
  > "$OUT/quickstart.txt" 2>&1
tail -n 3 "$OUT"/*.txt
