"""What a training method's examples need from the data stream (declared by each method, read by the
stream); a plain value, picklable into loader workers."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DataNeeds:
    pairs: bool = True           # two treated sites of one compound from different wells (else one site twice)
    controls: bool = False       # a same-plate DMSO control site for each view
    graphs: bool = False         # the compound's molecular graph
    negcon_sites: bool = False   # DMSO and every other role are examples too (image-only methods)
