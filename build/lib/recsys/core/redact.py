"""Passwords kept out of what we print: connection URLs in reprs, logs and error messages.

A URL may carry a password as ``scheme://user:password@host`` or as a ``password=`` query
parameter (libpq reads both). Masking works on the text as written, without parsing the URL
first, so a URL that does not parse (the very case that ends in an error message) is masked too.
"""

from __future__ import annotations

import re
import urllib.parse

MASK = "***"

# scheme://user:password@ -- the password runs to the last "@" before the path, query or fragment,
# so a password with a raw "@" is masked whole
_USERINFO_PASSWORD = re.compile(r"^(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/?#@]*:)(?P<password>[^/?#]*)@")
# ?password=... / &sslpassword=...
_QUERY_PASSWORD = re.compile(r"(?P<head>[?&][^=&#]*password=)(?P<password>[^&#]*)", re.IGNORECASE)


def mask_url(url: str) -> str:
    """``url`` with every password in it replaced by ``***``; everything else as it was."""
    url = _USERINFO_PASSWORD.sub(lambda match: f"{match['head']}{MASK}@", url, count=1)
    return _QUERY_PASSWORD.sub(lambda match: f"{match['head']}{MASK}", url)


def url_passwords(url: str) -> set[str]:
    """The passwords in ``url``, as written and percent-decoded (libpq reports either form)."""
    written = [match["password"] for match in _USERINFO_PASSWORD.finditer(url)]
    written += [match["password"] for match in _QUERY_PASSWORD.finditer(url)]
    return {form for password in written for form in (password, urllib.parse.unquote(password)) if form}


def redact(text: str, url: str) -> str:
    """``text`` (an error message, say) with every password of ``url`` in it replaced by ``***``."""
    # longest first: a decoded password can be part of its written form
    for password in sorted(url_passwords(url), key=len, reverse=True):
        text = text.replace(password, MASK)
    return text
