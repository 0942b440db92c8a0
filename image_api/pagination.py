"""Cursors for the newest-first list: opaque tokens naming the last item a page showed."""

from __future__ import annotations

import base64
import binascii
from datetime import UTC, datetime

from .errors import BadRequest
from .records import Cursor, ImageRecord, valid_id


def encode_cursor(record: ImageRecord) -> str:
    """The token for the position just after `record`."""
    raw = f"{record.uploaded_at.isoformat()}|{record.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(token: str) -> Cursor:
    """The position a cursor token names; `BadRequest` if it is not one of ours."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        moment, image_id = raw.split("|")
        uploaded_at = datetime.fromisoformat(moment)
        if uploaded_at.tzinfo is None or not valid_id(image_id):
            raise ValueError(moment)
        return uploaded_at.astimezone(UTC), image_id
    except (ValueError, OverflowError, binascii.Error, UnicodeDecodeError):
        raise BadRequest("Malformed cursor") from None
