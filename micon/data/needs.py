"""What a training method's examples need from the data stream (declared by each method, resolved against
the model configuration by `Method.data_needs`, read by the stream); a plain value, picklable into loader
workers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

MoleculeInput = Literal["graph", "fingerprint", "table"]


@dataclass(frozen=True)
class DataNeeds:
    pairs: bool = True           # two treated sites of one compound from different wells (else one site twice)
    controls: bool = False       # a same-plate DMSO control site for each view
    molecules: bool = False      # the compound itself goes with each example (from the graph store)
    molecule_input: MoleculeInput = "graph"   # in which form: its molecular graph, its Morgan fingerprint or its
                                              # row of a precomputed vector table
    negcon_sites: bool = False   # DMSO and every other role are examples too (image-only methods)

    @property
    def graphs(self) -> bool:
        """The stream collates the compounds' molecular graphs."""
        return self.molecules and self.molecule_input == "graph"

    @property
    def fingerprints(self) -> bool:
        """The stream stacks the compounds' fingerprint bits."""
        return self.molecules and self.molecule_input == "fingerprint"

    @property
    def vectors(self) -> bool:
        """The stream stacks the compounds' precomputed vectors (model.molecule_table)."""
        return self.molecules and self.molecule_input == "table"
