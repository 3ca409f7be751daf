"""Model-based quality filter and code/prose routing: linear classifiers over hashed word n-grams.

Both models are logistic regressions (scikit-learn, fitted by SGD with a fixed seed) on hashed word 1- and 2-grams (tokens ``\\w+`` or a single
punctuation character, so code syntax counts), trained by the project from labelled seeds it builds offline
and deterministically (:func:`seed_documents`):

* positives ("good"): documents of the running Python's standard library, as in the embedded corpus
  (:mod:`llama_jax.data.corpus`): every k-th ``.py`` file's source (files under 40 kB) (code) and its docstrings (prose);
* negatives ("junk"), generated from the positives' own vocabulary with a seeded RNG so the classifier must use
  word order and composition rather than vocabulary: word salad (a prose document's words shuffled),
  keyword/SEO spam, navigation and cookie/footer boilerplate, lists of links, and random character noise.

The router is trained on the code positives against the prose positives. :class:`QualityModel` scores a
document as ``(p_good, domain)``; the pipeline keeps it if ``p_good`` reaches the threshold of its domain.
The models are fitted in the launching process and shipped to the workers inside the transform; fitted models
are cached by their inputs (:meth:`QualityModel.cached`), so a later run with the same inputs does not refit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import pickle
import random
import string
import sys
import tempfile

import numpy as np

from llama_jax.data import corpus

TOKEN_PATTERN = r"(?u)\w+|[^\w\s]"
MAX_CHARS = 5000
"""Characters of a document the classifiers read."""
_MAX_SEED_FILE_BYTES = 40_000  # larger files are skipped as seeds (parsing them dominates the seed-building time)

_SPAM = ("buy", "cheap", "best", "price", "online", "free", "shipping", "discount", "deal", "click", "here",
         "now", "sale", "offer", "casino", "bonus", "win", "download", "viagra", "loan", "top", "rated", "review",
         "limited", "today", "order")
_NAV = ("Home", "About us", "Contact", "Login", "Sign up", "Blog", "Products", "Services", "FAQ", "Careers",
        "Privacy policy", "Terms of service", "Cookie settings", "Accept all cookies", "Subscribe to our newsletter",
        "Follow us on social media", "All rights reserved", "Copyright", "Next page", "Previous", "Share", "Tweet",
        "Read more", "Back to top", "Site map", "Search", "Menu", "Skip to content")


def _stdlib_positives(n: int) -> tuple[list[str], list[str]]:
    """``(code, prose)``: up to ``n`` each, from every k-th standard-library ``.py`` file (sorted order)."""
    root = corpus.stdlib_dir()
    files = [f for f in corpus.list_files(root) if f.endswith(".py")]
    stride = max(1, len(files) // max(2 * n, 1))
    code, prose = [], []
    for rel in files[::stride]:
        path = os.path.join(root, rel)
        if os.path.getsize(path) > _MAX_SEED_FILE_BYTES:
            continue
        text = corpus.read_text(path)
        if len(text.split()) >= 20 and len(code) < n:
            code.append(text[:MAX_CHARS])
        doc = corpus.extract_docstrings(text) if len(prose) < n else ""
        if len(doc.split()) >= 20:
            prose.append(doc[:MAX_CHARS])
        if len(code) >= n and len(prose) >= n:
            break
    if not code or not prose:
        raise ValueError(f"quality: found no standard-library seed documents under {root}")
    return code, prose


def _junk(rng: random.Random, vocab: list[str], prose: list[str]) -> str:
    kind = rng.randrange(5)
    if kind == 0:  # word salad
        ws = rng.choice(prose).split()
        rng.shuffle(ws)
        return " ".join(ws)
    if kind == 1:  # keyword spam
        lines = []
        for _ in range(rng.randint(5, 40)):
            k = rng.randint(3, 9)
            lines.append(" ".join(rng.choice(_SPAM + tuple(rng.sample(vocab, 2))) for _ in range(k)).capitalize()
                         + rng.choice(("!", "!!", " >>>", "", " - click here")))
        return "\n".join(lines)
    if kind == 2:  # navigation / cookie / footer boilerplate
        return "\n".join(" | ".join(rng.sample(_NAV, rng.randint(2, 7))) for _ in range(rng.randint(3, 25)))
    if kind == 3:  # lists of links and tags
        return "\n".join(f"{rng.choice(vocab)} {rng.choice(vocab)} - http://{rng.choice(vocab)}.example/"
                         f"{rng.choice(vocab)}?id={rng.randint(1, 99999)}" for _ in range(rng.randint(5, 40)))
    alphabet = string.ascii_letters + string.digits + string.punctuation + "     "  # random character noise
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(100, 2000)))


def seed_documents(n: int, seed: int = 0) -> dict[str, list[str]]:
    """The labelled seeds: ``{"code": [...], "prose": [...], "junk": [...]}`` (``2 n`` junk documents)."""
    code, prose = _stdlib_positives(n)
    rng = random.Random(seed)
    vocab = sorted({w for doc in prose for w in doc.split() if w.isalpha() and len(w) > 2})
    junk = [_junk(rng, vocab, prose)[:MAX_CHARS] for _ in range(len(code) + len(prose))]
    return {"code": code, "prose": prose, "junk": junk}


def _fit(texts: list[str], labels: list[int], n_features: int, seed: int):
    from sklearn.feature_extraction.text import HashingVectorizer  # noqa: PLC0415
    from sklearn.linear_model import SGDClassifier  # noqa: PLC0415
    from sklearn.pipeline import make_pipeline  # noqa: PLC0415

    model = make_pipeline(
        HashingVectorizer(n_features=n_features, ngram_range=(1, 2), token_pattern=TOKEN_PATTERN, lowercase=True,
                          alternate_sign=False, norm="l2"),
        SGDClassifier(loss="log_loss", alpha=1e-5, max_iter=50, tol=None, random_state=seed),
    )
    model.fit(texts, np.asarray(labels))
    return model


def cache_key(n_seed_documents: int, n_features: int, seed: int) -> str:
    """A digest of everything the fitted models depend on: the arguments, this module's source (the seed
    generator and the model settings), the standard library the seeds come from (its folder and the Python build
    that installed it), and the NumPy and scikit-learn versions."""
    import sklearn  # noqa: PLC0415

    h = hashlib.sha256()
    with open(__file__, "rb") as f:
        h.update(f.read())
    h.update(f"|{n_seed_documents}|{n_features}|{seed}|{sys.version}|{os.path.abspath(corpus.stdlib_dir())}|"
             f"{np.__version__}|{sklearn.__version__}".encode())
    return h.hexdigest()[:24]


_FITTED: dict[str, "QualityModel"] = {}  # cache_key -> models fitted or loaded in this process


@dataclasses.dataclass
class QualityModel:
    """The fitted quality classifier (good vs junk) and router (code vs prose)."""

    quality: object
    router: object

    @classmethod
    def train(cls, n_seed_documents: int = 600, n_features: int = 2**18, seed: int = 0) -> "QualityModel":
        seeds = seed_documents(n_seed_documents // 2, seed)
        good = seeds["code"] + seeds["prose"]
        quality = _fit(good + seeds["junk"], [1] * len(good) + [0] * len(seeds["junk"]), n_features, seed)
        router = _fit(good, [1] * len(seeds["code"]) + [0] * len(seeds["prose"]), n_features, seed)
        return cls(quality, router)

    @classmethod
    def cached(cls, n_seed_documents: int = 600, n_features: int = 2**18, seed: int = 0,
               cache_dir: str = "") -> "QualityModel":
        """:meth:`train`'s models, fitted once per set of inputs (:func:`cache_key`): kept for the rest of the
        process and, when ``cache_dir`` is given, in ``cache_dir/quality-<key>.pkl`` for later runs. A cache file
        that cannot be read is refitted and rewritten; one that cannot be written is skipped with a warning."""
        key = cache_key(n_seed_documents, n_features, seed)
        if key in _FITTED:
            return _FITTED[key]
        path = os.path.join(os.path.expanduser(cache_dir), f"quality-{key}.pkl") if cache_dir else ""
        model = None
        if path and os.path.exists(path):
            try:
                with open(path, "rb") as f:
                    model = pickle.load(f)
            except Exception:  # noqa: BLE001 - a truncated or stale pickle fails in many ways; refit then
                model = None
            if not isinstance(model, cls):
                model = None
        if model is None:
            model = cls.train(n_seed_documents, n_features, seed)
            if path:
                _write_atomically(path, pickle.dumps(model))
        _FITTED[key] = model
        return model

    def score(self, texts: list[str]) -> list[tuple[float, str]]:
        """``(p_good, "code" | "prose")`` per text."""
        if not texts:
            return []
        clipped = [t[:MAX_CHARS] for t in texts]
        vectorizer, router_vectorizer = self.quality[0], self.router[0]
        features = vectorizer.transform(clipped)  # both models hash the same features: computed once
        same = router_vectorizer.get_params() == vectorizer.get_params()
        p_good = self.quality[-1].predict_proba(features)[:, 1]
        p_code = self.router[-1].predict_proba(features if same else router_vectorizer.transform(clipped))[:, 1]
        return [(float(g), "code" if c >= 0.5 else "prose") for g, c in zip(p_good, p_code)]


def _write_atomically(path: str, data: bytes) -> None:
    tmp = ""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        if tmp and os.path.exists(tmp):
            os.remove(tmp)
        logging.warning("quality: cannot cache the fitted models in %s (%s); they are refitted next run", path,
                        e.strerror or e)
