"""faultwatch.train."""
