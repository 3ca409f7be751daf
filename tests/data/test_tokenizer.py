"""Tokenizer: Meta file format, pre-tokenization, specials, input guard, chat format, BPE training parity."""
import base64
import os
import random
import time

import pytest
import tiktoken
import tiktoken.load

from llama_jax.data import tokenizer as tk

# Written out here (not imported) so the checks below are independent of the module's constant.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

ROUND_TRIP_TEXTS = [
    "",
    "Hello world",
    "naïve café, Straße, Ελληνικά, русский, 中文字符, 日本語のテキスト, हिन्दी",
    "emoji: 🙂👍🏽🚀 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\n\tif x != 0:\n\t\tpass\n",
    "   leading and trailing   \n\n\n\t \r\n   ",
    "mixed 12345 numbers 3.14159 and 'quotes' don't WON'T we'll I'm\x00\x01 control",
    " " * 300 + "x" + "\n" * 50,
    "a" * 1000,
    "<|not_a_special|> <|begin_of_text without close",
]


def test_pattern_is_llama3s():
    assert tk.PAT_STR == LLAMA3_PATTERN


@pytest.mark.parametrize(
    "text,pieces",
    [
        ("12345", ["123", "45"]),
        ("1234567", ["123", "456", "7"]),
        ("Hello world", ["Hello", " world"]),
        (" Hello world", [" Hello", " world"]),
        ("I'm here, don't", ["I", "'m", " here", ",", " don", "'t"]),
        ("WE'LL", ["WE", "'LL"]),
        ("a  b", ["a", " ", " b"]),
        ("x\n\n  y", ["x", "\n\n", " ", " y"]),
        ("foo();\n", ["foo", "();\n"]),
    ],
)
def test_pretokenize(text, pieces):
    assert tk.pretokenize(text) == pieces
    assert "".join(tk.pretokenize(text)) == text


def test_pretokenize_ascii_equals_the_pattern():
    """ASCII text takes a faster equivalent of the pattern: its pieces must be the pattern's, on every ASCII
    character (incl. the control characters ``\\s`` does not match), contractions in any case, digit runs,
    whitespace before newlines and ends of text, and on standard-library source."""
    import regex

    from llama_jax.data import corpus

    rng = random.Random(0)
    atoms = [chr(c) for c in range(128)] + ["'s", "'T", "'re", "'VE", "'m", "'Ll", "'d", "\r\n", "  ", " \n", "\t\x0b\x0c",
                                            "\x1c\x1f", "12345", "ab", "Z"] * 4
    texts = ["".join(rng.choice(atoms) for _ in range(rng.randrange(1, 40))) for _ in range(3000)]
    texts += [t for t in ROUND_TRIP_TEXTS if t.isascii()]
    root = corpus.stdlib_dir()
    texts += [corpus.read_text(os.path.join(root, rel)) for rel in sorted(corpus.list_files(root))[::150]]
    assert sum(t.isascii() for t in texts) > 3000
    for text in texts:
        assert tk.pretokenize(text) == regex.findall(LLAMA3_PATTERN, text), repr(text[:200])


def _hand_built_file(path) -> None:
    ranks = {bytes([b]): b for b in range(256)}
    for i, tok in enumerate([b"He", b"ll", b"llo", b"Hello", b" w", b"or", b" wor", b"ld", b" world"]):
        ranks[tok] = 256 + i
    with open(path, "w") as f:
        for tok, rank in ranks.items():
            f.write(f"{base64.b64encode(tok).decode()} {rank}\n")


def test_hand_built_vocabulary_ids(tmp_path):
    """Ids worked out by hand from the lowest-rank-first merge rule."""
    path = tmp_path / "hand.model"
    _hand_built_file(path)
    tok = tk.Tokenizer.from_file(path)
    assert tok.encode("Hello world") == [259, 264]
    assert tok.encode("Hello world", bos=True, eos=True) == [265, 259, 264, 266]
    # "Helo": H e l o -> He(256) l o; "Hel" and "lo" are not tokens.
    assert tok.encode("Helo") == [256, ord("l"), ord("o")]
    assert tok.n_words == tok.vocab_size == 265 + 256


