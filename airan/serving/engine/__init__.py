"""Engines behind replicas: a narrow protocol and its vLLM adapter."""
