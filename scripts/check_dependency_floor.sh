#!/usr/bin/env bash
# The dependency floors pyproject.toml declares, checked: a venv over this interpreter's packages with
# diffusers, transformers, accelerate and peft at their floor versions, running the tests that exercise them
# (the wandb and datasets tests need a newer huggingface-hub than transformers 4.40 allows: left out).
#   bash scripts/check_dependency_floor.sh      (a few minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${TMPDIR:-/tmp}/rglcd-floor-venv
[ -x "$venv/bin/python" ] || python3 -m venv --system-site-packages "$venv"
"$venv/bin/python" -m pip install -q "diffusers==0.30.3" "transformers==4.40.0" "accelerate==0.30.1" "peft==0.10.0" \
  "huggingface_hub<0.26"
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_schedulers.py tests/test_lcd.py tests/test_train_cli.py \
  tests/test_train_step.py tests/test_train_trainer.py tests/test_sample.py tests/test_reward_models.py \
  tests/test_lrm_pretrain.py -k "not tracker and not two_processes"
