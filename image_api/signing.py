"""Signed download URLs: what lets `<img src="...">` fetch an image without a header.

A signed URL carries `expires` (Unix seconds) and `signature`: HMAC-SHA256 over the path,
the expiry and every other query parameter, with a key derived from `SECRET_KEY`. It names
an image, not a version, so it survives a replace; it grants reading that path until it
expires, whoever holds it (a revoked key's URLs lapse with their expiry; a new SECRET_KEY
ends them all).

Expiries are rounded up to a tenth of the lifetime: every URL is valid for at least
`SIGNED_URL_TTL`, and an image keeps one URL for a tenth of it, so browsers cache it under
one address and the metadata's JSON (and ETag) change only that often.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Iterable
from urllib.parse import urlencode

from werkzeug.datastructures import MultiDict

from .errors import InvalidSignature, SignatureExpired
from .records import Clock

#: The query parameters a signature adds; all others are signed.
SIGNATURE_PARAMETERS = ("expires", "signature")
#: Unix seconds; twelve digits reach the year 33658.
_MAX_EXPIRES_DIGITS = 12


class UrlSigner:
    """Signs and checks download URLs with one secret."""

    def __init__(self, secret: str, ttl: int, clock: Clock):
        # A key of its own, so SECRET_KEY could serve another purpose without the two mixing
        # (and what another verifier of these URLs, such as nginx, would be given).
        self.key = hmac.digest(secret.encode(), b"image-api signed download URLs v1", "sha256")
        self.ttl = ttl
        self.step = max(1, ttl // 10)
        self.clock = clock

    def expiry(self) -> int:
        """When a URL signed now expires: `ttl` from now or a little later (see above)."""
        now = int(self.clock().timestamp())
        return -(-(now + self.ttl) // self.step) * self.step

    def sign(self, path: str, expires: int, parameters: Iterable[tuple[str, str]] = ()) -> str:
        """The query string that makes `path` (with `parameters`) readable until `expires`."""
        parameters = list(parameters)
        signature = self._signature(path, str(expires), parameters)
        return query_string([*parameters, ("expires", str(expires)), ("signature", signature)])

    def verify(self, path: str, args: MultiDict) -> None:
        """Accept a request for `path` with query `args`, or raise `InvalidSignature` or
        `SignatureExpired`. The signature is checked first: an altered expiry is invalid."""
        expires, signature = (args.getlist(name) for name in SIGNATURE_PARAMETERS)
        if len(expires) != 1 or len(signature) != 1:
            raise InvalidSignature("A signed URL has one expires and one signature parameter")
        expires, signature = expires[0], signature[0]
        if not (expires.isascii() and expires.isdigit() and len(expires) <= _MAX_EXPIRES_DIGITS):
            raise InvalidSignature("A signed URL's expires is a number of seconds")
        parameters = [
            (name, value)
            for name, value in args.items(multi=True)
            if name not in SIGNATURE_PARAMETERS
        ]
        expected = self._signature(path, expires, parameters)
        if not hmac.compare_digest(expected.encode(), signature.encode()):
            raise InvalidSignature()
        if int(expires) <= self.clock().timestamp():
            raise SignatureExpired()

    def _signature(self, path: str, expires: str, parameters: list[tuple[str, str]]) -> str:
        # One line each, parameters in a canonical order: no two requests share a message.
        message = "\n".join((path, expires, query_string(sorted(parameters))))
        digest = hmac.digest(self.key, message.encode(), hashlib.sha256)
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def query_string(pairs: list[tuple[str, str]]) -> str:
    """`urlencode(pairs)`, without its quoting character by character when no name or value
    needs any (the usual case: ids, numbers, base64url): it was the largest part of
    signing an upload's two URLs."""
    if all(_UNQUOTED.fullmatch(name) and _UNQUOTED.fullmatch(value) for name, value in pairs):
        return "&".join(f"{name}={value}" for name, value in pairs)
    return urlencode(pairs)


#: What urlencode leaves as it is (RFC 3986's unreserved characters).
_UNQUOTED = re.compile(r"[A-Za-z0-9_.~-]*")
