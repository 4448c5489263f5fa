"""Chemistry: SMILES/InChI -> standardised RDKit molecule -> graph tensors and fingerprints.

standardize.py (parse, standardise, MoleculeError), featurizer.py (documented feature layout,
featurize, morgan_fingerprint), graph.py (MolGraph, collate_graphs), store.py (GraphStore: the
zarr graph store training reads), compound.py (per-compound rules the featurisation job applies).
"""
