"""The daemon's MQTT connection: the client, reconnects, sessions and flow control."""
