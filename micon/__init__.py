"""MICON: molecule-image contrastive learning for Cell Painting morphological profiling.

The library: chemistry, data schema and pipelines, models, losses and evaluation.
Importing it has no side effects; jobs (data_prep/, train/, evaluate/) do the I/O.
"""
__version__ = "0.1.0"
