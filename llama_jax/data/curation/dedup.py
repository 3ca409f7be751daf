"""Deduplication keys: normalized URLs, content hashes, MinHash signatures with LSH band keys, line hashes.

These are the per-document functions; grouping by key and choosing the survivor happen in the Beam transforms
(:mod:`llama_jax.data.curation.dedup_transforms`). All hashes are stable across processes and machines (no use
of Python's salted ``hash``), so any runner and any number of workers makes the same choices.

MinHash (Broder 1997): a document is the set of its word ``shingle_size``-grams (lower-cased, punctuation
dropped). Each shingle gets a 64-bit hash ``x`` (:func:`shingle_hashes`: each distinct word is hashed once with
BLAKE2b, and a shingle's hash mixes its words' hashes in NumPy); permutation ``i`` maps it to
``h_i(x) = ((a_i * x + b_i) mod 2^64) >> 32`` with odd ``a_i`` (multiply-shift hashing), and the signature holds
``min_x h_i(x)`` for ``i < num_perm``. Two documents' signatures agree in a position with probability close to
the Jaccard similarity of their shingle sets, so the fraction of agreeing positions estimates it. LSH splits the
signature into ``bands`` bands of ``rows`` values: two documents with similarity ``s`` share at least one band
with probability ``1 - (1 - s^rows)^bands`` (16 x 8: 0.5 at s = 0.69, 0.98 at s = 0.8, 0.0002 at s = 0.3).
"""

from __future__ import annotations

import functools
import hashlib
import re
import urllib.parse

import numpy as np

_WORD_RE = re.compile(r"\w+", re.UNICODE)
_TRACKING = re.compile(r"^(utm_\w+|gclid|fbclid|mc_cid|mc_eid|ref|ref_src|sessionid|phpsessid|sid)$", re.I)
_DEFAULT_PORTS = {"http": "80", "https": "443"}


def stable_hash(data: str | bytes, digest_size: int = 8) -> int:
    """An unsigned integer hash of ``data`` that is the same in every process (BLAKE2b)."""
    if isinstance(data, str):
        data = data.encode("utf-8", errors="surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=digest_size).digest(), "little")


def normalize_url(url: str, strip_query: bool = False) -> str:
    """A canonical form of ``url``: lower-case scheme and host, no ``www.``, default port, fragment, trailing
    slash or tracking parameters (``utm_*``, ``gclid``, ...), remaining query parameters sorted; ``http`` and
    ``https`` are the same page. ``strip_query`` drops the whole query."""
    raw = url.strip()
    if "://" not in raw:
        raw = "http://" + raw
    parts = urllib.parse.urlsplit(raw)
    host = (parts.hostname or "").lower().rstrip(".")
    if host.startswith("www."):
        host = host[4:]
    port = parts.port
    scheme = parts.scheme.lower()
    netloc = host if port is None or str(port) == _DEFAULT_PORTS.get(scheme) else f"{host}:{port}"
    path = urllib.parse.quote(urllib.parse.unquote(parts.path), safe="/%:@!$&'()*+,;=~-._") or "/"
    path = re.sub(r"/{2,}", "/", path)
    if len(path) > 1:
        path = path.rstrip("/")
    query = ""
    if not strip_query:
        pairs = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
                 if not _TRACKING.match(k)]
        query = urllib.parse.urlencode(sorted(pairs))
    return f"{netloc}{path}" + (f"?{query}" if query else "")


def content_hash(text: str, normalize_whitespace: bool = True) -> str:
    """Hex SHA-256 of the text (after collapsing whitespace runs to one space, if asked)."""
    if normalize_whitespace:
        text = " ".join(text.split())
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()


def shingles(text: str, shingle_size: int) -> set[str]:
    """The set of lower-cased word ``shingle_size``-grams (the whole text if it has fewer words)."""
    words = _WORD_RE.findall(text.lower())
    if len(words) <= shingle_size:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i:i + shingle_size]) for i in range(len(words) - shingle_size + 1)}


