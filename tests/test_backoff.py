import random

from tracker.domain.backoff import Backoff, jittered


def test_each_failure_in_a_row_waits_longer_up_to_the_cap_and_a_success_starts_again():
    backoff = Backoff(first=1.0, cap=5.0)
    waits = [backoff.next() for _ in range(6)]
    for wait, full in zip(waits, [1, 2, 4, 5, 5, 5]):
        assert full / 2 <= wait <= full
    backoff.reset()
    assert 0.5 <= backoff.next() <= 1.0


def test_the_jitter_spreads_the_waits_of_many_workers():
    waits = {round(jittered(3, 1.0, 60.0, random.Random(seed)), 3) for seed in range(20)}
    assert len(waits) > 10 and all(2.0 <= w <= 4.0 for w in waits)