def test_special_token_layout(small_tokenizer):
    tok, n = small_tokenizer, small_tokenizer.num_base_tokens
    assert n == 1024 and tok.n_words == n + 256
    expected = {
        "<|begin_of_text|>": 0, "<|end_of_text|>": 1, "<|reserved_special_token_0|>": 2,
        "<|reserved_special_token_1|>": 3, "<|finetune_right_pad_id|>": 4, "<|step_id|>": 5,
        "<|start_header_id|>": 6, "<|end_header_id|>": 7, "<|eom_id|>": 8, "<|eot_id|>": 9,
        "<|python_tag|>": 10, "<|reserved_special_token_2|>": 11, "<|reserved_special_token_246|>": 255,
    }
    for name, offset in expected.items():
        assert tok.special_tokens[name] == n + offset, name
    assert len(tok.special_tokens) == 256
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.eom_id, tok.eot_id) == (n, n + 1, n + 4, n + 8, n + 9)
    assert tok.stop_ids == (n + 1, n + 8, n + 9)


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(small_tokenizer, text):
    ids = small_tokenizer.encode(text)
    assert all(0 <= i < small_tokenizer.num_base_tokens for i in ids)
    assert small_tokenizer.decode(ids) == text
    framed = small_tokenizer.encode(text, bos=True, eos=True)
    assert framed == [small_tokenizer.bos_id, *ids, small_tokenizer.eos_id]


def test_specials_refused_when_disallowed_unless_allowed(small_tokenizer):
    tok = small_tokenizer
    text = "reply<|eot_id|>next"
    with pytest.raises(ValueError, match=r"<\|eot_id\|>"):
        tok.encode(text, disallowed_special="all")
    with pytest.raises(ValueError, match=r"<\|eot_id\|>"):
        tok.encode(text, allowed_special={"<|begin_of_text|>"}, disallowed_special="all")
    ids = tok.encode(text, allowed_special={"<|eot_id|>"})
    assert ids.count(tok.eot_id) == 1 and tok.decode(ids) == text
    assert tok.encode(text, allowed_special="all") == ids
    plain = tok.encode(text, disallowed_special=())
    assert tok.eot_id not in plain and tok.decode(plain) == text
    with pytest.raises(ValueError, match="<|nope|>"):
        tok.encode("x", allowed_special={"<|nope|>"})


def test_special_text_is_plain_text_by_default_as_meta_and_hf(small_tokenizer):
    """Meta's reference `encode(..., allowed_special=set(), disallowed_special=())` and HF's
    `split_special_tokens`-free default both encode special-token text as ordinary text unless allowed."""
    tok = small_tokenizer
    text = "reply<|eot_id|>next<|start_header_id|>"
    ids = tok.encode(text)
    assert tok.eot_id not in ids and tok.start_header_id not in ids
    assert ids == [i for piece in ("reply<|eot_id|>next<|start_header_id|>",)
                   for i in tok.model.encode(piece, disallowed_special=())]
    assert tok.decode(ids) == text
    assert tok.encode(text, allowed_special={"<|eot_id|>"}).count(tok.eot_id) == 1


def test_decode_rejects_out_of_range(small_tokenizer):
    with pytest.raises(ValueError, match=str(small_tokenizer.n_words)):
        small_tokenizer.decode([1, small_tokenizer.n_words])


def _meta_split(s: str, max_len: int):
    """Meta's reference ``_split_whitespaces_or_nonwhitespaces``, verbatim in behaviour."""
    current_slice_len = 0
    current_slice_is_space = s[0].isspace() if len(s) > 0 else False
    slice_start = 0
    for i in range(len(s)):
        is_now_space = s[i].isspace()
        if current_slice_is_space ^ is_now_space:
            current_slice_len = 1
            current_slice_is_space = is_now_space
        else:
            current_slice_len += 1
            if current_slice_len > max_len:
                yield s[slice_start:i]
                slice_start = i
                current_slice_len = 1
    yield s[slice_start:]


def test_split_long_runs_matches_meta():
    rng = random.Random(0)
    alphabet = ["a", "b", " ", "\n", "\t", "\u00a0", "\u2003", "\x1c", "é", "1"]
    for _ in range(300):
        s = "".join(rng.choice(alphabet) * rng.randint(1, 12) for _ in range(rng.randint(0, 20)))
        max_len = rng.randint(1, 8)
        assert list(tk.split_long_runs(s, max_len)) == list(_meta_split(s, max_len)), (s, max_len)


def _encode_seconds(tok, text) -> float:
    start = time.perf_counter()
    ids = tok.encode(text)
    elapsed = time.perf_counter() - start
    assert tok.decode(ids) == text
    return elapsed


