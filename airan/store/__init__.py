"""The light model store: a model name -> its directory and manifest; what the server needs and nothing more."""
