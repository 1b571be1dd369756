"""Moved to tests/services/mosquitto.py; this re-export keeps ``tests.daemon.mosquitto`` working
for tests/vllm until those tests move next to the vLLM connector they test."""

from tests.services.mosquitto import free_port

__all__ = ["free_port"]
