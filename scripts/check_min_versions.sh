#!/usr/bin/env bash
# Run the fast tests against the lowest versions pyproject.toml declares.
#
# Makes a fresh virtualenv, installs torch (TORCH_SPEC, default the local CPU wheel torch==2.13.0:
# other torch builds pull gigabytes of CUDA packages), then lensmat with every other direct
# dependency pinned to its declared lower bound (`name>=X` -> `name==X`), and runs the tests that do
# not need the bundled models' slow runs. Usage: bash scripts/check_min_versions.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg
VENV="${LENSMAT_MIN_VENV:-$(mktemp -d)/venv}"
python3 -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
PINS="$(dirname "$VENV")/min-constraints.txt"
python - "$PINS" <<'EOF'
import re, sys, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
pins = []
for dep in deps:
    m = re.match(r"^([A-Za-z0-9_.-]+)\s*>=\s*([^,;\s]+)", dep)
    if m and m.group(1) != "torch":
        pins.append(f"{m.group(1)}=={m.group(2)}")
open(sys.argv[1], "w").write("\n".join(pins) + "\n")
print("pinned:", ", ".join(pins))
EOF
python -m pip install -q -c "$PINS" -e ".[dev]"
python -m pip list 2>/dev/null | grep -iE "^(torch|transformers|transformer-lens|tokenizers|numpy|safetensors|gguf) "
python -m pytest -q -m "not slow and not real_model and not gemma" "$@"
