"""Who is asking: the API key a request presents, checked against the scope its operation
declares, and the caller it makes (whose images the request may see)."""

from __future__ import annotations

from flask import g, request

from ..access import Caller, Forbidden, Unauthorized
from ..service import current_service
from ..signing import SIGNATURE_PARAMETERS
from .openapi import current_operation


def authenticate() -> None:
    """Every operation names the scope a key needs (`@describe(scope=...)`; None: public).
    CORS preflights (OPTIONS) carry no credentials, by the Fetch standard.

    Downloads (`signed=True`) also take a signed URL, which is judged by its signature
    alone (key headers or not), or need nothing with PUBLIC_READ.

    A failure is kept, not raised, until `refuse_unauthenticated`: the rate limit runs in
    between, so that guessing keys or signatures spends the client address's budget.
    """
    operation = current_operation()
    if operation is None or operation.scope is None or request.method == "OPTIONS":
        return
    service = current_service()
    if not service.settings.auth or (operation.signed and service.settings.public_read):
        return
    try:
        if operation.signed and any(name in request.args for name in SIGNATURE_PARAMETERS):
            service.signer.verify(request.path, request.args)
        else:
            g.api_key = service.keys.authenticate(presented_key(), operation.scope)
    except (Unauthorized, Forbidden) as refusal:
        g.refusal = refusal


def refuse_unauthenticated() -> None:
    """Raise what `authenticate` found wrong, once the request has spent its budget."""
    refusal = g.pop("refusal", None)
    if refusal is not None:
        raise refusal


def presented_key() -> str | None:
    """The secret in `Authorization: Bearer ...`, else in `X-API-Key`."""
    header = request.headers.get("Authorization")
    if header is not None:
        # Only HTTP's own whitespace around the parts: not Unicode's (NBSP, NEL...).
        scheme, _, secret = header.strip(_OWS).partition(" ")
        if scheme.lower() != "bearer":
            raise Unauthorized("Send the API key as Authorization: Bearer <key>")
        return secret.strip(_OWS)
    key = request.headers.get("X-API-Key")
    return None if key is None else key.strip(_OWS)


_OWS = " \t"


def caller() -> Caller:
    """Whose images this request may see (see `access.Caller`)."""
    return Caller.of(g.get("api_key"))
