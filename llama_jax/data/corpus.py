"""The embedded default corpus: text every Python installation carries, built deterministically.

Two sources, from the running interpreter's standard library (``sysconfig.get_paths()["stdlib"]``, without
``site-packages`` / ``dist-packages`` / ``__pycache__``):

* ``"code"``: each ``.py`` file's source text is one document.
* ``"prose"``: for each ``.py`` file, its module / class / function docstrings (extracted with ``ast``, indentation
  cleaned) joined by blank lines are one document; each ``.txt`` / ``.rst`` file outside
  test directories is one document too.

Files are visited in sorted path order and read as bytes decoded as UTF-8 with ``errors="replace"``; empty
files produce no document and unparseable files produce a code document but no docstring document. A document
goes to the ``"validation"`` split when the first 8 bytes of its text's SHA-256 taken modulo 1000 fall below
:data:`VALIDATION_PERMILLE` (1.5%), otherwise to ``"train"``; identical documents therefore share a split.

The corpus is cached under ``<cache_dir>/stdlib_corpus/<fingerprint>/`` as ``{source}.{split}.jsonl`` (one
``{"text": ..., "path": ...}`` object per line) with the trained default tokenizer ``tokenizer-3840.model`` beside
them. The fingerprint covers the Python version, the root directory and every file's relative path and size,
so a different interpreter builds (and caches) its own corpus: outputs are identical for the same Python
installation, not across Python versions. Writes go to a temporary directory renamed into place, so
concurrent builders never see half-written files.

The default tokenizer (:func:`default_tokenizer`) is byte-level BPE with 3840 ranks + 256 specials = 4096 ids
(the ``tiny`` model's vocabulary), trained on the train split of both sources, where the code documents are
deterministically subsampled (every k-th, in sorted order) to at most :data:`TOKENIZER_TRAIN_CHARS` characters
of code, which keeps training to a few seconds.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Iterator

from llama_jax.data.tokenizer import Tokenizer, train_bpe

SOURCES = ("code", "prose")
SPLITS = ("train", "validation")
VALIDATION_PERMILLE = 15
DEFAULT_BPE_RANKS = 3840
"""BPE ranks of the default tokenizer; with the 256 specials it has 4096 ids."""
TOKENIZER_TRAIN_CHARS = 8_000_000
"""At most this many characters of code documents train the default tokenizer (all prose is used)."""
CORPUS_FORMAT_VERSION = 1
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
_TEST_DIRS = frozenset({"test", "tests", "idle_test"})


def stdlib_dir() -> str:
    """The running interpreter's standard-library directory."""
    return sysconfig.get_paths()["stdlib"]


def list_files(root: str) -> list[str]:
    """Sorted relative paths of the ``.py``, ``.txt`` and ``.rst`` files under ``root``."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"corpus root directory not found: {root}")
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            if name.endswith((".py", ".txt", ".rst")):
                out.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(out)


def read_text(path: str) -> str:
    """A file's contents decoded as UTF-8, invalid bytes replaced by U+FFFD."""
    with open(path, "rb") as f:
        return f.read().decode("utf-8", errors="replace")


