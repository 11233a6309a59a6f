"""Serving: the gRPC API, gateway, Ray cluster and engines. Never imports the factory or evaluation."""
