"""Money: spending against a budget, so that a job stops before it could pass its limit."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class BudgetGuard:
    """Spending against a budget: a request goes out only if its worst case still fits.

    Each request in flight holds its worst-case cost until its real cost is known, so the
    requests in flight together cannot push spending past the limit. Once one request is
    refused, every later one is too: the job stops rather than picking cheaper rows.
    """

    limit_usd: float
    spent_usd: float = 0.0
    reserved_usd: float = 0.0
    stopped: bool = False

    def reserve(self, worst_usd: float) -> bool:
        if self.stopped or self.spent_usd + self.reserved_usd + worst_usd > self.limit_usd:
            self.stopped = True
            return False
        self.reserved_usd += worst_usd
        return True

    def settle(self, reserved_usd: float, cost_usd: float | None) -> None:
        """Turn a reservation into spending: the real cost, or, when it is unknown (answers
        without usage, as llama.cpp's streams), all of the reservation, or it would never stop."""
        self.reserved_usd = max(0.0, self.reserved_usd - reserved_usd)
        self.spent_usd += reserved_usd if cost_usd is None else cost_usd
