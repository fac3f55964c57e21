"""Handler registration rules (pure)."""

from __future__ import annotations

import uuid

import pytest

from inbox.errors import InboxError
from tests.support.inbox import Rec, headers_for

A, B, C = (uuid.UUID(int=i) for i in (1, 2, 3))


def test_handlers_refuse_ambiguous_registrations_and_only_their_own_validation_is_final():
    from pydantic import BaseModel, ValidationError

    from inbox import Handlers, Message, NonRetryable, PayloadInvalid

    class Ping(BaseModel):
        n: int

    with pytest.raises(InboxError, match="unknown='drop'"):
        Handlers(unknown="drop")
    handlers = Handlers()
    handlers.on("Ping", Ping)(lambda conn, msg, ping: Ping.model_validate({"n": "not a number"}))
    with pytest.raises(InboxError, match="already has a handler"):
        handlers.on("Ping")(lambda conn, msg: None)
    with pytest.raises(InboxError, match="already has a handler"):
        handlers.ignore("Ping")

    def message(value):
        return Message(Rec("t", 0, 0, value, headers_for(A, event_type="Ping")), A, "c")

    with pytest.raises(PayloadInvalid, match="n: Input should be a valid integer") as err:
        handlers(None, message(b'{"n": "x"}'))
    assert isinstance(err.value, NonRetryable)
    with pytest.raises(PayloadInvalid, match="tombstone"):
        handlers(None, message(None))
    with pytest.raises(ValidationError) as inner:  # raised by the function itself: retried like any error
        handlers(None, message(b'{"n": 1}'))
    assert not isinstance(inner.value, NonRetryable)

