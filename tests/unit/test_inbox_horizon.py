"""The dedupe window checked against the replay horizon (pure)."""

from __future__ import annotations

import pytest

from inbox.errors import InboxError


def test_dedupe_window_check_refuses_short_or_unreadable_horizons_and_warns_on_a_thin_margin(caplog):
    import math

    from inbox.horizon import DAY_S, check_window

    check_window("c", 10 * DAY_S, {"a": 7 * DAY_S}, allow_short=False)  # 3 days to spare: silent
    assert caplog.records == []
    check_window("c", 7 * DAY_S, {"a": 7 * DAY_S}, allow_short=False)  # covered, but no margin
    assert "less than 2 days to spare" in caplog.text and "OUTBOX_INBOX_RETENTION_DAYS=9" in caplog.text
    with pytest.raises(InboxError) as err:
        check_window("c", 7 * DAY_S, {"a": 7 * DAY_S + 1, "b": math.inf, "c": "its configuration could not be read"},
                     allow_short=False)
    text = str(err.value)
    assert "topic a keeps records for 7.00001 days" in text and "OUTBOX_INBOX_RETENTION_DAYS=10" in text
    assert "topic b keeps records forever" in text and "topic c: its configuration could not be read" in text
    caplog.clear()
    check_window("c", 3600, {"a": DAY_S}, allow_short=True)
    assert "STARTING ANYWAY" in caplog.text and "inbox retention, 1 hour" in caplog.text

