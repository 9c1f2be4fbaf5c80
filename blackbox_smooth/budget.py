"""`--max-queries`: the budget of queries, reserved before they are sent so that the limit is
never crossed, and each certification's own account of it, so that one that fails gives back
what it reserved and never sent (a long-lived service must not lose its budget to outages)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

from .errors import BudgetExhausted


@dataclass
class Account:
    """One certification's queries: reserved from the budget, and sent (requests started)."""

    reserved: int = 0
    sent: int = 0


# The account of the certification running in this task (and the tasks it starts), if any:
# a certification that fails gives back what it reserved and never sent.
ACCOUNT: ContextVar[Account | None] = ContextVar("account", default=None)


class Budget:
    """`--max-queries`: reserve before sending, so the limit is never crossed. `reserve` is
    awaited, so that a budget shared by many machines (cluster.py) can ask who keeps it."""

    def __init__(self, max_queries: int | None = None) -> None:
        self.max_queries = max_queries
        self.reserved = 0

    @property
    def left(self) -> int | None:
        return None if self.max_queries is None else self.max_queries - self.reserved

    async def reserve(self, k: int) -> None:
        self.take(k)

    def take(self, k: int) -> None:
        if self.max_queries is not None and self.reserved + k > self.max_queries:
            left = self.max_queries - self.reserved
            raise BudgetExhausted(
                f"this needs {k} more queries but only {left} of --max-queries "
                f"{self.max_queries} are left; answered blocks are cached, so raise "
                "--max-queries and run again to resume"
            )
        self.reserved += k
        account = ACCOUNT.get()
        if account is not None:
            account.reserved += k

    def release(self, k: int) -> None:
        """Give back `k` reserved queries that will never be sent (a failed certification)."""
        self.reserved = max(0, self.reserved - k)


@contextlib.contextmanager
def accounted(budget: Budget) -> Iterator[Account]:
    """Run one certification on its own account: if it fails, what it reserved and never
    sent goes back to `budget` (a long-lived service must not lose its budget to outages)."""
    account = Account()
    token = ACCOUNT.set(account)
    try:
        yield account
    except BaseException:
        budget.release(max(0, account.reserved - account.sent))
        raise
    finally:
        ACCOUNT.reset(token)


def count_sent(k: int) -> None:
    """`k` queries of this task's certification sent (negative: refused unanswered)."""
    account = ACCOUNT.get()
    if account is not None:
        account.sent += k
