"""Which workers exist (etcd) and how loaded they are (NATS), and which one gets a request.

The frontend's own view, used where no router decides (or none answers in time) and to try
the next worker when the chosen one refuses. The choice is the worker with the fewest requests,
counting its last reported load plus what this process has sent it since that report. Ties
rotate, so an idle cluster still spreads work.
"""

import itertools
import logging
import math
import time
from collections.abc import Callable, Mapping

from nats.aio.msg import Msg

from proto import subjects
from proto.messages import SERVING_ROLES, InstanceId, LoadMetrics, WorkerInfo, WorkerRole
from shared.bus import Bus
from shared.codec import load_metrics_decoder
from shared.logs import BadMessages, RateLimitedLog

logger = logging.getLogger(__name__)


# Quiet for this many times its longest recent gap (and at least silence_s): presumed dead.
SILENCE_GAPS = 3.0
GAP_DECAY = 0.9  # per message heard
# The other senders' rate to a worker is smoothed over its reports with this weight, and
# carried forward from a report for at most this long (a worker that stopped reporting is
# found silent, not predicted ever busier).
OTHERS_WEIGHT = 0.5
MAX_UNREPORTED_S = 1.0
# The others' sends are also read as this many times this process's own (their rates'
# ratio), at most: a jump in load shows in this process's count at once, in the others'
# rate only a report or two later.
MAX_OTHERS_RATIO = 16.0
# ... and only where this process sends the worker at least this many requests a report
# interval, on average: below that its count is mostly noise (one send where a third was
# usual would read as a threefold jump), and it shed at a third of one worker's capacity.
MIN_OWN_PER_REPORT = 2.0


def _limit_s(state: "WorkerState", silence_s: float) -> float:
    return max(silence_s, SILENCE_GAPS * state.gap_s)


class WorkerState:
    __slots__ = (
        "gap_s",
        "in_flight",
        "info",
        "is_silent",
        "last_heard_s",
        "load",
        "others_per_s",
        "own_per_report",
        "own_per_s",
        "passed",
        "reported_s",
        "sent_since_report",
    )

    def __init__(self, info: WorkerInfo, now_s: float) -> None:
        self.info = info
        self.load: LoadMetrics | None = None
        self.in_flight = 0  # requests this frontend has open on it
        self.sent_since_report = 0
        # Requests a second that other senders (this frontend's sibling processes, other
        # frontends) give it, read from its arrival counter less what this process sent.
        self.others_per_s = 0.0
        self.own_per_s = 0.0  # this process's own sends a second, smoothed the same way
        self.own_per_report = 0.0  # and between two reports
        # Requests this process's check placed here that are not sent yet (being tokenized
        # and routed): under load, more than it sends between two reports.
        self.passed = 0
        self.reported_s = now_s  # when its last load report came (monotonic)
        # When it was last heard from (monotonic): a load report, a token batch, an answer.
        self.last_heard_s = now_s
        # The longest recent wait between two messages from it (decays by GAP_DECAY per
        # message): a worker busy with huge steps is quiet longer without being dead.
        self.gap_s = 0.0
        self.is_silent = False  # no report for too long: presumed dead until one comes

    @property
    def score(self) -> float:
        if self.load is None:
            return float(self.in_flight)
        return float(self.load.num_running + self.load.num_waiting + self.sent_since_report)

    def predicted_wait_s(self, num_tokens: int, now_s: float) -> float:
        """Time until a new request of ``num_tokens`` prompt tokens would get its first token
        here: the worker's own estimate at its last report, plus the prefill of what was sent
        it since or is on its way (counted at this request's size) and of the request itself.
        That is this process's count, the requests its check passed that are not sent yet,
        and the other senders' share: their recent rate over the time since the report, or
        this process's own count times the ratio of their rate to its own, whichever is
        more (with four frontend processes, this one alone sends a quarter of it, and when
        the load jumps its own count shows it first)."""
        load = self.load
        if load is None:
            return 0.0
        own = self.sent_since_report + self.passed
        others = self.others_per_s * min(now_s - self.reported_s, MAX_UNREPORTED_S)
        if self.own_per_report >= MIN_OWN_PER_REPORT:  # its own times the usual ratio
            others = max(others, own * min(self.others_per_s / self.own_per_s, MAX_OTHERS_RATIO))
        unreported = (own + others + 1) * num_tokens
        return load.predicted_wait_s + unreported * load.wait_per_token_s

    def reported(self, load: LoadMetrics, now_s: float) -> None:
        """Take a load report: the others' rate from the arrivals it counts that this process
        did not send, then start counting afresh."""
        previous = self.load
        elapsed_s = now_s - self.reported_s
        if previous is not None and elapsed_s > 0:
            arrived = load.num_arrived - previous.num_arrived
            if arrived >= 0:  # a counter that went back is a restart: keep the old rates
                others = max(0, arrived - self.sent_since_report) / elapsed_s
                self.others_per_s += OTHERS_WEIGHT * (others - self.others_per_s)
                own = self.sent_since_report / elapsed_s
                self.own_per_s += OTHERS_WEIGHT * (own - self.own_per_s)
                self.own_per_report += OTHERS_WEIGHT * (
                    self.sent_since_report - self.own_per_report
                )
        self.load = load
        self.sent_since_report = 0
        self.reported_s = now_s

    @property
    def room(self) -> int:
        """Requests it would still queue, by its last report and what was sent it since
        (0 where it reports no cap: no room is promised)."""
        load = self.load
        if load is None or not load.max_waiting:
            return 0
        return load.max_waiting - load.num_waiting - self.sent_since_report

    @property
    def is_draining(self) -> bool:
        return self.info.is_draining or (self.load is not None and self.load.is_draining)

    @property
    def is_usable(self) -> bool:
        return not self.is_silent and not self.is_draining


