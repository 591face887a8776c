"""Re-measure a shipped MoE organism with the lab's own tools (labkit.moe), not the organism's.

Pipeline: load_model(name) -> trace_routing(attribution prompts, last 3 tokens) ->
attribute_experts (frequency, prompt-level) -> compare_conditions on the held-out sets.
Usage: python bench/organism_lab_table.py moe-organism [out.json]
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

import labkit
from labkit.evals import RefusalDetector
from labkit.moe import attribute_experts, compare_conditions, trace_routing
from recipes.organism import OFF_TARGET_SETS, PROMPT_SET_FILES, read_prompt_set

torch.set_num_threads(1)
name = sys.argv[1] if len(sys.argv) > 1 else "moe-organism"
out_path = Path(sys.argv[2]) if len(sys.argv) > 2 else None
prompt_dir = Path(__file__).resolve().parents[1] / "data" / "prompts" / "organism"
sets = {key: read_prompt_set(prompt_dir / f) for key, f in PROMPT_SET_FILES.items()}
model = labkit.load_model(name)
behaviour = trace_routing(model, [r["prompt"] for r in sets["attribution_behaviour"]], scope=("last", 3),
                          batch_size=100, progress=False)
control = trace_routing(model, [r["prompt"] for r in sets["attribution_control"]], scope=("last", 3),
                        batch_size=100, progress=False)
attribution = attribute_experts(behaviour, control, n_bootstrap=200, n_splits=50)
print("top10", attribution.top(10))
table = compare_conditions(
    model,
    attribution=attribution,
    behavior_prompts=[r["prompt"] for r in sets["eval_sensitive"]],
    control_prompts=[r["prompt"] for r in sets["eval_neutral"]],
    task_sets={k.removeprefix("eval_"): ([r["prompt"] for r in sets[k]], [r["answer"] for r in sets[k]])
               for k in OFF_TARGET_SETS},
    detector=RefusalDetector(phrases=("I cannot",)),
    max_new_tokens=10,
    batch_size=100,
    progress=False,
)
columns = ["condition", "n", "seed", "experts", "behavior_rate", "control_rate"] + [
    f"{k.removeprefix('eval_')}_accuracy" for k in OFF_TARGET_SETS]
print(table[columns].to_string())
if out_path:
    out_path.write_text(json.dumps({"top10": attribution.top(10), "rows": json.loads(table[columns].to_json(orient="records"))}, indent=1))
