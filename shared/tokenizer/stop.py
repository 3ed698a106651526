"""Stop strings over streamed text, with OpenAI semantics: the stop string is never emitted.

``StopStringMatcher`` runs an Aho-Corasick automaton over the characters of each piece. Its
state is the longest tail of the text so far that could still grow into a stop string; that
tail is held back, so a stop split across pieces is caught before any of it is emitted. A push
costs O(len(piece) + longest stop) and the result does not depend on how the text is split.
"""

from collections.abc import Sequence


def _build_automaton(stops: Sequence[str]) -> tuple[list[dict[str, int]], list[int], list[int]]:
    """Per state: transitions (missing = back to the root), depth and the longest stop it ends."""
    children: list[dict[str, int]] = [{}]
    depth = [0]
    stop_len = [0]  # length of the stop this state spells, 0 if none
    for stop in stops:
        state = 0
        for char in stop:
            if char not in children[state]:
                children[state][char] = len(children)
                children.append({})
                depth.append(depth[state] + 1)
                stop_len.append(0)
            state = children[state][char]
        stop_len[state] = len(stop)
    transitions: list[dict[str, int]] = [{} for _ in children]
    transitions[0] = dict(children[0])
    match_len = list(stop_len)
    fail = [0] * len(children)
    queue = list(children[0].values())  # breadth first, so a state's fail state comes first
    for state in queue:
        fallback = fail[state]
        match_len[state] = match_len[state] or match_len[fallback]
        transitions[state] = {**transitions[fallback], **children[state]}
        for char, child in children[state].items():
            fail[child] = transitions[fallback].get(char, 0)
            queue.append(child)
    return transitions, depth, match_len


class StopStringMatcher:
    """Cuts one stream's text at the first stop string; one instance per stream.

    ``push`` returns ``(text_to_emit, stopped)``. The stream stops where a stop string first
    ends; when stops of different lengths end there, the text is cut before the longest. After
    a stop, ``push`` returns ``("", True)``. When the stream ends without a stop, ``flush``
    returns the held tail.
    """

    __slots__ = ("_depth", "_held", "_is_stopped", "_match_len", "_state", "_transitions")

    def __init__(self, stops: Sequence[str]) -> None:
        """Match ``stops``; an empty stop string raises ValueError (it would match at once)."""
        if any(not stop for stop in stops):
            raise ValueError(f"stop strings must be non-empty, got {list(stops)!r}")
        self._transitions, self._depth, self._match_len = _build_automaton(stops)
        self._state = 0
        self._held = ""
        self._is_stopped = False

    @property
    def is_stopped(self) -> bool:
        """Whether a stop string has been seen."""
        return self._is_stopped

    def push(self, piece: str) -> tuple[str, bool]:
        """Feed the next piece; return the text now safe to emit and whether the stream stopped."""
        if self._is_stopped:
            return "", True
        transitions = self._transitions
        match_len = self._match_len
        state = self._state
        for index, char in enumerate(piece):
            state = transitions[state].get(char, 0)
            if match_len[state]:
                end = len(self._held) + index + 1
                text = (self._held + piece)[: end - match_len[state]]
                self._held = ""
                self._is_stopped = True
                return text, True
        self._state = state
        text = self._held + piece
        split = len(text) - self._depth[state]
        self._held = text[split:]
        return text[:split], False

    def flush(self) -> str:
        """End the stream: return the held tail (``""`` after a stop)."""
        held, self._held, self._state = self._held, "", 0
        return held
