"""Small MLP heads: projection heads for the contrastive spaces and MICON's counterfactual generator G.

Sizes come from configuration (official MICON: image projection 1000 -> 1000 -> 512, generator
[control; compound] 2000 -> 2000 -> 1000). No normalisation here; the losses normalise.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class ProjectionHead(nn.Module):
    """[..., in_dim] -> [..., out_dim]: Dropout, Linear(in, hidden), ReLU, Linear(hidden, out).

    hidden_dim defaults to in_dim (official 1000 -> 1000 -> 512).
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        hidden_dim = hidden_dim or in_dim
        self.in_dim, self.out_dim = in_dim, out_dim
        self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, hidden_dim), nn.ReLU(),
                                 nn.Linear(hidden_dim, out_dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"projection head expects [..., {self.in_dim}], got shape {tuple(x.shape)}")
        return self.net(x)


class CounterfactualGenerator(nn.Module):
    """G: control image embedding [..., embed_dim] + compound embedding [..., compound_dim]
    -> predicted treated image embedding [..., embed_dim]; MLP on the concatenation
    (hidden_dim defaults to embed_dim + compound_dim, official 2d -> 2d -> d)."""

    def __init__(self, embed_dim: int, compound_dim: int | None = None, hidden_dim: int | None = None,
                 dropout: float = 0.0) -> None:
        super().__init__()
        compound_dim = compound_dim or embed_dim
        self.embed_dim, self.compound_dim = embed_dim, compound_dim
        self.net = ProjectionHead(embed_dim + compound_dim, embed_dim, hidden_dim, dropout)

    def forward(self, control: Tensor, compound: Tensor) -> Tensor:
        if control.shape[-1] != self.embed_dim or compound.shape[-1] != self.compound_dim:
            raise ValueError(f"generator expects control [..., {self.embed_dim}] and compound "
                             f"[..., {self.compound_dim}], got {tuple(control.shape)} and {tuple(compound.shape)}")
        return self.net(torch.cat([control, compound], dim=-1))
