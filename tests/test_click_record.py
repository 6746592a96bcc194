"""The click as the writer takes it: a tuple in the column order of `clicks`, spooled as the same JSON
list as before it had a type, so that segments written by an older version still replay."""
from __future__ import annotations

from pathlib import Path

from tracker.store.click import COLUMNS, INSERT_ARRAYS, TEXT_FIELDS, Click, insert_arguments, to_record
from tracker.store.spool import SegmentLock, Spool


def test_the_columns_are_the_tables_in_order() -> None:
    assert COLUMNS == ("click_id", "created_at", "user_id", "merchant", "source", "target", "device",
                       "client_ip", "user_agent", "bot", "method")


def test_the_insert_of_arrays_names_the_same_columns_with_an_array_each() -> None:
    """A small batch goes as INSERT ... SELECT FROM unnest(...): one array per field of Click, in its
    order (the text fields as the rows of $1, in the order insert_arguments puts them), into the
    columns COPY names, in the same order."""
    columns = INSERT_ARRAYS.split("(", 1)[1].split(")", 1)[0]
    assert tuple(c.strip() for c in columns.split(",")) == COLUMNS
    unnested = INSERT_ARRAYS.split("unnest(", 1)[1].split(") AS c", 1)[0]
    expected, row = [], 0
    for i, name in enumerate(Click._fields):
        if i in TEXT_FIELDS:
            row += 1
            expected.append(f"p.a[{row}:{row}]")
        else:
            expected.append({"created_ms": "$2::int8[]", "bot": "$3::bool[]"}[name])
    assert [a.strip() for a in unnested.split(",")] == expected
    click = Click("AZ3uGQw0rBq9aX7mKc1pTQ", 1, "u-1", "nike", "web", "https://www.nike.com/", None, "127.0.0.1",
                  "ua", True, "HEAD")
    texts, ms, bots = insert_arguments([click, click])
    assert texts == [[click[i], click[i]] for i in TEXT_FIELDS] and ms == (1, 1) and bots == (True, True)


def test_a_click_is_spooled_and_read_back_as_an_older_segments_row(tmp_path: Path) -> None:
    click = Click("AZ3uGQw0rBq9aX7mKc1pTQ", 1_767_225_600_123, "u-1", "nike", "web", "https://www.nike.com/",
                  None, "127.0.0.1", "ua", False, "GET")
    older = ["AZ3uGQw0rBq9aX7mKc1pTQ", 1_767_225_600_123, "u-1", "nike", "web", "https://www.nike.com/",
             None, "127.0.0.1", "ua", False, "GET"]  # a row as segments held it before Click
    spool = Spool(tmp_path)
    spool.append([list(click)], sync=False)
    spool.append([older], sync=False)
    spool.close()
    [path] = spool.segments()
    lock = SegmentLock.take(path)
    assert lock is not None
    try:
        assert [row for record in lock.records() for row in record] == [older, older]
    finally:
        lock.release()
    assert to_record(click) == to_record(older)
    assert to_record(click)[1].isoformat() == "2026-01-01T00:00:00.123000+00:00"
