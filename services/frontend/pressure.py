"""How far behind this frontend's own event loop runs: the last line of overload defence.

Admission protects the workers; nothing protects the frontend itself when more requests
arrive than one process can even parse and answer. Then every await in it runs late, the
streams it already serves slow down, and the requests it would shed wait seconds for their
429. ``LoopPressure`` measures the loop's lag with a ticker; while the lag stays above a
bound, completion requests are answered 429 before their body is read (the cheapest answer
there is), so the loop catches up and the admitted streams keep their pace.
"""

import asyncio


class LoopPressure:
    """An exponentially weighted loop lag, with hysteresis on the overload flag."""

    MAX_TICK_LAG = 4.0  # x max_lag_s: with the weight 0.2, one tick moves the average 0.8x
    # uvloop's clock counts whole milliseconds: a tick reads 0 or at least 1 ms late. A cap
    # below that would make every late tick the same tiny number, and the average would
    # follow how many ticks read late, not how late they were.
    CLOCK_RESOLUTION_S = 0.001

    # 50 ticks a second: each wakes an idle process (on the 2-core machine here, 100 a second
    # cost each frontend process 1.2 % of a core doing nothing). A weight of 0.2 a tick keeps
    # the average's memory at about 100 ms.
    def __init__(self, max_lag_s: float, *, tick_s: float = 0.02, weight: float = 0.2) -> None:
        if max_lag_s <= 0:
            raise ValueError(f"max_lag_s must be > 0, got {max_lag_s}")
        self.max_lag_s = max_lag_s
        self.tick_s = tick_s
        self.weight = weight
        self.lag_s = 0.0
        self.is_overloaded = False

    def observe(self, lag_s: float) -> None:
        """One tick's lag (seconds late); sets or clears ``is_overloaded``.

        A tick counts as at most ``MAX_TICK_LAG`` times the bound, so one stall alone (the
        process descheduled on a busy machine, a GC pause) never sets the flag, however long:
        shedding after it would help nothing, the requests it delayed are late already. Lag
        that lasts (two such ticks in a row, or more smaller ones) does. The cap is never
        below the clock's resolution, so a bound far below it (``--max-loop-lag-ms 0.001``)
        reads any tick the clock sees as late as overload, and holds it for a while."""
        cap_s = max(self.MAX_TICK_LAG * self.max_lag_s, self.CLOCK_RESOLUTION_S)
        lag_s = min(max(0.0, lag_s), cap_s)
        self.lag_s += self.weight * (lag_s - self.lag_s)
        if self.lag_s > self.max_lag_s:
            self.is_overloaded = True
        elif self.lag_s < self.max_lag_s / 2:
            self.is_overloaded = False

    async def run(self) -> None:
        """Tick until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.tick_s
            await asyncio.sleep(self.tick_s)
            self.observe(loop.time() - due)
