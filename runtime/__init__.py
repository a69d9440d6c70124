"""faultwatch.runtime: the edge install (numpy, onnxruntime, paho-mqtt; never torch).

Subpackages, by what an install runs: ``engine`` (the streaming engine: model step,
scoring, thresholds), ``daemon`` (``faultwatch run`` and its MQTT parts in ``daemon.mqtt``),
``offline`` (``replay``, ``inspect``, CSV reading), ``devtools`` (simulator, private
Mosquitto, the daemon as a subprocess). ``cli`` is the ``faultwatch`` command.
"""
