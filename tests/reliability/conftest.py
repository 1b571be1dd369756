"""The reliability suites use the daemon suites' real Mosquitto."""

from tests.daemon.mosquitto import mosquitto_fixture

__all__ = ["mosquitto_fixture"]
