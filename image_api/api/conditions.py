"""Conditional request headers: If-Match and If-None-Match, checked for syntax.

Werkzeug reads a malformed list (`If-Match: ffe8...` without quotes, or an empty value) as
tags that match nothing, so a typo answered 412 "changed by someone else" or a needless 200.
It is a 400 that says what is wrong instead.
"""

from __future__ import annotations

import re

from flask import request
from werkzeug.datastructures import ETags
from werkzeug.http import parse_etags

from ..errors import BadRequest
from ..service import Preconditions

_TAG = r'(W/)?"[!#-~]*"'
#: `*`, or a comma-separated list of entity tags (RFC 9110 8.8.3, 13.1.1; not the obsolete
#: non-ASCII characters, which our tags never hold).
ETAG_LIST = rf"[ \t]*(\*|{_TAG}([ \t]*,[ \t]*{_TAG})*)[ \t]*"
_ETAG_LIST = re.compile(ETAG_LIST)


def etags(header: str) -> ETags | None:
    """The entity tags of `header` (If-Match or If-None-Match); None when it is absent."""
    value = request.headers.get(header)
    if value is None:
        return None
    if not _ETAG_LIST.fullmatch(value):
        raise BadRequest(f'{header} must be * or a list of quoted entity tags ("...", W/"...")')
    return parse_etags(value)


def preconditions() -> Preconditions:
    """The request's If-Match and If-None-Match, when it has them."""
    return Preconditions(etags("If-Match"), etags("If-None-Match"))
