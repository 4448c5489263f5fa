"""Molecular graph containers shared by the featuriser, the graph store and the molecule encoder.

A graph is directed: every bond appears as two edges, edge 2i (u->v) and 2i+1 (v->u), so the
reverse of edge e is e ^ 1 (D-MPNN needs it). Arrays only; no RDKit and no torch here.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class MolGraph:
    """One molecule: atom features [n_atoms, atom_dim], directed bond features [n_edges, bond_dim],
    edge_index [2, n_edges] (row 0 source atom, row 1 target atom), reverse edge of e is e ^ 1."""

    atom_features: np.ndarray
    bond_features: np.ndarray
    edge_index: np.ndarray

    @property
    def n_atoms(self) -> int:
        return int(self.atom_features.shape[0])

    @property
    def n_edges(self) -> int:
        return int(self.edge_index.shape[1])


@dataclass
class BatchedGraph:
    """Several molecules as one disconnected graph; `batch[i]` is the molecule of atom i."""

    atom_features: np.ndarray
    bond_features: np.ndarray
    edge_index: np.ndarray
    batch: np.ndarray
    n_molecules: int


def collate_graphs(graphs: list[MolGraph]) -> BatchedGraph:
    """Concatenate graphs, offsetting edge indices; reverse-edge pairing (e ^ 1) is preserved
    because every graph has an even number of edges."""
    if not graphs:
        raise ValueError("collate_graphs needs at least one molecule")
    offsets = np.cumsum([0] + [g.n_atoms for g in graphs[:-1]])
    bond_dim = graphs[0].bond_features.shape[1]
    edge_index = [g.edge_index.astype(np.int64) + off for g, off in zip(graphs, offsets)]
    return BatchedGraph(
        atom_features=np.concatenate([g.atom_features for g in graphs]).astype(np.float32, copy=False),
        bond_features=(np.concatenate([g.bond_features for g in graphs]) if any(g.n_edges for g in graphs)
                       else np.zeros((0, bond_dim), np.float32)).astype(np.float32, copy=False),
        edge_index=np.concatenate(edge_index, axis=1) if edge_index else np.zeros((2, 0), np.int64),
        batch=np.repeat(np.arange(len(graphs)), [g.n_atoms for g in graphs]).astype(np.int64),
        n_molecules=len(graphs),
    )
