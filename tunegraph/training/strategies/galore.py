"""GaLore (Zhao et al. 2024, https://arxiv.org/abs/2403.03507): full-parameter training whose optimizer
state lives in a low-rank projection of the gradient.

For a weight matrix W (m x n, m <= n) with gradient G_t, every ``update_proj_gap`` steps
P_t = U[:, :r] from the SVD of G_t (the smaller side is projected); in between P_t is reused. Adam
runs on R_t = P_t^T G_t (r x n), and the update is projected back and scaled:

    W_{t+1} = W_t - eta * alpha * P_t * Adam(P_t^T G_t)      (alpha = ``scale``)

so every weight moves (full rank over time) while Adam's moments are r x n. Applied, as in the
paper, to the 2-D weights of attention and MLP linears; everything else (embeddings, norms, LM
head) trains with plain AdamW in the same optimizer. Uses the authors' ``galore-torch`` package.
"""

from __future__ import annotations

import torch
from pydantic import Field

from tunegraph.params import StageParams


class GaloreSettings(StageParams):
    rank: int = Field(128, ge=1, description="rank r of the gradient projection")
    update_proj_gap: int = Field(200, ge=1, description="steps between projection (SVD) refreshes")
    scale: float = Field(0.25, gt=0, description="alpha: scale of the projected-back update")
    proj_type: str = Field("std", description="galore-torch projection type: std, reverse_std, left, right, full")
    target_modules: list[str] = Field(["attn", "mlp"], description="Linear modules whose name contains one of "
                                                                    "these get GaLore")


def galore_parameter_names(model, settings: GaloreSettings) -> list[str]:
    """Names of the 2-D Linear weights that get the projected update."""
    names = []
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(key in module_name for key in settings.target_modules):
            if module.weight.requires_grad and module.weight.ndim == 2:
                names.append(f"{module_name}.weight")
    return names


def build_galore_optimizer(model, settings: GaloreSettings, lr: float, weight_decay: float):
    from galore_torch import GaLoreAdamW
    from galore_torch.galore_projector import GaLoreProjector

    # the optimizer state holds a GaLoreProjector per matrix (rank, gap, scale, projection tensor); let
    # checkpoint resume read it back with torch.load(weights_only=True)
    torch.serialization.add_safe_globals([GaLoreProjector])

    projected = set(galore_parameter_names(model, settings))
    if not projected:
        raise ValueError(f"galore: no Linear module matches target_modules={settings.target_modules}")
    galore, regular, seen = [], [], set()
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad or id(parameter) in seen:
            continue
        seen.add(id(parameter))
        (galore if name in projected else regular).append(parameter)
    groups = [{"params": regular},
              {"params": galore, "rank": settings.rank, "update_proj_gap": settings.update_proj_gap,
               "scale": settings.scale, "proj_type": settings.proj_type}]
    return GaLoreAdamW([g for g in groups if g["params"]], lr=lr, weight_decay=weight_decay,
                       no_deprecation_warning=True)
