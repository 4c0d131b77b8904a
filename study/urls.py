"""URL masking: the one rule for showing a URL that may hold a secret, in a message or a file.

A URL can carry a secret in its user-info (``user:password@host``, the password possibly holding an
unencoded ``@``, ``/`` or ``:``) and in its query (``?password=...``, ``sslpassword``, ``token``,
``secret_key``, ``aws_secret_access_key``...: any parameter whose name holds one of SECRET_WORDS).

- ``masked(text)``: for messages. Each secret becomes ``***``; text that cannot be read as a URL is
  never shown (only its scheme, when it has one); text holding URLs (``--opt=postgresql://...``) has
  each of them masked. ``masked_url(text)``: the same for a value that should be a URL, and nothing of
  one that is not a URL at all (a pasted password is not echoed).
- ``without_secrets(url)``: for files. The password and every secret query parameter are left out
  (the secret then comes from the environment: ``$PGPASSWORD``, ``~/.pgpass``, ``~/.aws``...).
- ``secrets_in(url)`` and ``scrub(text, url)``: a library's error message about ``url`` with every
  secret of it (as written and percent-decoded) replaced by ``***``.
- ``has_secrets(url)``: whether the URL holds any secret at all.

Only the standard library: every command (``analysis`` too) can use it.
"""
from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit

HIDDEN = "***"
# A query parameter whose name (lower-case, '-' and '_' dropped) holds one of these carries a secret.
SECRET_WORDS = ("pass", "pwd", "token", "secret", "key", "credential", "signature", "auth")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_EMBEDDED = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S*")
# The user-info of an authority: a user name (no ':', '/', '?', '#', '[' or '@'), ':', then the password up to
# the LAST '@' (a password may hold '@', '/', '?', ':' unencoded; hiding too much is safe, too little is not).
_USERINFO = re.compile(r"^([^:/?#\[\]@\s]*):(.*)@", re.S)
_PAIR = re.compile(r"(^|[?&;\s])([^=&;#?\s]*)=([^&;#\s]*)")


class UrlError(ValueError):
    """Text that cannot be read as a URL (so it is never shown)."""


def is_url(text: str) -> bool:
    """``scheme://...``, as opposed to a local path."""
    return bool(_SCHEME.match(text or "")) and "://" in text


def scheme_of(text: str) -> str | None:
    m = _SCHEME.match(text or "")
    return m[1].lower() if m else None


def _secret_name(name: str) -> bool:
    key = unquote(name).lower().replace("-", "").replace("_", "")
    return any(word in key for word in SECRET_WORDS)


def _split(text: str) -> tuple[str, str]:
    """(``scheme://`` or "", the rest); raises UrlError for text a URL reader would not take."""
    if any(not ch.isprintable() for ch in text):
        raise UrlError("holds a control character")
    head = text[:text.index("://") + 3] if is_url(text) else ""
    try:
        parts = urlsplit(text if head else f"x://{text}")
        parts.port   # noqa: B018 - raises ValueError for a port that is not a number (or out of range)
    except ValueError as e:
        raise UrlError(str(e)) from None
    return head, text[len(head):]


def _authority(rest: str) -> tuple[str, str]:
    """(authority, what follows it): the authority ends at the first '/', '?' or '#'."""
    m = re.search(r"[/?#]", rest)
    return (rest, "") if m is None else (rest[:m.start()], rest[m.start():])


def _password_span(rest: str) -> tuple[int, int] | None:
    """Where the password lies in ``rest`` (after ``scheme://``), or None when there is none."""
    authority = _authority(rest)[0]
    if "@" in authority:   # readers take the authority's last '@'
        info = authority.rpartition("@")[0]
        user, colon, _ = info.partition(":")
        return (len(user) + 1, len(info)) if colon else None
    m = _USERINFO.match(rest)   # an '@' past the authority: a password holding '/', '?' or '#'
    return m.span(2) if m else None


def _unreadable(text: str) -> str:
    scheme = scheme_of(text) if is_url(text) else None
    return f"{scheme}://<unreadable URL, not shown>" if scheme else "<unreadable URL, not shown>"


def masked(text: str) -> str:
    """For messages: ``text`` with every secret shown as ``***``; an unreadable URL is not shown at all."""
    text = str(text)
    if not is_url(text) and "://" in text:   # text holding URLs: an option=value, a library's message
        return _EMBEDDED.sub(lambda m: masked(m[0]), text)
    try:
        head, rest = _split(text)
    except UrlError:
        return _unreadable(text)
    span = _password_span(rest)
    if span:
        rest = rest[:span[0]] + HIDDEN + rest[span[1]:]
    return head + _PAIR.sub(lambda m: m[0] if not _secret_name(m[2]) else f"{m[1]}{m[2]}={HIDDEN}", rest)


def masked_url(text: str) -> str:
    """For messages about a value that should be a URL: masked when it reads as one; otherwise (a bare word,
    a pasted secret, garbage) not shown at all."""
    return masked(text) if is_url(str(text)) else "<not a URL, not shown>"


def without_secrets(url: str) -> str:
    """For files: ``url`` without its password and secret query parameters (UrlError when unreadable, or
    when its user-info is ambiguous: see ``ambiguity``)."""
    head, rest = _split(url)
    problem = ambiguity(url)
    if problem:
        raise UrlError(problem)
    span = _password_span(rest)
    if span:
        rest = rest[:span[0] - 1] + rest[span[1]:]   # the ':' goes with it
    base, q, query = rest.partition("?")
    if not q:
        return head + base
    query, h, fragment = query.partition("#")
    kept = [p for p in re.split(r"[&;]", query) if p and not _secret_name(p.split("=", 1)[0])]
    return head + base + ("?" + "&".join(kept) if kept else "") + (h + fragment)


def ambiguity(url: str) -> str | None:
    """Why readers could split ``url``'s user-info differently (an unencoded '@', '/', '?' or '#' in the
    user name or password: some readers take the first '@', others the last), or None."""
    try:
        _, rest = _split(url)
    except UrlError:
        return None
    authority = _authority(rest)[0]
    if authority.count("@") > 1 or ("@" not in authority and _USERINFO.match(rest)):
        return ("its user name or password holds an unencoded '@', '/', '?' or '#', which database clients "
                "read differently; percent-encode it (@ as %40, / as %2F, ? as %3F, # as %23), or give the "
                "password through the environment ($PGPASSWORD, ~/.pgpass)")
    return None


def secrets_in(url: str) -> list[str]:
    """The secrets ``url`` holds, as written and percent-decoded, longest first (for ``scrub``)."""
    url = str(url)
    if not is_url(url) and "://" in url:
        return sorted({s for m in _EMBEDDED.finditer(url) for s in secrets_in(m[0])}, key=len, reverse=True)
    try:
        _, rest = _split(url)
    except UrlError:
        return [url] if url else []   # unreadable: the whole text is the secret
    span = _password_span(rest)
    found = [rest[span[0]:span[1]]] if span else []
    found += [m[3] for m in _PAIR.finditer(rest) if _secret_name(m[2])]
    both = {s for f in found for s in (f, unquote(f)) if s}
    return sorted(both, key=len, reverse=True)


def has_secrets(url: str) -> bool:
    return bool(secrets_in(url))


def scrub(text: str, url: str) -> str:
    """``text`` (a library's message about ``url``) with every secret of ``url`` replaced, and any URL in it masked."""
    for secret in secrets_in(url):
        text = text.replace(secret, HIDDEN)
    return masked(text) if "://" in text else text
