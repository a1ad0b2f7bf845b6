#!/usr/bin/env bash
# Lint and format checks (CI runs them): ruff (format and lint, settings in pyproject.toml) over the Python
# tree, clang-format (.clang-format) over csrc/. Tools pinned in the "lint" extra: pip install -e ".[lint]".
# Fix in place: ruff format . && ruff check --fix . && clang-format -i $(git ls-files 'csrc/*')
set -euo pipefail
cd "$(dirname "$0")/.."
ruff format --check .
ruff check .
clang-format --dry-run --Werror $(git ls-files 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.cuh')
echo "lint: ruff and clang-format clean"
