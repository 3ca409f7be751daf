"""PII masking: e-mail addresses, phone numbers and IP addresses (v4 and v6) replaced by placeholders.

Patterns are conservative: an IPv4 address needs four dot-separated octets 0-255 (so version strings like
``3.12.1`` and dates are left alone); an IPv6 candidate needs three non-empty groups
(not ``x[::2]``) and must parse with :mod:`ipaddress`; a phone
number needs 9-15 digits in groups separated by spaces, dots or dashes (or a leading ``+`` country code), so
ISO dates (``2024-01-31``), times and plain integers are not phone numbers.
"""

from __future__ import annotations

import ipaddress
import re

EMAIL_RE = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,24}(?![\w-])")
IPV4_RE = re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
                     r"(?![\w.]\d|\w)")
IPV6_RE = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
PHONE_RE = re.compile(
    r"(?<![\w+.-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]\d{3,5}(?![\w-]|\.\d)"
)

# What every match of each pattern above contains, found by a much cheaper scan; a text without it is not searched
# with the full pattern.
_EMAIL_HINT = re.compile(r"[A-Za-z0-9._%+-]@[A-Za-z0-9-]+\.")
_IPV4_HINT = re.compile(r"\d\.\d{1,3}\.\d{1,3}\.\d")
_IPV6_HINT = re.compile(r":[0-9A-Fa-f]{0,4}:")
_PHONE_HINT = re.compile(r"\d{3}[ .-]\d{3}")


def _digits(s: str) -> int:
    return sum(ch.isdigit() for ch in s)


def mask(text: str, email: str = "<EMAIL>", phone: str = "<PHONE>", ip: str = "<IP_ADDRESS>"
         ) -> tuple[str, dict[str, int]]:
    """``text`` with PII replaced, and how many of each kind were masked (``{"email", "phone", "ip"}``)."""
    counts = {"email": 0, "phone": 0, "ip": 0}

    def sub(kind, replacement, check=None):
        def repl(m):
            if check is not None and not check(m.group(0)):
                return m.group(0)
            counts[kind] += 1
            return replacement
        return repl

    def is_ipv6(s):
        if sum(1 for group in s.split(":") if group) < 3:  # not slices like x[::2] or a::b
            return False
        try:
            ipaddress.IPv6Address(s)
            return True
        except ValueError:
            return False

    if "@" in text and _EMAIL_HINT.search(text):
        text = EMAIL_RE.sub(sub("email", email), text)
    if _IPV4_HINT.search(text):
        text = IPV4_RE.sub(sub("ip", ip), text)
    if _IPV6_HINT.search(text):
        text = IPV6_RE.sub(sub("ip", ip, is_ipv6), text)
    if _PHONE_HINT.search(text):
        text = PHONE_RE.sub(sub("phone", phone, lambda s: 9 <= _digits(s) <= 15), text)
    return text, counts
