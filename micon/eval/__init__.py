"""Evaluation library: well profiles, normalisation, replicate retrieval (NSB/NSS/NSP top-k) and mAP.

Pure functions over a metadata frame plus a feature matrix; the evaluation job does the I/O.
"""
