"""Main-text extraction from HTML with trafilatura: navigation, cookie banners, footers and other boilerplate
are dropped; code blocks (``<pre>``/``<code>``, indentation kept) and TeX math in the text are kept. MathML
``<math>`` elements, which trafilatura drops, are first replaced by their TeX annotation (or their text) in
``$...$``, so math survives extraction too."""

from __future__ import annotations

import html as html_lib
import re

_MATH_RE = re.compile(r"<math\b[^>]*>(.*?)</math\s*>", re.IGNORECASE | re.DOTALL)
_TEX_RE = re.compile(r"<annotation\b[^>]*encoding=[\"']application/x-tex[\"'][^>]*>(.*?)</annotation\s*>",
                     re.IGNORECASE | re.DOTALL)
_TAG_RE = re.compile(r"<[^>]+>")


def _math_to_tex(m: re.Match) -> str:
    inner = m.group(1)
    tex = _TEX_RE.search(inner)
    body = tex.group(1) if tex else " ".join(_TAG_RE.sub(" ", inner).split())
    return f"<span>${html_lib.unescape(body).strip()}$</span>"


def check_available() -> None:
    """Imports trafilatura, so that an install without its dependencies (lxml 5.2+ needs the separate
    ``lxml_html_clean`` package) fails before any work, naming what is missing."""
    try:
        import trafilatura  # noqa: F401, PLC0415
    except ImportError as e:
        raise ImportError(f"extract: HTML extraction cannot import trafilatura: {' '.join(str(e).split())} "
                          "(install the pinned requirements: pip install -r requirements.txt)") from e


def extract(html: str, include_tables: bool = True, include_comments: bool = False) -> str:
    """The main text of an HTML page ("" when there is none)."""
    import trafilatura  # noqa: PLC0415 - heavy import, only where extraction runs

    html = _MATH_RE.sub(_math_to_tex, html)
    text = trafilatura.extract(html, include_tables=include_tables, include_comments=include_comments,
                               include_formatting=False, deduplicate=False)
    return text or ""
