"""Chemistry: SMILES/InChI -> standardised RDKit molecule -> graph tensors and fingerprints."""
