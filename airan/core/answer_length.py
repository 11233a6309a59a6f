"""How long a model's typed answers run, learnt from its own answers: the tokens admission expects.

A diagnosis decodes under a grammar, so its length is bounded and steady for one model and answer
form (a NEAR_RT brief answer is a cause and a few cells: 7-12 tokens against a bound of 16).
Predicting with the bound doubles the decode time admission predicts for such an answer, so
requests that would fit are refused. Until `min_samples` answers of a kind have been seen, the
bound is used; an answer that hits the bound pulls the estimate back up to it.
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Hashable


class AnswerLengths:
    def __init__(self, window: int = 64, min_samples: int = 8, quantile: float = 0.95) -> None:
        if window < 1 or not 1 <= min_samples <= window or not 0.0 < quantile <= 1.0:
            raise ValueError("need window >= min_samples >= 1 and quantile in (0, 1]")
        self.window, self.min_samples, self.quantile = window, min_samples, quantile
        self._seen: dict[Hashable, deque[int]] = {}

    def observe(self, kind: Hashable, tokens: int) -> None:
        self._seen.setdefault(kind, deque(maxlen=self.window)).append(int(tokens))

    def learnt(self, kind: Hashable) -> bool:
        """Whether `expected` answers from the seen answers (not the bound or a prior) for this kind."""
        seen = self._seen.get(kind)
        return seen is not None and len(seen) >= self.min_samples

    def expected(self, kind: Hashable, bound: int) -> int:
        """The `quantile` of the last `window` answers of this kind, at most `bound` (the bound
        itself until `min_samples` have been seen)."""
        if not self.learnt(kind):
            return bound
        ordered = sorted(self._seen[kind])
        at = ordered[min(len(ordered), math.ceil(self.quantile * len(ordered))) - 1]
        return max(1, min(bound, at))
