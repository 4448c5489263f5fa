"""Molecule encoders: a directed message-passing network (D-MPNN, chemprop style) and a fingerprint MLP.

Inputs follow micon.chem.graph (directed edges, reverse of edge e is e ^ 1); `graphs_to_torch`
moves a numpy BatchedGraph onto a device. Feature sizes are constructor arguments, never assumed:
the featuriser owns the layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from micon.chem.graph import BatchedGraph


@dataclass
class TorchGraph:
    """A BatchedGraph as tensors: atom_features [n_atoms, atom_dim] float, bond_features
    [n_edges, bond_dim] float, edge_index [2, n_edges] long (source, target), batch [n_atoms] long."""

    atom_features: Tensor
    bond_features: Tensor
    edge_index: Tensor
    batch: Tensor
    n_molecules: int

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "TorchGraph":
        return TorchGraph(*(t.to(device, non_blocking=non_blocking) for t in (
            self.atom_features, self.bond_features, self.edge_index, self.batch)), self.n_molecules)

    def pin(self) -> "TorchGraph":
        """The tensors in page-locked memory, so a copy to the GPU can be queued without waiting."""
        return TorchGraph(*(t.pin_memory() for t in (self.atom_features, self.bond_features, self.edge_index,
                                                       self.batch)), self.n_molecules)


def graphs_to_torch(graph: BatchedGraph, device: torch.device | str | None = None) -> TorchGraph:
    """Convert a collated numpy BatchedGraph into a TorchGraph on `device` (float32 / int64)."""
    def t(a: np.ndarray, dtype: torch.dtype) -> Tensor:
        return torch.as_tensor(np.ascontiguousarray(a), dtype=dtype, device=device)

    return TorchGraph(t(graph.atom_features, torch.float32), t(graph.bond_features, torch.float32),
                      t(graph.edge_index, torch.long).reshape(2, -1), t(graph.batch, torch.long),
                      int(graph.n_molecules))


class DMPNNEncoder(nn.Module):
    """Directed MPNN (Yang et al. 2019 / chemprop): TorchGraph -> molecule embedding [n_molecules, hidden_dim].

    Edge v->w: h0_vw = ReLU(W_i [x_v ; e_vw]); for depth-1 steps m_vw = sum_{k->v} h_kv - h_wv (all
    messages into the source atom except the reverse edge's), h_vw = ReLU(h0_vw + W_h m_vw); atom
    readout h_v = ReLU(W_o [x_v ; sum_{k->v} h_kv]) (the depth-th hop); molecule = mean or sum of its
    atoms. Atoms without bonds get h_v = ReLU(W_o [x_v ; 0]), so bond-free molecules are fine.
    """

    def __init__(self, atom_dim: int, bond_dim: int, hidden_dim: int = 300, depth: int = 3,
                 dropout: float = 0.0, aggregation: Literal["mean", "sum"] = "mean", bias: bool = True) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"D-MPNN depth must be >= 1, got {depth}")
        if aggregation not in ("mean", "sum"):
            raise ValueError(f"aggregation must be 'mean' or 'sum', got {aggregation!r}")
        self.atom_dim, self.bond_dim, self.depth, self.aggregation = atom_dim, bond_dim, depth, aggregation
        self.out_dim = hidden_dim
        self.W_i = nn.Linear(atom_dim + bond_dim, hidden_dim, bias=bias)
        self.W_h = nn.Linear(hidden_dim, hidden_dim, bias=bias)
        self.W_o = nn.Linear(atom_dim + hidden_dim, hidden_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, graph: TorchGraph) -> Tensor:
        x, e, edge_index, batch = graph.atom_features, graph.bond_features, graph.edge_index, graph.batch
        if x.shape[1] != self.atom_dim or e.shape[1] != self.bond_dim:
            raise ValueError(f"D-MPNN built for atom_dim={self.atom_dim}, bond_dim={self.bond_dim}; graph has "
                             f"atom features {tuple(x.shape)} and bond features {tuple(e.shape)}")
        n_edges = edge_index.shape[1]
        if n_edges % 2:
            raise ValueError(f"directed graph needs an even number of edges (e and e ^ 1), got {n_edges}")
        src, dst = edge_index[0], edge_index[1]
        rev = torch.arange(n_edges, device=x.device) ^ 1

        h0 = torch.relu(self.W_i(torch.cat([x[src], e], dim=1)))                 # [E, H]
        h = h0
        for _ in range(self.depth - 1):
            incoming = torch.zeros(x.shape[0], h.shape[1], dtype=h.dtype, device=h.device).index_add_(0, dst, h)
            m = incoming[src] - h[rev]                                            # [E, H]
            h = self.dropout(torch.relu(h0 + self.W_h(m)))
        incoming = torch.zeros(x.shape[0], h.shape[1], dtype=h.dtype, device=h.device).index_add_(0, dst, h)
        atoms = self.dropout(torch.relu(self.W_o(torch.cat([x, incoming], dim=1))))  # [n_atoms, H]

        out = torch.zeros(graph.n_molecules, atoms.shape[1], dtype=atoms.dtype, device=atoms.device)
        out = out.index_add(0, batch, atoms)
        if self.aggregation == "mean":
            counts = torch.bincount(batch, minlength=graph.n_molecules).clamp(min=1).to(atoms.dtype)
            out = out / counts[:, None]
        return out


class FingerprintMLP(nn.Module):
    """Light molecule encoder: Morgan fingerprint bits [B, n_bits] -> embedding [B, out_dim] (MLP, ReLU)."""

    def __init__(self, n_bits: int = 2048, hidden_dim: int = 1024, out_dim: int = 512, n_layers: int = 2,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        self.n_bits, self.out_dim = n_bits, out_dim
        dims = [n_bits] + [hidden_dim] * (n_layers - 1) + [out_dim]
        layers: list[nn.Module] = []
        for i in range(n_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < n_layers - 1:
                layers += [nn.ReLU(), nn.Dropout(dropout)]
        self.net = nn.Sequential(*layers)

    def forward(self, fingerprints: Tensor) -> Tensor:
        if fingerprints.dim() != 2 or fingerprints.shape[1] != self.n_bits:
            raise ValueError(f"expected fingerprints [B, {self.n_bits}], got shape {tuple(fingerprints.shape)}")
        return self.net(fingerprints.to(self.net[0].weight.dtype))
