"""completions.py: stop strings found as the text grows, the first one to complete, and the
held-back tail that could still begin one, equal to a plain search on every text."""
import random

import pytest

from completions import StopMatcher


def naive(text: str, stops: list[str]) -> tuple[int, int]:
    """(where the first stop to complete begins, or -1; the held-back length)."""
    for end in range(1, len(text) + 1):
        found = [end - len(stop) for stop in stops if text[:end].endswith(stop)]
        if found:
            return min(found), 0
    held = max((size for stop in stops for size in range(1, len(stop))
                if text.endswith(stop[:size])), default=0)
    return -1, held


@pytest.mark.parametrize("seed", range(30))
def test_matches_a_plain_search_on_random_text_fed_in_random_pieces(seed):
    rng = random.Random(seed)
    alphabet = "ab a\nb"
    stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6)))
             for _ in range(rng.randint(1, 4))]
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
    matcher, fed, found = StopMatcher(stops), "", -1
    while len(fed) < len(text) and found < 0:
        start = len(fed)
        fed = text[:start + rng.randint(1, 5)]
        found = matcher.feed(fed, start)
    expected_at, expected_held = naive(fed, stops)
    assert found == expected_at
    if found < 0:
        assert matcher.held_back == expected_held


def test_a_stop_that_overlaps_itself_is_found_and_its_start_held_back():
    matcher = StopMatcher(["abab", "xyz"])
    assert matcher.feed("aba", 0) == -1 and matcher.held_back == 3
    assert matcher.feed("abaab", 3) == -1 and matcher.held_back == 2
    assert matcher.feed("abaabab", 5) == 3


def test_of_two_stops_ending_at_one_character_the_one_that_began_first_wins():
    assert StopMatcher(["bc", "abc"]).feed("xabc", 0) == 1
