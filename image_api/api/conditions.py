"""Conditional request headers, read strictly.

If-Match and If-None-Match: Werkzeug reads a malformed list (`If-Match: ffe8...` without
quotes, or an empty value) as tags that match nothing, so a typo answered 412 "changed by
someone else" or a needless 200. It is a 400 that says what is wrong instead.

Dates (If-Modified-Since, If-Unmodified-Since, If-Range): RFC 9110 has a recipient ignore
one that is not an HTTP-date. Werkzeug's parser (the email module's) takes far more (trailing
junk, numeric zones, lists, no weekday), so a mangled date could answer 304 or 412.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from flask import request
from werkzeug.datastructures import ETags
from werkzeug.http import parse_etags

from ..errors import BadRequest
from ..records import ImageRecord
from ..service import Preconditions

_TAG = r'(W/)?"[!#-~]*"'
#: `*`, or a comma-separated list of entity tags (RFC 9110 8.8.3, 13.1.1; not the obsolete
#: non-ASCII characters, which our tags never hold). Empty elements (`"a",,"b",`) are
#: accepted and ignored, as RFC 9110 5.6.1 has a recipient do; a list must name one tag.
ETAG_LIST = rf"[ \t]*(\*|(,[ \t]*)*{_TAG}([ \t]*,([ \t]*{_TAG})?)*)[ \t]*"
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
    """A write's If-Match and If-None-Match, when it has them, as the versions they name: a
    download's ETag (the sha256) or a metadata ETag (`<sha256>.<version>`, whose signed
    URLs' expiry is no part of the version: `links.image_etag`); and its
    If-Unmodified-Since."""
    return Preconditions(
        _versions(etags("If-Match")),
        _versions(etags("If-None-Match")),
        http_date("If-Unmodified-Since"),
    )


#: A metadata ETag with its signed URLs' expiry: the version is the first two parts.
_WITH_EXPIRY = re.compile(r"([0-9a-f]{64}\.[0-9]+)\.[0-9]+")


def _versions(tags: ETags | None) -> ETags | None:
    if tags is None or tags.star_tag:
        return tags
    # Werkzeug reads an empty tag ("" or W/"") as None: it names no version.
    strong = {_version(tag) for tag in tags.as_set() if tag is not None}
    every = {_version(tag) for tag in tags.as_set(include_weak=True) if tag is not None}
    return ETags(strong, every - strong)


def _version(tag: str) -> str:
    match = _WITH_EXPIRY.fullmatch(tag)
    return match[1] if match else tag


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_LONG_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_TIME = r"(?P<hour>\d\d):(?P<minute>\d\d):(?P<second>\d\d)"
_MONTH = rf"(?P<month>{'|'.join(_MONTHS)})"
#: The three forms of RFC 9110 5.6.7: IMF-fixdate, and the obsolete RFC 850 and asctime.
_HTTP_DATES = [
    re.compile(
        rf"(?P<day>{'|'.join(_DAYS)}), (?P<mday>\d\d) {_MONTH} (?P<year>\d{{4}}) {_TIME} GMT"
    ),
    re.compile(
        rf"(?P<day>{'|'.join(_LONG_DAYS)}), (?P<mday>\d\d)-{_MONTH}-(?P<year>\d\d) {_TIME} GMT"
    ),
    re.compile(rf"(?P<day>{'|'.join(_DAYS)}) {_MONTH} (?P<mday>[ \d]\d) {_TIME} (?P<year>\d{{4}})"),
]


def http_date(header: str) -> datetime | None:
    """The HTTP-date in `header`, or None when it is absent or not one (then ignored)."""
    value = request.headers.get(header)
    return None if value is None else parse_http_date(value.strip())


def parse_http_date(value: str) -> datetime | None:
    """An HTTP-date in any of its three forms, checked to the weekday; else None."""
    for form in _HTTP_DATES:
        match = form.fullmatch(value)
        if match is None:
            continue
        year = int(match["year"])
        if len(match["year"]) == 2:
            # RFC 9110: a two-digit year more than 50 years ahead is in the past century.
            this_year = datetime.now(UTC).year
            year += this_year // 100 * 100
            if year > this_year + 50:
                year -= 100
        try:
            moment = datetime(
                year,
                _MONTHS.index(match["month"]) + 1,
                int(match["mday"]),
                int(match["hour"]),
                int(match["minute"]),
                int(match["second"]),
                tzinfo=UTC,
            )
        except ValueError:
            return None  # 31 Feb, 25:00...
        day = match["day"]
        weekday = _DAYS.index(day) if day in _DAYS else _LONG_DAYS.index(day)
        return moment if moment.weekday() == weekday else None
    return None


def is_imf_fixdate(value: str) -> bool:
    """Whether `value` is a valid HTTP-date in its preferred form (`Sun, 06 Nov 1994
    08:49:37 GMT`), not one of the obsolete two."""
    value = value.strip()
    return _HTTP_DATES[0].fullmatch(value) is not None and parse_http_date(value) is not None


def read_preconditions(record: ImageRecord) -> None:
    """A read's If-Match, or without one its If-Unmodified-Since (RFC 9110 13.2.2): a 412
    when the image is not the version they name."""
    environ = request.environ
    if "HTTP_IF_MATCH" not in environ and "HTTP_IF_UNMODIFIED_SINCE" not in environ:
        return  # the usual read: nothing to parse
    Preconditions(
        if_match=_versions(etags("If-Match")),
        if_unmodified_since=http_date("If-Unmodified-Since"),
    ).check(record)
