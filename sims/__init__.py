"""Radio-traffic simulator: topology, traffic, KPIs, events, RAN load, query traces."""
