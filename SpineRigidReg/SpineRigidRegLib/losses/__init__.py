"""Training and refinement losses: image similarity, smoothness and per-vertebra rigidity."""
