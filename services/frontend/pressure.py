"""How far behind this frontend's own event loop runs: the last line of overload defence.

Admission protects the workers; nothing protects the frontend itself when more requests
arrive than one process can even parse and answer. Then every await in it runs late, the
streams it already serves slow down, and the requests it would shed wait seconds for their
429. ``LoopPressure`` measures the loop's lag with a ticker and, from it, the fraction of new
completion requests to answer 429 before their body is read (the cheapest answer there is),
so the loop catches up and the admitted streams keep their pace.

The fraction is steered, not switched: each tick moves it up while the smoothed lag is above
the bound and down while it is below, in proportion to how far (an integral controller, as
active queue management steers its drop probability by queue delay). On a machine whose
cores are full, the lag hovers near the bound and the fraction settles where the process
takes in what it can serve: an on/off flag there refused every request for a while, then
admitted every one, and the bursts it admitted were what made the next lag (measured in
docs/admission.md). A lag far above the bound still reaches "shed all" within a few ticks.
"""

import asyncio
import random


class LoopPressure:
    """An exponentially weighted loop lag and the shed fraction it steers."""

    MAX_TICK_LAG = 4.0  # x max_lag_s: with the weight 0.2, one tick moves the average 0.8x
    # uvloop's clock counts whole milliseconds: a tick reads 0 or at least 1 ms late. A cap
    # below that would make every late tick the same tiny number, and the average would
    # follow how many ticks read late, not how late they were.
    CLOCK_RESOLUTION_S = 0.001

    # 50 ticks a second: each wakes an idle process (on the 2-core machine here, 100 a second
    # cost each frontend process 1.2 % of a core doing nothing). A weight of 0.2 a tick keeps
    # the average's memory at about 100 ms. A gain of 0.05 a tick moves the fraction by 2.5 a
    # second per bound of error: from none to all in 0.4 s at twice the bound, 0.13 s at the
    # cap; from all to none in 0.4 s of a loop on time.
    def __init__(
        self,
        max_lag_s: float,
        *,
        tick_s: float = 0.02,
        weight: float = 0.2,
        gain: float = 0.05,
        rng: random.Random | None = None,
    ) -> None:
        if max_lag_s <= 0:
            raise ValueError(f"max_lag_s must be > 0, got {max_lag_s}")
        self.max_lag_s = max_lag_s
        self.tick_s = tick_s
        self.weight = weight
        self.gain = gain
        self.lag_s = 0.0
        self.shed_fraction = 0.0
        self._random = (rng or random.Random()).random

    @property
    def is_overloaded(self) -> bool:
        """Whether any request is shed for the lag now."""
        return self.shed_fraction > 0.0

    def should_shed(self) -> bool:
        """One draw: whether to shed the request at hand (with ``shed_fraction``'s chance)."""
        fraction = self.shed_fraction
        return fraction >= 1.0 or (fraction > 0.0 and self._random() < fraction)

    def observe(self, lag_s: float) -> None:
        """One tick's lag (seconds late); moves the average and, by it, ``shed_fraction``.

        A tick counts as at most ``MAX_TICK_LAG`` times the bound, so one stall alone (the
        process descheduled on a busy machine, a GC pause) never raises the fraction,
        however long: the average it leaves is 0.8 of the bound, and shedding after it would
        help nothing, the requests it delayed are late already. Lag that lasts raises it.
        The cap is never below the clock's resolution, so a bound far below it
        (``--max-loop-lag-ms 0.001``) reads any tick the clock sees as late as overload, and
        holds it for a while."""
        cap_s = max(self.MAX_TICK_LAG * self.max_lag_s, self.CLOCK_RESOLUTION_S)
        lag_s = min(max(0.0, lag_s), cap_s)
        self.lag_s += self.weight * (lag_s - self.lag_s)
        error = (self.lag_s - self.max_lag_s) / self.max_lag_s
        self.shed_fraction = min(1.0, max(0.0, self.shed_fraction + self.gain * error))

    async def run(self) -> None:
        """Tick until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.tick_s
            await asyncio.sleep(self.tick_s)
            self.observe(loop.time() - due)
