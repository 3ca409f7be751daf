"""Embedded corpus: deterministic build, robust reading, hash split, the 4096-id default tokenizer."""
import filecmp
import json
import os

import pytest

from llama_jax.data import corpus


def _fake_stdlib(root) -> None:
    files = {
        "a.py": '"""Module doc."""\n\nclass A:\n    """Class doc.\n\n    More."""\n\n    def f(self):\n        """F doc."""\n',
        "pkg/__init__.py": "",
        "pkg/b.py": "x = 1\n",
        "pkg/broken.py": "def f(:\n    '''never parsed'''\n",
        "notes.txt": "Plain prose notes.\n",
        "test/data.txt": "1 2 3\n",
        "site-packages/third_party.py": '"""Not stdlib."""\n',
    }
    for rel, text in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    with open(os.path.join(root, "bad_bytes.py"), "wb") as f:
        f.write(b'"""Caf\xe9 \xff doc."""\n')


def _all_docs(cache, root):
    return {
        (src, split): corpus.load_documents(cache, src, split, root)
        for src in corpus.SOURCES
        for split in corpus.SPLITS
    }


def test_build_contents_and_determinism(tmp_path):
    root = str(tmp_path / "lib")
    _fake_stdlib(root)
    docs = _all_docs(str(tmp_path / "c1"), root)
    code = sorted(docs["code", "train"] + docs["code", "validation"])
    prose = sorted(docs["prose", "train"] + docs["prose", "validation"])
    assert len(code) == 4  # a.py, bad_bytes.py, pkg/b.py, pkg/broken.py; empty and site-packages skipped
    assert any("\ufffd" in t for t in code)
    assert sorted(prose) == sorted(
        ["Module doc.\n\nClass doc.\n\nMore.\n\nF doc.", "Caf\ufffd \ufffd doc.", "Plain prose notes.\n"]
    )
    for (_, split), texts in docs.items():
        assert all(corpus.is_validation(t) == (split == "validation") for t in texts)
    # A second build elsewhere is byte-identical.
    d1, d2 = corpus.corpus_dir(str(tmp_path / "c1"), root), corpus.corpus_dir(str(tmp_path / "c2"), root)
    names = sorted(os.listdir(d1))
    assert names == sorted(os.listdir(d2)) and "DONE" in names
    assert all(filecmp.cmp(os.path.join(d1, n), os.path.join(d2, n), shallow=False) for n in names)


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        corpus.corpus_dir(str(tmp_path), str(tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no documents"):
        corpus.corpus_dir(str(tmp_path / "cache"), str(empty))
    with pytest.raises(ValueError, match="'poetry'"):
        corpus.document_path(str(tmp_path), "poetry", "train", str(empty))


def test_stdlib_corpus_split_and_default_tokenizer(corpus_cache, default_tokenizer):
    directory = corpus.corpus_dir(corpus_cache)
    with open(os.path.join(directory, "DONE")) as f:
        counts = json.load(f)
    for src in corpus.SOURCES:
        n_val, n_train = counts[f"{src}.validation"], counts[f"{src}.train"]
        assert n_train > 500
        assert 0.003 < n_val / (n_val + n_train) < 0.04, (src, counts)
    tok = default_tokenizer
    assert tok.n_words == 4096 and tok.num_base_tokens == 3840 and tok.bos_id == 3840
    assert corpus.default_tokenizer(corpus_cache).model._mergeable_ranks == tok.model._mergeable_ranks
    text = corpus.load_documents(corpus_cache, "code", "validation")[0]
    ids = tok.encode(text, disallowed_special=())
    assert tok.decode(ids) == text
    assert len(text) / len(ids) > 2.5  # a trained vocabulary compresses code well beyond bytes
