"""labkit: a Jupyter-first lab for interpretability and steering of language models.

The data flow reads as one line: load a model → cache activations / build steering vectors →
steered generation; trace MoE routing on behaviour and control prompts → attribute experts →
mask them → evaluate → plot → widget.
"""

from labkit.models import available_offline_models, load_model
from labkit.generation import Generation, generate
from labkit.steering import (
    SteeringVector,
    actadd,
    directional_ablation,
    mean_difference,
    pca_direction,
    probe_direction,
    steered,
)

__all__ = ["available_offline_models", "load_model"]
__all__ += ["Generation", "SteeringVector", "actadd", "generate", "mean_difference", "steered"]
__all__ += ["directional_ablation", "pca_direction", "probe_direction"]
