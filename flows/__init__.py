"""Prefect flows that walk a recipe; thin wrappers over the stage runner."""