class Passed:
    """A request that passed the frontend's check against ``worker`` and is not sent yet:
    counted in that worker's predicted wait until it is sent (anywhere) or given up.
    ``release`` may be called any number of times."""

    __slots__ = ("_worker",)

    def __init__(self, worker: WorkerState) -> None:
        self._worker: WorkerState | None = worker
        worker.passed += 1

    def release(self) -> None:
        if self._worker is not None:
            self._worker.passed -= 1
            self._worker = None


class WorkerPool:
    """Live workers by model, kept from the etcd directory and the load subjects."""

    def __init__(self, bus: Bus, namespace: str) -> None:
        self._bus = bus
        self._namespace = namespace
        self._workers: dict[InstanceId, WorkerState] = {}
        self._rotation = itertools.count()
        self.on_removed: Callable[[InstanceId], None] | None = None
        self.bad_loads = BadMessages(RateLimitedLog(logger), "load metrics")
        self.on_load: Callable[[WorkerState], None] | None = None  # after each report

    async def start(self) -> None:
        await self._bus.subscribe(subjects.load_metrics_all(self._namespace), self._on_load)

    def sync(self, items: Mapping[str, WorkerInfo]) -> None:
        """Replace the directory with etcd's view (``Discovery.watch_workers``)."""
        seen: set[InstanceId] = set()
        for info in items.values():
            seen.add(info.worker_id)
            state = self._workers.get(info.worker_id)
            if state is None:
                self._workers[info.worker_id] = WorkerState(info, time.monotonic())
                logger.info("worker joined worker_id=%s model=%s", info.worker_id, info.model)
            else:
                state.info = info
        for worker_id in [w for w in self._workers if w not in seen]:
            del self._workers[worker_id]
            logger.info("worker left worker_id=%s", worker_id)
            if self.on_removed is not None:
                self.on_removed(worker_id)

    async def _on_load(self, msg: Msg) -> None:
        load = self.bad_loads.decode(load_metrics_decoder, msg.data, msg.subject)
        if load is None:
            return
        state = self._workers.get(load.worker_id)
        if state is not None:
            now_s = time.monotonic()
            state.reported(load, now_s)
            self._heard(state, now_s)
            if self.on_load is not None:
                self.on_load(state)

    def heard_from(self, worker_id: InstanceId, now_s: float) -> None:
        """Something came from the worker (its token batches, its answers): it is alive even
        if a busy loop delays its load reports."""
        state = self._workers.get(worker_id)
        if state is not None:
            self._heard(state, now_s)

    @staticmethod
    def _heard(state: WorkerState, now_s: float) -> None:
        state.gap_s = max(now_s - state.last_heard_s, state.gap_s * GAP_DECAY)
        state.last_heard_s = now_s
        if state.is_silent:
            state.is_silent = False
            logger.info("worker heard from again worker_id=%s", state.info.worker_id)

    def quiet_s(self, worker_id: InstanceId, now_s: float) -> float:
        """How long the worker has not been heard from; infinite if it is not in the pool
        (gone, or never seen)."""
        state = self._workers.get(worker_id)
        return math.inf if state is None else now_s - state.last_heard_s

    def find_silent(self, silence_s: float, now_s: float) -> list[InstanceId]:
        """Mark, and return, the workers that just went quiet (nothing heard for ``silence_s``,
        or for ``SILENCE_GAPS`` times the longest recent gap between their messages if that
        is longer: a loaded worker reports late, not never) while another worker is still
        heard, so that a lost bus is not taken for dead workers. Idle workers report every
        ~100 ms, so a dead one is found in about ``silence_s``. The etcd lease remains the
        backstop."""
        states = list(self._workers.values())
        if not any(now_s - s.last_heard_s <= _limit_s(s, silence_s) for s in states):
            return []
        gone = []
        for state in states:
            if not state.is_silent and now_s - state.last_heard_s > _limit_s(state, silence_s):
                state.is_silent = True
                gone.append(state.info.worker_id)
        return gone

    def silent_ids(self) -> list[InstanceId]:
        """Workers presumed quiet now (see :meth:`find_silent`)."""
        return [w for w, s in self._workers.items() if s.is_silent]

    def models(self) -> set[str]:
        """Models that some worker taking GenerateRequests serves."""
        return {s.info.model for s in self._workers.values() if s.info.role in SERVING_ROLES}

    def candidates(
        self, model: str, roles: tuple[WorkerRole, ...] = SERVING_ROLES
    ) -> list[WorkerState]:
        """Workers of ``roles`` serving ``model``, best first; draining ones are left out."""
        states = [
            s
            for s in self._workers.values()
            if s.info.model == model and s.info.role in roles and s.is_usable
        ]
        if len(states) > 1:
            offset = next(self._rotation) % len(states)
            states = states[offset:] + states[:offset]
            states.sort(key=lambda s: s.score)  # stable: the rotation breaks ties
        return states

    def get(self, worker_id: InstanceId) -> WorkerState | None:
        return self._workers.get(worker_id)

    def __len__(self) -> int:
        return len(self._workers)
