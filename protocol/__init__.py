"""reckon: protocol."""
