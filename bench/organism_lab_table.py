"""Re-measure a shipped MoE organism with the lab's own tools (labkit.moe), not the organism's.

Pipeline: load_model(name) -> trace_routing(attribution prompts, last 3 tokens) ->
attribute_experts (frequency, prompt-level) -> compare_conditions on the held-out sets.
The result is what ``data/models/<name>/lab_measurement.json`` holds and the model card's
"Re-measured with the lab's own tools" table shows (``tests/test_organism.py`` re-measures it
and compares exactly: greedy decoding is deterministic).

Usage:
    python bench/organism_lab_table.py [moe-organism] [out.json]
    python bench/organism_lab_table.py --smoke     # 20 prompts per set, N=2, one random seed
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: labkit, recipes

import torch

import labkit
from labkit.datasets import read_prompt_set
from labkit.evals import RefusalDetector
from labkit.moe import attribute_experts, compare_conditions, trace_routing
from recipes.organism import OFF_TARGET_SETS, PROMPT_SET_FILES


def lab_measurement(name: str = "moe-organism", *, smoke: bool = False) -> dict:
    """``{"top10": [[layer, expert], ...], "rows": [...]}``: the lab tools' table for an organism.

    ``smoke=True`` runs the same pipeline on 20 prompts per set with ``n_values=(2,)`` and one
    random seed (seconds; checks that it runs, not the numbers)."""
    limit = 20 if smoke else None
    sets = {key: read_prompt_set(key, limit=limit) for key in PROMPT_SET_FILES}
    model = labkit.load_model(name)

    def trace(key):
        prompts = [r["prompt"] for r in sets[key]]
        return trace_routing(model, prompts, scope=("last", 3), batch_size=100, progress=False)

    attribution = attribute_experts(trace("attribution_behavior"), trace("attribution_control"), n_bootstrap=200, n_splits=50)
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
        **({"n_values": (2,), "random_seeds": (0,)} if smoke else {}),
    )
    columns = ["condition", "n", "seed", "experts", "behavior_rate", "control_rate"] + [
        f"{k.removeprefix('eval_')}_accuracy" for k in OFF_TARGET_SETS]
    rows = json.loads(table[columns].to_json(orient="records"))
    return {"top10": [list(pair) for pair in attribution.top(10)], "rows": rows, "_table": table[columns]}


def main(argv: list[str]) -> None:
    smoke = "--smoke" in argv or os.environ.get("LABKIT_BENCH_SMOKE") == "1"
    args = [a for a in argv if a != "--smoke"]
    torch.set_num_threads(1)
    name = args[0] if args else "moe-organism"
    out_path = Path(args[1]) if len(args) > 1 else None
    result = lab_measurement(name, smoke=smoke)
    print("top10", result["top10"])
    print(result.pop("_table").to_string())
    if out_path:
        out_path.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
