"""airan: small language models at RAN edge sites, answering RAN controllers."""

__version__ = "0.1.0"
