"""Ray shells: the site cluster and the replica actors (thin adapters around the core)."""
