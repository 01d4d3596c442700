"""Conventional baselines the benchmark compares against (elastix B-spline with and without a rigidity penalty)."""
