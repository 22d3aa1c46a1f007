"""tunegraph: LLM post-training as a reproducible DAG of versioned stages."""

__version__ = "0.1.0"
