"""A background loop's outage is logged once when it starts and once when it ends, not per attempt."""
from tracker.store.tasks import Outage


class Lines:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def info(self, event: str, **_: object) -> None:
        self.lines.append(("info", event))

    def warning(self, event: str, **_: object) -> None:
        self.lines.append(("warning", event))


def test_an_outage_is_two_lines_however_many_attempts_fail() -> None:
    log = Lines()
    outage = Outage(log, "loop_failed", "loop_recovered")
    outage.ok()  # working from the start: nothing to say
    for _ in range(5):
        outage.failed(OSError("connection refused"))
    assert outage.down
    outage.ok()
    outage.ok()
    assert not outage.down
    assert log.lines == [("warning", "loop_failed"), ("info", "loop_recovered")]
