"""StopStringMatcher: stops split across pieces, overlapping stops, held tails."""

import random

import pytest

from shared.tokenizer import StopStringMatcher


def feed(matcher: StopStringMatcher, pieces: list[str]) -> tuple[str, bool]:
    """All emitted text (flushed at the end if the stream did not stop) and whether it stopped."""
    out = []
    for piece in pieces:
        text, stopped = matcher.push(piece)
        out.append(text)
        if stopped:
            return "".join(out), True
    return "".join(out) + matcher.flush(), False


def reference(text: str, stops: list[str]) -> tuple[str, bool]:
    """Cut before the longest stop among those that end first, by brute force."""
    for end in range(1, len(text) + 1):
        ending = [stop for stop in stops if text[:end].endswith(stop)]
        if ending:
            return text[: end - max(map(len, ending))], True
    return text, False


def test_stop_within_one_piece_is_cut_out():
    assert StopStringMatcher(["END"]).push("Hello END world") == ("Hello ", True)


def test_stop_split_across_pieces_is_never_emitted():
    matcher = StopStringMatcher(["END"])
    assert matcher.push("Hello E") == ("Hello ", False)
    assert matcher.push("N") == ("", False)
    assert matcher.push("D and more") == ("", True)
    assert matcher.is_stopped


def test_false_start_is_released_when_it_cannot_be_a_stop():
    matcher = StopStringMatcher(["END"])
    assert matcher.push("xEN") == ("x", False)
    assert matcher.push("Xy") == ("ENXy", False)


def test_held_tail_restarts_inside_itself():
    # "aab" after "aa": the held "aa" must keep its last "a" as a possible start.
    matcher = StopStringMatcher(["aab"])
    assert matcher.push("aa") == ("", False)
    assert matcher.push("a") == ("a", False)
    assert matcher.push("b!") == ("", True)


def test_flush_returns_held_tail_when_stream_ends_without_stop():
    matcher = StopStringMatcher(["\n\nUser:"])
    assert matcher.push("answer\n\nUs") == ("answer", False)
    assert matcher.flush() == "\n\nUs"
    assert matcher.flush() == ""


def test_after_a_stop_push_emits_nothing():
    matcher = StopStringMatcher(["."])
    assert matcher.push("One. Two.") == ("One", True)
    assert matcher.push("Three") == ("", True)
    assert matcher.flush() == ""


@pytest.mark.parametrize(
    ("stops", "text", "expected"),
    [
        (["abcd", "bc"], "xabcd", "xa"),  # "bc" ends first, though "abcd" starts first
        (["ab", "abc"], "xabc", "x"),  # "ab" ends first
        (["bc", "abc"], "xabc", "x"),  # both end at c: cut before the longer
        (["c", "abc"], "xabc", "x"),
        (["ana"], "bananas", "b"),
        (["</s>", "<|end|>"], "ok <|end|>", "ok "),
        (["😀"], "hi 😀 there", "hi "),
    ],
)
def test_overlapping_stops_cut_where_the_first_stop_ends(stops, text, expected):
    for size in range(1, len(text) + 1):  # every way of cutting text into equal pieces
        pieces = [text[i : i + size] for i in range(0, len(text), size)]
        assert feed(StopStringMatcher(stops), pieces) == (expected, True)


def test_result_does_not_depend_on_how_text_is_split():
    rng = random.Random(42)
    for _ in range(2000):
        stops = ["".join(rng.choices("abc", k=rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choices("abcd", k=rng.randint(0, 20)))
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 6))))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert feed(StopStringMatcher(stops), pieces) == reference(text, stops), (stops, pieces)


def test_held_tail_is_shorter_than_longest_stop():
    matcher = StopStringMatcher(["abcdef", "xy"])
    emitted, _ = matcher.push("zzzzabcde")
    assert emitted == "zzzz"
    emitted, _ = matcher.push("x")
    assert emitted == "abcde"
    assert matcher.flush() == "x"


def test_no_stops_passes_text_through():
    matcher = StopStringMatcher([])
    assert matcher.push("anything") == ("anything", False)
    assert matcher.flush() == ""


def test_empty_stop_string_is_rejected():
    with pytest.raises(ValueError, match="non-empty"):
        StopStringMatcher(["ok", ""])
