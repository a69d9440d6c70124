"""``faultwatch run``: the edge daemon. MQTT readings in, forecasts and fault events out."""
