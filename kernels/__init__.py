"""Triton kernels with torch references and CPU paths (see issue: kernels)."""
