"""The Ray embedding and retrieval evaluation jobs."""
