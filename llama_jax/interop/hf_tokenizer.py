"""The Llama 3 tokenizer in Hugging Face form: tokenizer.json, tokenizer_config.json (chat template) and
generation_config.json, written from and read back into `llama_jax.data.tokenizer.Tokenizer`.

    to_hf(tok) -> tokenizers.Tokenizer          byte-level BPE equal to the tiktoken ranks (+ the 256 specials)
    save(folder, tok)                           writes TOKENIZER_JSON, TOKENIZER_CONFIG, GENERATION_CONFIG
    from_hf_json(path) -> Tokenizer             reads a tokenizer.json of a tiktoken-style Llama 3 vocabulary
    find(folder) -> path | None;  read(path) -> Tokenizer   (Meta `tokenizer.model` first, then tokenizer.json)
    stop_ids(folder, tok) -> tuple[int, ...]    generation_config.json's eos ids when present, else tok.stop_ids
    CHAT_TEMPLATE                               Jinja for `apply_chat_template`, equal to `Tokenizer.encode_dialog`

tiktoken ranks -> BPE merges: token `t` (rank r, two bytes or more) gets one merge `(a, b)` for every split
`t = a + b` with both halves in the vocabulary; merges are ordered by (r, rank a, rank b). tiktoken merges
the adjacent pair whose concatenation has the lowest rank, and HF's BPE the pair with the lowest merge index,
which is the same pair (this is also how transformers' `TikTokenConverter` builds Meta's Llama 3 tokenizer.json;
the tests check the vocabulary and merges are identical to its output). The one case the orders could differ is
a tie between two different overlapping pairs with the same concatenation (`x + y == y + z`), where tiktoken
takes the leftmost; it did not occur on the held-out text the tests encode. `ignore_merges` is on, as in
tiktoken: a pre-token that is itself in the vocabulary is one token. Pre-tokenization is the same regex
(`PAT_STR`) followed by the byte-level alphabet; specials are added tokens with their ids (`num_base_tokens + i`).

Differences that remain, by construction: (1) HF treats special-token text anywhere in its input as the
special token, as `Tokenizer.encode(..., allowed_special="all")` does; in a dialog, message content that
contains special-token text therefore tokenizes differently (`encode_dialog` keeps content plain, except a
leading `<|python_tag|>` in an assistant turn, which both treat as the special token). (2) Meta's input guard
(runs of more than 25,000 whitespace / non-whitespace characters are cut) has no HF equivalent.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

from llama_jax.data.tokenizer import NUM_SPECIAL_TOKENS, PAT_STR, ROLES, Tokenizer, hf_token_to_bytes, token_bytes_to_hf

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"
META_TOKENIZER = "tokenizer.model"
# Where a checkpoint folder keeps its tokenizer, in the order they are tried.
TOKENIZER_FILES = (META_TOKENIZER, os.path.join("original", META_TOKENIZER), TOKENIZER_JSON)
REQUIRED_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
                     "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>")

CHAT_TEMPLATE = (
    "{%- set roles = [" + ", ".join(f"'{r}'" for r in ROLES) + "] -%}\n"
    "{{- bos_token -}}\n"
    "{%- for message in messages -%}\n"
    "  {%- if message['role'] not in roles -%}\n"
    "    {{- raise_exception('message ' ~ loop.index0 ~ ': unknown role ' ~ message['role'] ~ "
    "'; expected one of " + ", ".join(ROLES) + "') -}}\n"
    "  {%- endif -%}\n"
    "  {%- if message['content'] is not string -%}\n"
    "    {{- raise_exception('message ' ~ loop.index0 ~ ' (' ~ message['role'] ~ '): content must be a string') -}}\n"
    "  {%- endif -%}\n"
    "  {%- if message.get('eom') and message['role'] != 'assistant' -%}\n"
    "    {{- raise_exception('message ' ~ loop.index0 ~ \": 'eom' is only valid on assistant messages\") -}}\n"
    "  {%- endif -%}\n"
    "  {{- '<|start_header_id|>' ~ message['role'] ~ '<|end_header_id|>\\n\\n' ~ (message['content'] | trim) -}}\n"
    "  {{- '<|eom_id|>' if message.get('eom') else '<|eot_id|>' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "  {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
    "{%- endif -%}\n"
)
"""The Llama 3 chat format of `Tokenizer.encode_dialog`: BOS, then per message
`<|start_header_id|>ROLE<|end_header_id|>\\n\\n` + stripped content + `<|eot_id|>` (`<|eom_id|>` for an
assistant message with `"eom": True`, a tool call that waits for its `ipython` result), and the assistant
header with `add_generation_prompt`. Unknown roles, non-string content and misplaced `eom` raise."""


# --------------------------------------------------------------------------------------------- export


def vocab_and_merges(mergeable_ranks: Mapping[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level vocabulary (token string -> id) and the ordered merges equivalent to tiktoken's ranks."""
    vocab: dict[str, int] = {}
    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in mergeable_ranks.items():
        vocab[token_bytes_to_hf(token)] = rank
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in mergeable_ranks and right in mergeable_ranks:
                merges.append((rank, mergeable_ranks[left], mergeable_ranks[right], left, right))
    merges.sort()
    return vocab, [(token_bytes_to_hf(a), token_bytes_to_hf(b)) for *_, a, b in merges]


