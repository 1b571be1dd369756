"""The tiercache service: config, CLI (and, later, socket server, MQTT control, metrics)."""
