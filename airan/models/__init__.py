"""Model registry and preparation (generated tiny model, converted real SLMs)."""
