"""Eviction, write and admission policies, one small class each."""