def jaccard(a: set, b: set) -> float:
    """Exact Jaccard similarity of two sets (1.0 for two empty sets)."""
    return len(a & b) / len(a | b) if (a or b) else 1.0


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``(a, b)`` uint64 coefficients of the ``num_perm`` hash permutations (``a`` odd)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2**64, size=num_perm, dtype=np.uint64, endpoint=False) | np.uint64(1)
    b = rng.integers(0, 2**64, size=num_perm, dtype=np.uint64, endpoint=False)
    return a, b


@functools.lru_cache(maxsize=1 << 18)
def _word_hash(word: str) -> int:
    """:func:`stable_hash` of a word, remembered: most words recur across a worker's documents."""
    return stable_hash(word)


def _mix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer (a bijection of uint64 that spreads every input bit over the output)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


MAX_SHINGLE_SIZE = 64
_SHINGLE_WEIGHTS = np.random.default_rng(0x5D1D).integers(0, 2**64, size=MAX_SHINGLE_SIZE, dtype=np.uint64,
                                                          endpoint=False) | 1
"""Odd multipliers, one per word position of a shingle (fixed: part of the hash definition)."""


def shingle_hashes(text: str, shingle_size: int) -> np.ndarray:
    """The sorted distinct 64-bit hashes of the shingles of :func:`shingles` (``uint64``; empty for a text
    without words): ``mix64(sum_j c_j * h(w_{i+j}) mod 2^64)`` over the words ``w_i .. w_{i+n-1}`` of each
    shingle, with ``h`` the word's BLAKE2b hash (:func:`stable_hash`, once per distinct word), ``c_j`` fixed odd
    multipliers and ``mix64`` the splitmix64 finalizer. Equal shingles get equal hashes; two different shingles
    collide with probability about ``2^-64``."""
    words = _WORD_RE.findall(text.lower())
    if not words:
        return np.zeros(0, dtype=np.uint64)
    n = min(shingle_size, len(words))
    if n > MAX_SHINGLE_SIZE:
        raise ValueError(f"near_dedup: shingle_size must be at most {MAX_SHINGLE_SIZE}, got {shingle_size}")
    index: dict[str, int] = {}
    ids = np.fromiter((index.setdefault(w, len(index)) for w in words), dtype=np.int64, count=len(words))
    word_hashes = np.fromiter(map(_word_hash, index), dtype=np.uint64, count=len(index))[ids]
    count = len(words) - n + 1
    acc = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            acc += word_hashes[j:j + count] * _SHINGLE_WEIGHTS[j]
        return np.unique(_mix64(acc))


def minhash(text: str, shingle_size: int, a: np.ndarray, b: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """The MinHash signature (``uint32 [num_perm]``) of a text's shingle set (all ``2^32 - 1`` if it is empty)."""
    sig = np.full(a.shape, np.iinfo(np.uint32).max, dtype=np.uint64)
    hashes = shingle_hashes(text, shingle_size)
    with np.errstate(over="ignore"):
        for start in range(0, len(hashes), chunk):
            x = hashes[start:start + chunk, None]
            sig = np.minimum(sig, ((x * a[None, :] + b[None, :]) >> np.uint64(32)).min(axis=0))
    return sig.astype(np.uint32)


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """The fraction of agreeing signature positions."""
    return float(np.mean(np.asarray(sig_a) == np.asarray(sig_b)))


def band_keys(sig: np.ndarray, bands: int, rows: int) -> list[tuple[int, str]]:
    """One ``(band index, hex digest of the band's values)`` LSH key per band."""
    if bands * rows != len(sig):
        raise ValueError(f"near_dedup: bands * rows = {bands} * {rows} must equal num_perm = {len(sig)}")
    data = np.ascontiguousarray(sig, dtype="<u4")
    return [(i, hashlib.blake2b(data[i * rows:(i + 1) * rows].tobytes(), digest_size=12).hexdigest())
            for i in range(bands)]


def line_key(line: str) -> str | None:
    """The dedup key of a line: its whitespace-collapsed text's hash, or None for a blank line."""
    norm = " ".join(line.split())
    return hashlib.blake2b(norm.encode("utf-8", errors="surrogatepass"), digest_size=12).hexdigest() if norm else None
