"""Real external services the tests start: Mosquitto (MQTT), Prometheus and SeaweedFS (S3).

Their fixtures are registered in tests/conftest.py, so every test folder reaches them; the
session-wide ones start lazily, on the first test that asks for one, and never for a run
that selects none. A test that starts a service is marked ``service``."""
