"""reckon: training."""
