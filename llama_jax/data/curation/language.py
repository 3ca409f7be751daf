"""Per-document language identification offline with py3langid (langid.py's 97-language naive Bayes model,
shipped inside the package), probabilities normalized over the languages."""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def _identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier  # noqa: PLC0415 - loaded once per worker

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def identify(text: str, max_chars: int = 4000) -> tuple[str, float]:
    """``(ISO 639-1 code, probability)`` of the most likely language of the first ``max_chars`` characters."""
    lang, prob = _identifier().classify(text[:max_chars])
    return str(lang), float(prob)
