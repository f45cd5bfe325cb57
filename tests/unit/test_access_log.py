"""The request id a caller sends is kept only when it cannot forge fields of the log line."""

from __future__ import annotations

import pytest

from app.access_log import request_id_from


@pytest.mark.parametrize("supplied", ["abc-123", "trace.id:42_x", "A" * 128])
def test_sane_ids_are_kept(supplied: str) -> None:
    assert request_id_from([(b"x-request-id", supplied.encode())]) == supplied


@pytest.mark.parametrize(
    "supplied", [b"", b"a b", b'x" status=200', b"id=forged", b"\xff\xfe", b"A" * 129, b"line\nbreak"]
)
def test_other_ids_are_replaced(supplied: bytes) -> None:
    replaced = request_id_from([(b"x-request-id", supplied)])
    assert replaced.startswith("req-") and len(replaced) == 36


def test_without_a_header_a_new_id() -> None:
    first, second = request_id_from([]), request_id_from([])
    assert first.startswith("req-") and first != second
