"""reckon: actors."""