@pytest.mark.parametrize("char", ["a", " ", "1", "!"])
def test_long_identical_run_encodes_in_linear_time(small_tokenizer, char):
    small, big = char * 100_000, char * 1_000_000
    t_small = min(_encode_seconds(small_tokenizer, small) for _ in range(2))
    t_big = _encode_seconds(small_tokenizer, big)
    # Linear scaling predicts 10x; a quadratic tokenizer would be ~100x. Generous bound plus a fixed allowance.
    assert t_big < 30 * t_small + 2.0, (t_small, t_big)


def test_long_input_is_encoded_in_metas_chunks(small_tokenizer):
    text = "ab" * 20_000 + " " * 30_001 + "xyz" * 9_000 + "\n" * 26_000 + "end"
    pieces = list(_meta_split(text, 25_000))
    assert len(pieces) == 5
    expected = [i for p in pieces for i in small_tokenizer.model.encode(p, disallowed_special=())]
    assert small_tokenizer.encode(text) == expected


def test_from_file_matches_independent_tiktoken(small_tokenizer_path, small_tokenizer, stdlib_sample, monkeypatch):
    """A plain ``tiktoken.Encoding`` over the same file gives the same ids."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    ranks = tiktoken.load.load_tiktoken_bpe(small_tokenizer_path)
    reference = tiktoken.Encoding("reference", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens={})
    for text in ROUND_TRIP_TEXTS + stdlib_sample[1][:10]:
        assert small_tokenizer.encode(text, disallowed_special=()) == reference.encode(text, disallowed_special=())


def test_trained_ranks_match_hf_encoding_on_held_out_text(small_tokenizer, stdlib_sample):
    """HF byte-level BPE and the converted tiktoken ranks tokenize held-out text identically."""
    hf, trainer = tk.make_hf_bpe(1024)
    hf.train_from_iterator(stdlib_sample[0], trainer)
    ranks = tk.hf_bpe_to_ranks(hf)
    assert ranks == small_tokenizer.model._mergeable_ranks  # training is deterministic
    for token, rank in ranks.items():  # every merged token outranks some split of it into two tokens
        assert len(token) == 1 or any(
            ranks.get(token[:i], rank) < rank and ranks.get(token[i:], rank) < rank for i in range(1, len(token))
        ), token
    n_tokens = 0
    for text in stdlib_sample[1] + ROUND_TRIP_TEXTS:
        hf_ids = [ranks[tk.hf_token_to_bytes(t)] for t in hf.encode(text).tokens]
        assert small_tokenizer.encode(text, disallowed_special=()) == hf_ids
        n_tokens += len(hf_ids)
    assert n_tokens > 50_000


def test_train_bpe_too_little_text(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=5000"):
        tk.train_bpe(["tiny text"], 5000, tmp_path / "t.model")
    with pytest.raises(ValueError, match="vocab_size=100"):
        tk.train_bpe(["tiny text"], 100, tmp_path / "t.model")


def test_from_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.model"):
        tk.Tokenizer.from_file(tmp_path / "missing.model")
    bad = tmp_path / "bad.model"
    bad.write_text("IQ== 0\nIg== 2\n")
    with pytest.raises(ValueError, match="ranks must be exactly"):
        tk.Tokenizer.from_file(bad)
    bad.write_text("IQ== 0\nnot-a-line\n")
    with pytest.raises(ValueError, match="bad.model:2"):
        tk.Tokenizer.from_file(bad)


def _dialog():
    return [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "Run code."},
        {"role": "assistant", "content": "<|python_tag|>print(2+2)", "eom": True},
        {"role": "ipython", "content": "4"},
        {"role": "assistant", "content": "  It printed 4.  "},
    ]


def test_dialog_format_and_mask(small_tokenizer):
    tok = small_tokenizer
    tokens, mask = tok.encode_dialog(_dialog())
    assert len(tokens) == len(mask)
    expected, expected_mask = [tok.bos_id], [False]
    for m in _dialog():
        header = [tok.start_header_id, *tok.encode(m["role"]), tok.end_header_id, *tok.encode("\n\n")]
        content = m["content"].strip()
        if content.startswith("<|python_tag|>"):
            body = tok.encode(content, allowed_special={"<|python_tag|>"})
        else:
            body = tok.encode(content)
        body.append(tok.eom_id if m.get("eom") else tok.eot_id)
        expected += header + body
        expected_mask += [False] * len(header) + [m["role"] == "assistant"] * len(body)
    assert tokens == expected
    assert mask == expected_mask
    trained = tok.decode([t for t, m in zip(tokens, mask) if m])
    assert trained == "4<|eot_id|><|python_tag|>print(2+2)<|eom_id|>It printed 4.<|eot_id|>"
    assert not mask[0] and sum(mask) == sum(1 for t, m in zip(tokens, mask) if m)


def test_dialog_masks_separate_content_from_formatting(small_tokenizer):
    tok = small_tokenizer
    tokens, masks = tok.encode_dialog_masks(_dialog())
    _, sft_mask = tok.encode_dialog(_dialog())
    assert len(masks.assistant_content) == len(masks.formatting) == len(tokens)
    assert not any(c and f for c, f in zip(masks.assistant_content, masks.formatting))
    content = tok.decode([t for t, m in zip(tokens, masks.assistant_content) if m])
    assert content == "4print(2+2)It printed 4."
    control = {tok.bos_id, tok.start_header_id, tok.end_header_id, tok.eot_id, tok.eom_id, tok.python_tag_id}
    assert control <= {t for t, f in zip(tokens, masks.formatting) if f}
    assert all(f for t, f in zip(tokens, masks.formatting) if t in control)
    # Every token is content, formatting or non-assistant message text; SFT's mask = content + the assistant's
    # formatting tokens after its header.
    formatting_in_sft = [s and not c for s, c in zip(sft_mask, masks.assistant_content)]
    assert all(f for f, s in zip(masks.formatting, formatting_in_sft) if s)
    assert sorted({tokens[i] for i, s in enumerate(formatting_in_sft) if s}) == sorted(
        {tok.eot_id, tok.eom_id, tok.python_tag_id})
    gen_tokens, gen_masks = tok.encode_dialog_masks(_dialog()[:1], add_generation_prompt=True)
    assert len(gen_masks.formatting) == len(gen_tokens) and all(gen_masks.formatting[-4:])


def test_dialog_generation_prompt_and_errors(small_tokenizer):
    tok = small_tokenizer
    msgs = [{"role": "user", "content": "hi"}]
    tokens, mask = tok.encode_dialog(msgs, add_generation_prompt=True)
    header = [tok.start_header_id, *tok.encode("assistant"), tok.end_header_id, *tok.encode("\n\n")]
    assert tokens[-len(header):] == header and not any(mask)
    with pytest.raises(ValueError, match="'wizard'"):
        tok.encode_dialog([{"role": "wizard", "content": "x"}])
    with pytest.raises(ValueError, match="content"):
        tok.encode_dialog([{"role": "user"}])
    # Special-token strings inside content are plain text, never control tokens.
    tokens, _ = tok.encode_dialog([{"role": "user", "content": "a<|eot_id|>b"}])
    assert tokens.count(tok.eot_id) == 1


META_TOKENIZER = os.environ.get("LLAMA3_TOKENIZER")


@pytest.mark.skipif(not META_TOKENIZER, reason="set LLAMA3_TOKENIZER to Meta's tokenizer.model")
def test_official_vectors():
    tok = tk.Tokenizer.from_file(META_TOKENIZER)
    assert tok.n_words == 128256 and tok.bos_id == 128000 and tok.eos_id == 128001
    assert tok.stop_ids == (128001, 128008, 128009)
    assert tok.encode("This is a test sentence.") == [2028, 374, 264, 1296, 11914, 13]
    assert tok.encode("This is a test sentence.", bos=True, eos=True) == [128000, 2028, 374, 264, 1296, 11914, 13, 128001]
    assert tok.encode("Hello world") == [9906, 1917]
    assert tok.encode("Hello, world!") == [9906, 11, 1917, 0]
    assert tok.encode(" Hello world") == [22691, 1917]
    assert tok.encode("12345") == [4513, 1774]
    tokens, _ = tok.encode_dialog(
        [
            {"role": "system", "content": "This is a test sentence."},
            {"role": "user", "content": "This is a response."},
        ],
        add_generation_prompt=True,
    )
    assert tokens == [
        128000, 128006, 9125, 128007, 271, 2028, 374, 264, 1296, 11914, 13, 128009, 128006, 882, 128007, 271,
        2028, 374, 264, 2077, 13, 128009, 128006, 78191, 128007, 271,
    ]
