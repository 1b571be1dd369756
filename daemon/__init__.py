"""The tiercache service, imported as ``tiercache.daemon``: config and CLI, the socket server
and its wire protocol, the operator verbs (control), the Prometheus exporter, the MQTT
channel, the process supervisor and the demo."""
