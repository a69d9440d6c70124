"""Development tools shipped with the runtime: the pump simulator, publishing it over
MQTT, and a private Mosquitto launcher (used by tests, ``bench`` and ``demo``).
"""
