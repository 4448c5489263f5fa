"""The comparison driver behind `bench/science.py` and `./launch.sh compare`, one concept per module:

    design     the methods, ablations, query sets, metrics and shared training settings
    runs       the real jobs (synth, ingest, featurize, train.run, evaluate.embed/predict), resumable stages
    scoring    an embedding scored as `evaluate` profiles it; the summary over seeds; results.json
    verdict    plain sentences from the intervals; gains paired by seed
    plots      comparison.png, loss against chance, learning curves, fit against transfer
    docs       docs/RESULTS.md and docs/results/, and redrawing from stored numbers
    diagnosis  the learnability ladder, fit against transfer
    curves     retrieval against training step
    compare    the comparison itself: every method x seed, the ablations, the activity-aware run
"""
