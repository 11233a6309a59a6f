"""The server's side of the harness's requests: the `Query` the gateway builds from `ask_request`.

What a model is trained on (`airan.factory.variants.netops_data`) and measured
with must be exactly what the server would render, so both start here.
"""
from __future__ import annotations

import time

from airan.config import LimitsConfig
from airan.core.query import Query, validate_query
from airan.evaluation.runner import ask_request
from airan.serving.api.convert import query_from_proto

# the context the eval stacks serve SmolLM2 with (as the default config does): a diagnosis
# prompt gets it minus the answer budget
MAX_MODEL_LEN = 2048


def server_query(item, max_tokens: int = 0) -> Query:
    """The `Query` the gateway builds from the harness's request for `item` (proto round trip included)."""
    query = query_from_proto(ask_request(item, diagnosis=True, max_tokens=max_tokens), time.monotonic(), None)
    return validate_query(query, LimitsConfig(), (), time.monotonic())