def extract_docstrings(source: str) -> str:
    """Module, class and function docstrings of Python ``source`` joined by blank lines ("" if unparseable)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return ""
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and doc.strip():
                docs.append(doc.strip())
    return "\n\n".join(docs)


def is_validation(text: str) -> bool:
    """Whether a document belongs to the validation split (stable hash of its text)."""
    digest = hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") % 1000 < VALIDATION_PERMILLE


def iter_documents(root: str) -> Iterator[tuple[str, str, str]]:
    """Yields ``(source, relative_path, text)`` for every non-empty document under ``root``, in sorted order."""
    for rel in list_files(root):
        text = read_text(os.path.join(root, rel))
        if not text.strip():
            continue
        if rel.endswith(".py"):
            yield "code", rel, text
            prose = extract_docstrings(text)
            if prose:
                yield "prose", rel, prose
        elif not _TEST_DIRS.intersection(rel.split(os.sep)[:-1]):
            yield "prose", rel, text


@functools.lru_cache(maxsize=8)
def _fingerprint(root: str) -> str:
    """The corpus version of `root` (the standard library does not change while a process runs: computed once)."""
    h = hashlib.sha256()
    h.update(f"v{CORPUS_FORMAT_VERSION}|{sys.version}|{os.path.abspath(root)}".encode())
    for rel in list_files(root):
        h.update(f"|{rel}:{os.path.getsize(os.path.join(root, rel))}".encode())
    return h.hexdigest()[:16]


def corpus_dir(cache_dir: str, root: str | None = None) -> str:
    """Builds the corpus (if not cached) and returns its directory."""
    root = root or stdlib_dir()
    out = os.path.join(cache_dir, "stdlib_corpus", _fingerprint(root))
    if os.path.exists(os.path.join(out, "DONE")):
        return out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(out))
    try:
        files = {
            (src, split): open(os.path.join(tmp, f"{src}.{split}.jsonl"), "w", encoding="utf-8")
            for src in SOURCES
            for split in SPLITS
        }
        counts = {key: 0 for key in files}
        try:
            for source, rel, text in iter_documents(root):
                key = (source, "validation" if is_validation(text) else "train")
                files[key].write(json.dumps({"text": text, "path": rel}, ensure_ascii=False) + "\n")
                counts[key] += 1
        finally:
            for f in files.values():
                f.close()
        if not any(counts.values()):
            raise ValueError(f"no documents found under corpus root {root}")
        with open(os.path.join(tmp, "DONE"), "w", encoding="utf-8") as f:
            json.dump({f"{s}.{p}": n for (s, p), n in counts.items()}, f)
        try:
            os.rename(tmp, out)
        except OSError:  # Another process finished first; its output is identical.
            if not os.path.exists(os.path.join(out, "DONE")):
                raise
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def document_path(cache_dir: str, source: str, split: str, root: str | None = None) -> str:
    """The cached jsonl file of one source and split (building the corpus if needed)."""
    if source not in SOURCES:
        raise ValueError(f"unknown corpus source {source!r}; expected one of {SOURCES}")
    if split not in SPLITS:
        raise ValueError(f"unknown corpus split {split!r}; expected one of {SPLITS}")
    return os.path.join(corpus_dir(cache_dir, root), f"{source}.{split}.jsonl")


def load_documents(cache_dir: str, source: str, split: str, root: str | None = None) -> list[str]:
    """The texts of one source and split, in corpus order (a new list each call; the parsed file is read once per
    process: every logical data shard of a stage reads its slice of the same list)."""
    path = document_path(cache_dir, source, split, root)
    stat = os.stat(path)
    return list(_read_texts(path, stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=8)
def _read_texts(path: str, size: int, mtime_ns: int) -> tuple[str, ...]:  # noqa: ARG001 - the cache key
    with open(path, encoding="utf-8") as f:
        return tuple(json.loads(line)["text"] for line in f)


def tokenizer_training_texts(cache_dir: str, root: str | None = None) -> list[str]:
    """The deterministic training sample of the default tokenizer (train split only)."""
    prose = load_documents(cache_dir, "prose", "train", root)
    code = load_documents(cache_dir, "code", "train", root)
    total = sum(len(t) for t in code)
    stride = max(1, -(-total // TOKENIZER_TRAIN_CHARS))
    return prose + code[::stride]


def default_tokenizer(cache_dir: str, root: str | None = None, vocab_size: int = DEFAULT_BPE_RANKS) -> Tokenizer:
    """The embedded default tokenizer (``vocab_size`` BPE ranks + 256 specials), trained once and cached."""
    directory = corpus_dir(cache_dir, root)
    path = os.path.join(directory, f"tokenizer-{vocab_size}.model")
    if not os.path.exists(path):
        tmp = f"{path}.tmp{os.getpid()}"
        train_bpe(tokenizer_training_texts(cache_dir, root), vocab_size, tmp)
        os.replace(tmp, path)
    return Tokenizer.from_file(path)