def to_hf(tok: Tokenizer):
    """A `tokenizers.Tokenizer` that encodes as `tok` does (specials recognised in text, BOS added with
    `add_special_tokens=True`) and decodes byte-exactly."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors  # noqa: PLC0415
    from tokenizers import Tokenizer as HFTokenizer  # noqa: PLC0415

    ranks = tok.model._mergeable_ranks  # pylint: disable=protected-access
    vocab, merges = vocab_and_merges(ranks)
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False,
                                byte_fallback=False))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    hf.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    bos = "<|begin_of_text|>"
    hf.post_processor = processors.Sequence([
        processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1",
                                      special_tokens=[(bos, tok.bos_id)])])
    specials = sorted(tok.special_tokens.items(), key=lambda kv: kv[1])
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False,
                                      single_word=False) for t, _ in specials])
    for text, want in specials:
        if hf.token_to_id(text) != want:
            raise ValueError(f"special token {text!r} got id {hf.token_to_id(text)} in tokenizer.json, not {want}")
    return hf


def tokenizer_config(tok: Tokenizer, model_max_length: int | None = None) -> dict:
    """tokenizer_config.json: the generic fast tokenizer class, the specials and the chat template."""
    names = {i: t for t, i in tok.special_tokens.items()}
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": names[tok.bos_id], "eos_token": names[tok.eot_id], "pad_token": names[tok.pad_id],
        "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"], "chat_template": CHAT_TEMPLATE,
        **({"model_max_length": model_max_length} if model_max_length else {}),
    }


def generation_config(tok: Tokenizer) -> dict:
    """generation_config.json: BOS, the stop ids (end of text, end of message, end of turn), greedy."""
    return {"bos_token_id": tok.bos_id, "eos_token_id": list(tok.stop_ids), "pad_token_id": tok.pad_id,
            "do_sample": False}


def save(folder: str | os.PathLike, tok: Tokenizer, model_max_length: int | None = None) -> None:
    """Writes tokenizer.json, tokenizer_config.json and generation_config.json into `folder` (which the caller
    renames into place, so these writes need no atomicity of their own)."""
    folder = os.fspath(folder)
    to_hf(tok).save(os.path.join(folder, TOKENIZER_JSON))
    for name, content in ((TOKENIZER_CONFIG, tokenizer_config(tok, model_max_length)),
                          (GENERATION_CONFIG, generation_config(tok))):
        with open(os.path.join(folder, name), "w") as f:
            json.dump(content, f, indent=2)


# --------------------------------------------------------------------------------------------- import


def _pattern_of(pre: dict | None) -> str | None:
    """The Split regex of a tokenizer.json pre-tokenizer (inside a Sequence or alone)."""
    if not pre:
        return None
    for p in pre.get("pretokenizers", [pre]):
        if p.get("type") == "Split":
            return p.get("pattern", {}).get("Regex")
    return None


def from_hf_json(path: str | os.PathLike) -> Tokenizer:
    """Reads a tokenizer.json holding a tiktoken-style Llama 3 vocabulary (byte-level BPE, Llama 3's regex,
    merges in rank order, 256 specials after the last rank) as a `Tokenizer` with the same ids."""
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    bpe = data.get("model") or {}
    if bpe.get("type") != "BPE" or not isinstance(bpe.get("vocab"), dict):
        raise ValueError(f"{path}: model type {bpe.get('type')!r} is not a byte-level BPE with a vocabulary")
    pattern = _pattern_of(data.get("pre_tokenizer"))
    if pattern != PAT_STR:
        raise ValueError(f"{path}: pre-tokenizer regex {pattern!r} is not Llama 3's")
    ranks = {hf_token_to_bytes(t): i for t, i in bpe["vocab"].items()}
    if len(ranks) != len(bpe["vocab"]) or sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: vocabulary ids must be exactly 0..{len(bpe['vocab']) - 1}")
    last = -1
    for i, merge in enumerate(bpe.get("merges", [])):
        left, right = merge if isinstance(merge, list) else merge.split(" ")
        rank = ranks.get(hf_token_to_bytes(left) + hf_token_to_bytes(right))
        if rank is None or rank < last:
            raise ValueError(f"{path}: merge {i} {merge!r} is not in rank order of the vocabulary; not a "
                             "tiktoken-style BPE")
        last = rank
    added = sorted((t["id"], t["content"]) for t in data.get("added_tokens", []))
    if len(added) != NUM_SPECIAL_TOKENS:
        raise ValueError(f"{path}: expected {NUM_SPECIAL_TOKENS} special tokens after the BPE ranks, found "
                         f"{len(added)}")
    ids = [i for i, _ in added]
    if ids != list(range(len(ranks), len(ranks) + len(ids))):
        raise ValueError(f"{path}: added tokens must follow the {len(ranks)} BPE ranks with consecutive ids, "
                         f"got ids {ids[:4]}...")
    names = [t for _, t in added]
    missing = [t for t in REQUIRED_SPECIALS if t not in names]
    if missing:
        raise ValueError(f"{path}: special tokens {missing} are missing (the Llama 3.1 chat format needs them)")
    return Tokenizer(ranks, names, name=os.path.basename(path))


def find(folder: str | os.PathLike) -> str | None:
    """The first of TOKENIZER_FILES present in `folder`, or None."""
    for name in TOKENIZER_FILES:
        candidate = os.path.join(os.fspath(folder), name)
        if os.path.isfile(candidate):
            return candidate
    return None


def read(path: str | os.PathLike) -> Tokenizer:
    """A Meta `tokenizer.model` file, a tokenizer.json file, or a folder holding one of TOKENIZER_FILES."""
    path = os.fspath(path)
    if os.path.isdir(path):
        found = find(path)
        if found is None:
            raise FileNotFoundError(f"no tokenizer in {path!r}: looked for {', '.join(TOKENIZER_FILES)}")
        path = found
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer file {path!r} does not exist")
    if path.endswith(".json"):
        return from_hf_json(path)
    return Tokenizer.from_file(path)


def stop_ids(folder: str | os.PathLike, tok: Tokenizer) -> tuple[int, ...]:
    """generation_config.json's `eos_token_id` (an int or a list) when `folder` has one, else `tok.stop_ids`."""
    config = os.path.join(os.fspath(folder), GENERATION_CONFIG)
    if not os.path.isfile(config):
        return tok.stop_ids
    with open(config) as f:
        eos = json.load(f).get("eos_token_id")
    if eos is None:
        return tok.stop_ids
    ids = tuple(int(i) for i in (eos if isinstance(eos, Sequence) else [eos]))
    bad = [i for i in ids if not 0 <= i < tok.n_words]
    if bad:
        raise ValueError(f"{config}: eos_token_id {bad} out of range for a tokenizer of {tok.n_words} ids")
    return ids
