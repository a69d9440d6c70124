"""The engine without a broker: ``faultwatch replay`` and ``inspect``, and CSV reading."""
