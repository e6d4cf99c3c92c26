"""reckon: tools_sandbox."""
