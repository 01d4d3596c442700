"""The benchmark: ground-truth CT/MR pairs, every method on the same pairs, tables and figures (``srr-benchmark``)."""
