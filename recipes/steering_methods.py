"""Where ActAdd holds, and the steering methods compared: the draft of notebook 02's next sections.

Run: ``HF_HUB_OFFLINE=1 PYTHONPATH=. python -m recipes.steering_methods`` (``LABKIT_FULL_SWEEP=1``
for the bigger grid). On SmolLM2-135M-Instruct it

1. sweeps ActAdd over layer x coefficient for three topics (wedding, love, hate) in one batch per
   topic (``topic_steering_sweep``: ``labkit.generate(..., steering_per_row=...)``), printing
   topic fraction, held-out perplexity and each vector's anti-steerable fraction (Tan et al. 2024);
2. picks per topic the best setting within 1.2x the unsteered perplexity;
3. compares ActAdd, mean difference, PCA and probe directions on held-out prompts at that layer;
4. projects the wedding direction out at every layer on wedding prompts (directional ablation).

Figures: ``labkit.viz.sweep_heatmap``, ``steerability_plot``, ``steering_tradeoff`` of the tables.
Not yet measured on 2 shared cores in the time of issue 13 (the run takes ~10 CPU-minutes).
"""

from __future__ import annotations

import os

import pandas as pd

import labkit
from labkit import evals


def main() -> None:
    FULL = os.environ.get("LABKIT_FULL_SWEEP") == "1"
    model = labkit.load_model("smollm2-135m-instruct")
    data = evals.load_steering_data()
    if FULL:
        layers, coefficients, samples, new_tokens = [1, 2, 4, 6, 8, 10, 14, 18], [1, 2, 4, 8, 16], 4, 40
    else:
        layers, coefficients, samples, new_tokens = [3, 6, 10], [2, 4, 8], 2, 20
    sweep_prompts, heldout_prompts = list(data.neutral_prompts[:6]), list(data.neutral_prompts[8:14])
    topics = {"wedding": (" wedding", " ", "wedding"), "love": ("Love", "Hate", "love"), "hate": ("Hate", "Love", "hate")}
    settings = dict(heldout_texts=data.heldout_texts[:6], samples_per_prompt=samples, max_new_tokens=new_tokens, seed=0)
    sweeps, per_prompt = {}, {}
    for topic, (plus, minus, words) in topics.items():
        vectors = [labkit.actadd(model, plus, minus, layer=layer) for layer in layers]
        sweeps[topic], per_prompt[topic] = evals.topic_steering_sweep(
            model, vectors, coefficients, prompts=sweep_prompts, topic_words=data.topic_words[words],
            per_prompt=True, **settings)
        print(f"== {topic}: ActAdd {plus!r} - {minus!r}, {words}-word fraction")
        print(sweeps[topic].round({"topic_fraction": 3, "perplexity": 1, "anti_steerable_fraction": 2}).to_string(index=False))

    # -- where ActAdd holds: best setting within 1.2x the unsteered perplexity; per-prompt steerability
    def holds(table, budget=1.2):
        base = table.iloc[0]
        ok = table[(table.method != "unsteered") & (table.perplexity <= budget * base.perplexity)]
        return ok.sort_values(["topic_fraction", "perplexity"], ascending=[False, True]).iloc[0]
    where = {topic: holds(table) for topic, table in sweeps.items()}
    for topic, row in where.items():
        base = sweeps[topic].iloc[0]
        print(f"{topic}: holds best at layer {row.layer}, c={row.coefficient:g}: fraction {row.topic_fraction:.3f} "
              f"(unsteered {base.topic_fraction:.3f}), perplexity {row.perplexity:.1f} (unsteered {base.perplexity:.1f})")
    slopes = pd.concat([evals.steerability(per_prompt[t]).assign(topic=t) for t in topics], ignore_index=True)
    anti = slopes.groupby(["topic", "layer"]).slope.apply(lambda s: (s < 0).mean()).unstack()
    print(anti.round(2))

    # -- the methods compared on held-out prompts, at the layer where wedding-ActAdd held
    layer = int(where["wedding"].layer)
    positives, negatives = data.contrast_pairs["wedding"]
    contrast = dict(layer=layer, token="mean")
    methods = [
        labkit.actadd(model, " wedding", " ", layer=layer),
        labkit.mean_difference(model, positives, negatives, **contrast),
        labkit.pca_direction(model, positives, negatives, **contrast),
        labkit.probe_direction(model, positives, negatives, **contrast),
    ]
    for v in methods[1:]:
        print(v.source["method"], "norm", round(float(v.activations.norm()), 1),
              {k: round(v.source[k], 3) for k in ("explained_variance_ratio", "train_accuracy") if k in v.source})
    comparison = evals.topic_steering_sweep(model, methods, [1, 2, 4], prompts=heldout_prompts,
                                            topic_words=data.topic_words["wedding"], **settings)
    print(comparison.round({"topic_fraction": 3, "perplexity": 1, "anti_steerable_fraction": 2}).to_string(index=False))

    # -- directional ablation of the wedding direction on wedding prompts
    wedding_prompts = ["At the wedding, the bride", "The groom looked at his bride and", "Our wedding day began when",
                       "The couple exchanged rings and", "After the ceremony, the newlyweds", "She tried on her wedding dress and"]
    ablation = labkit.directional_ablation(model, methods[1])
    ablated = evals.topic_steering_sweep(model, [ablation], [1.0], prompts=wedding_prompts,
                                         topic_words=data.topic_words["wedding"], **settings)
    print(ablated.round(3).to_string(index=False))


if __name__ == "__main__":
    main()
