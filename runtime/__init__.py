"""faultwatch.runtime."""
