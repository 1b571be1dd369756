"""Fixtures shared by the daemon suites: one real Mosquitto for the session (and one per test
for tests that kill it)."""

from tests.daemon.mosquitto import mosquitto_fixture, own_mosquitto_fixture

__all__ = ["mosquitto_fixture", "own_mosquitto_fixture"]
