"""The training engine: data collation, update strategies, objectives and the loop."""
