"""Envoy's ``x-forwarded-client-cert`` (XFCC) header: the client certificate Envoy verified.

Format (Envoy's docs, "x-forwarded-client-cert"): elements separated by ``,``, one per proxy
hop; each element is ``Key=Value`` pairs separated by ``;`` (keys ``By``, ``Hash``, ``Cert``,
``Chain``, ``Subject``, ``URI``, ``DNS``; ``URI`` and ``DNS`` may repeat). A value may be
double-quoted, and then may hold ``,``, ``;`` and ``=``, with ``\\"`` for a quote.

Envoy's listener sets it with ``SANITIZE_SET``: a header the client sent is dropped and
replaced by one element describing the client's certificate, so the gateway reads the last
(only) element. The gateway believes the header only on a connection whose own peer is
Envoy's identity (:mod:`dkv.security.identity`); anyone else's XFCC is ignored and logged.
"""

from __future__ import annotations

from dkv.errors import InvalidArgument
from dkv.security.identity import TRUST_DOMAIN, Identity, identity_from_uri

__all__ = ["XFCC_HEADER", "XfccElement", "identity_from_xfcc", "parse_xfcc"]

XFCC_HEADER = "x-forwarded-client-cert"
XFCC_CHARS_MAX = 16 * 1024  # a few certificates' worth; Envoy's own headers are bounded too

XfccElement = dict[str, list[str]]
"""One hop's pairs, keys lower-cased: ``{"uri": [...], "subject": ["CN=alice"], ...}``."""


def _split(text: str, sep: str) -> list[str]:
    """``text`` split on ``sep`` outside double quotes (a backslash escapes the next char)."""
    out, cur, quoted, escaped = [], [], False, False
    for ch in text:
        if escaped:
            cur.append(ch)
            escaped = False
        elif ch == "\\":
            cur.append(ch)
            escaped = True
        elif ch == '"':
            cur.append(ch)
            quoted = not quoted
        elif ch == sep and not quoted:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if quoted:
        raise InvalidArgument("unterminated quote in x-forwarded-client-cert")
    out.append("".join(cur))
    return out


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        inner, out, escaped = value[1:-1], [], False
        for ch in inner:
            if escaped:
                out.append(ch)
                escaped = False
            elif ch == "\\":
                escaped = True
            else:
                out.append(ch)
        return "".join(out)
    return value


def parse_xfcc(header: str) -> list[XfccElement]:
    """Every element of an XFCC header, in order. InvalidArgument when it is malformed."""
    if len(header) > XFCC_CHARS_MAX:
        raise InvalidArgument(f"x-forwarded-client-cert longer than {XFCC_CHARS_MAX} chars")
    elements: list[XfccElement] = []
    for raw in _split(header, ","):
        if not raw.strip():
            continue
        element: XfccElement = {}
        for pair in _split(raw, ";"):
            if not pair.strip():
                continue
            key, sep, value = pair.partition("=")
            if not sep or not key.strip():
                raise InvalidArgument(
                    f"x-forwarded-client-cert pair {pair.strip()!r} is not Key=Value"
                )
            element.setdefault(key.strip().lower(), []).append(_unquote(value))
        elements.append(element)
    return elements


def _cn(subject: str) -> str | None:
    """The CN of an RFC 4514 subject (``CN=alice,O=dkv``), None without one."""
    for rdn in _split(subject, ","):
        key, sep, value = rdn.partition("=")
        if sep and key.strip().upper() == "CN":
            return value.strip()
    return None


def identity_from_xfcc(header: str, trust_domain: str = TRUST_DOMAIN) -> Identity | None:
    """The client identity in the last element of ``header`` (SPIFFE URI, else the Subject's
    CN as a user), or None when it names none. InvalidArgument when malformed."""
    elements = parse_xfcc(header)
    if not elements:
        return None
    last = elements[-1]
    uris = last.get("uri", [])
    for uri in uris:
        found = identity_from_uri(uri, trust_domain)
        if found is not None:
            return found
    if any(u.startswith("spiffe://") for u in uris):
        return None  # a SPIFFE identity, but not one of ours
    for subject in last.get("subject", []):
        cn = _cn(subject)
        if cn:
            try:
                return Identity.user(cn)
            except InvalidArgument:
                return None
    return None
