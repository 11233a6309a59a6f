"""NetOps evaluation: a labelled set from the simulator, a rule baseline, and scores of model answers
served through the real gRPC path (`airan eval`)."""
