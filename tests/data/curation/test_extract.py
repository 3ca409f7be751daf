"""HTML extraction on generated pages: standard-library docstrings wrapped in varied page layouts and
boilerplate (navigation, cookie banners, link sidebars, footers), through the function and through the
``extract`` stage of the pipeline (as ``python -m llama_jax.curate --stages=extract`` runs it)."""

import glob
import html
import json
import os
import random
import subprocess
import sys

from array_record.python import array_record_module

from llama_jax.data import corpus
from llama_jax.data import curation
from llama_jax.data.curation import extract

BOILERPLATE = ("Accept all cookies", "Subscribe to our newsletter", "All rights reserved", "Privacy policy",
               "Related articles", "Skip to content")
LAYOUTS = (
    "<article><h1>{title}</h1>{body}</article>",
    "<main><div class='post'><h2>{title}</h2>{body}</div></main>",
    "<div id='content'><section><h1>{title}</h1>{body}</section></div>",
)


def _pages(n: int) -> list[tuple[str, list[str]]]:
    """``n`` pages and the paragraphs each must keep: docstrings of standard-library modules, split into
    paragraphs, in a rotating layout with boilerplate around them (seeded)."""
    rng = random.Random(0)
    root = corpus.stdlib_dir()
    pages = []
    for rel in [f for f in corpus.list_files(root) if f.endswith(".py")][::11]:
        paragraphs = [" ".join(p.split()) for p in corpus.extract_docstrings(
            corpus.read_text(os.path.join(root, rel))).split("\n\n") if len(p.split()) >= 25][:4]
        if len(paragraphs) < 2:
            continue
        body = "".join(f"<p>{html.escape(p)}</p>" for p in paragraphs)
        links = "".join(f"<li><a href='/{i}'>Related articles {i}</a></li>" for i in range(rng.randint(3, 8)))
        main = LAYOUTS[len(pages) % len(LAYOUTS)].format(title=html.escape(rel), body=body)
        pages.append((f"<html><head><title>{html.escape(rel)}</title></head><body>"
                      "<a href='#main'>Skip to content</a>"
                      "<nav><a href='/'>Home</a> | <a href='/blog'>Blog</a> | <a href='/about'>About</a></nav>"
                      "<div class='cookie-banner'>We use cookies. <button>Accept all cookies</button></div>"
                      f"{main}<aside><ul>{links}</ul></aside>"
                      "<footer><p>Subscribe to our newsletter.</p><p>Copyright 2024. All rights reserved. "
                      "<a href='/privacy'>Privacy policy</a></p></footer></body></html>", paragraphs))
        if len(pages) == n:
            return pages
    raise AssertionError(f"found only {len(pages)} pages")


def _assert_main_text(text: str, paragraphs: list[str]) -> None:
    for p in paragraphs:
        assert p in " ".join(text.split()), (p[:60], text[:200])
    for boilerplate in BOILERPLATE:
        assert boilerplate not in text, (boilerplate, text[:200])


def test_extract_keeps_the_paragraphs_of_generated_pages_and_drops_their_boilerplate():
    for page, paragraphs in _pages(6):
        _assert_main_text(extract.extract(page), paragraphs)


def test_extract_stage_on_generated_pages(tmp_path):
    pages = _pages(4)
    with open(tmp_path / "pages.jsonl", "w", encoding="utf-8") as f:
        for i, (page, _) in enumerate(pages):
            f.write(json.dumps({"html": page, "id": f"page{i}"}) + "\n")
        f.write(json.dumps({"html": "<html><body><div> </div></body></html>", "id": "empty"}) + "\n")
    cfg = curation.get_config()
    cfg.num_shards = 1
    stats = curation.run(str(tmp_path / "pages.jsonl"), str(tmp_path / "out"), cfg, stages="extract")
    reader = array_record_module.ArrayRecordReader(glob.glob(str(tmp_path / "out" / "part-*.array_record"))[0])
    by_id = {r["id"]: r for r in map(json.loads, reader.read_all())}
    reader.close()
    assert sorted(by_id) == [f"page{i}" for i in range(len(pages))]
    for i, (_, paragraphs) in enumerate(pages):
        _assert_main_text(by_id[f"page{i}"]["text"], paragraphs)
    assert stats["stages"][0]["removed"]["no_main_text"]["docs"] == 1


def test_extract_without_its_dependency_fails_before_any_work_naming_it(tmp_path):
    code = ("import sys; sys.modules['lxml_html_clean'] = None\n"  # as an install without the package
            "from llama_jax.data.curation import extract\nextract.check_available()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)), timeout=120)
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode != 0 and last.startswith("ImportError: extract: HTML extraction cannot import")
    assert "lxml_html_clean" in last and "pip install -r requirements.txt" in last
