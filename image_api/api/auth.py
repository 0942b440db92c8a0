"""Who is asking: the API key a request presents, checked against the scope its operation
declares, and the caller it makes (whose images the request may see)."""

from __future__ import annotations

from flask import Request, g

from ..access import Caller
from ..errors import ApiError, Forbidden, Unauthorized
from ..service import ImageService
from ..signing import SIGNATURE_PARAMETERS
from .openapi import Operation


def authenticate(
    req: Request, service: ImageService, operation: Operation | None
) -> ApiError | None:
    """Every operation names the scope a key needs (`@describe(scope=...)`; None: public).
    CORS preflights (OPTIONS) carry no credentials, by the Fetch standard.

    Downloads (`signed=True`) also take a signed URL, which is judged by its signature
    alone (key headers or not), or need nothing with PUBLIC_READ.

    A failure is returned, not raised: the caller raises it after the rate limit, so that
    guessing keys or signatures spends the client address's budget.
    """
    if operation is None or operation.scope is None or req.method == "OPTIONS":
        return None
    settings = service.settings
    if not settings.auth or (operation.signed and settings.public_read):
        return None
    try:
        if operation.signed and any(name in req.args for name in SIGNATURE_PARAMETERS):
            service.signer.verify(req.path, req.args)
            g.signed_url = True
        else:
            g.api_key = service.keys.authenticate(presented_key(req.environ), operation.scope)
    except (Unauthorized, Forbidden) as refusal:
        return refusal
    return None


def presented_key(environ: dict) -> str | None:
    """The secret in `Authorization: Bearer ...` or in `X-API-Key`. Both may be sent only
    with the same key: which of two keys a request acts as is not guessed."""
    header = environ.get("HTTP_AUTHORIZATION")
    key = environ.get("HTTP_X_API_KEY")
    if key is not None:
        key = key.strip(_OWS)
    if header is None:
        return key
    # Only HTTP's own whitespace around the parts: not Unicode's (NBSP, NEL...).
    scheme, _, secret = header.strip(_OWS).partition(" ")
    if scheme.lower() != "bearer":
        raise Unauthorized("Send the API key as Authorization: Bearer <key>")
    secret = secret.strip(_OWS)
    if key is not None and key != secret:
        raise Unauthorized("Authorization and X-API-Key name different keys: send one")
    return secret


_OWS = " \t"


def caller() -> Caller:
    """Whose images this request may see (see `access.Caller`)."""
    return Caller.of(g.get("api_key"))
