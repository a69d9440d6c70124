"""faultwatch.export."""
