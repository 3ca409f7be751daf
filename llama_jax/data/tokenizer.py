"""Llama 3 tokenizer: Meta's ``tokenizer.model`` format on tiktoken, chat format, BPE training.

File format (Meta's ``tokenizer.model``): one line per BPE token, ``base64(token bytes) rank``, with rank equal
to the token id (0 … n-1, no gaps). Byte-pair merging is tiktoken's: the adjacent pair whose concatenation
has the lowest rank is merged first. Pre-tokenization uses Llama 3's exact regex (:data:`PAT_STR`).

Special tokens: 256 of them, starting right after the last BPE rank (ids 128000–128255 for Meta's file), with
the Llama 3.1 names (:data:`LLAMA3_1_SPECIAL_TOKENS`).

Input guard (as Meta's reference): text is encoded in windows of at most 400,000 characters, and runs of more
than 25,000 consecutive whitespace or non-whitespace characters are cut, so encoding time is linear in the
input length whatever the input.

Chat format: ``BOS``, then per message ``<|start_header_id|>role<|end_header_id|>\\n\\n content <|eot_id|>``
(``<|eom_id|>`` for an assistant message with ``"eom": True``); message content is stripped of surrounding
whitespace, as in Meta's reference. :meth:`Tokenizer.encode_dialog` also returns the mask of the tokens an SFT
loss trains on (assistant content and its closing token); :meth:`Tokenizer.encode_dialog_masks` gives
"assistant content" and "formatting tokens" (BOS, headers, ``<|eot_id|>``, ``<|eom_id|>``, ``<|python_tag|>``)
as separate masks, since DPO scores the content and masks the formatting.

BPE training (:func:`train_bpe`) uses Hugging Face ``tokenizers`` (byte-level BPE with the same
pre-tokenization regex), then converts the learned merges into tiktoken ranks: the 256 single bytes get ranks
0–255 (rank = byte value) and merge ``i`` gets rank ``256 + i``, so every token's rank is higher than the
ranks of the two tokens it is merged from, as tiktoken's lowest-rank-first merging requires.
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from typing import Literal, NamedTuple

import regex
import tiktoken

PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
"""Llama 3's pre-tokenization regex (needs the ``regex`` module: ``\\p{..}`` classes and lookahead)."""

NUM_SPECIAL_TOKENS = 256
MAX_ENCODE_CHARS = 400_000
"""Text is encoded in windows of at most this many characters."""
MAX_NO_WHITESPACES_CHARS = 25_000
"""Runs of more than this many consecutive whitespace (or non-whitespace) characters are cut."""

LLAMA3_1_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
) + tuple(f"<|reserved_special_token_{i}|>" for i in range(2, 247))
assert len(LLAMA3_1_SPECIAL_TOKENS) == NUM_SPECIAL_TOKENS

ROLES = ("system", "user", "assistant", "ipython")

_PRETOKENIZE_RE = regex.compile(PAT_STR)
_ASCII_SPACE = r"\t\n\x0b\x0c\r "  # what ``\s`` matches among ASCII characters in the regex module
_ASCII_PRETOKENIZE_RE = re.compile(
    rf"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\nA-Za-z0-9]?[A-Za-z]+|[0-9]{{1,3}}| ?[^{_ASCII_SPACE}A-Za-z0-9]+[\r\n]*"
    rf"|[{_ASCII_SPACE}]*[\r\n]+|[{_ASCII_SPACE}]+(?![^{_ASCII_SPACE}])|[{_ASCII_SPACE}]+"
)
""":data:`PAT_STR` for ASCII text, with the classes spelled out (``\\p{L}`` = ``A-Za-z``, ``\\p{N}`` = ``0-9``) for
the standard library's ``re``, which finds the same pieces about twice as fast as ``regex``."""
_RUN_RE = re.compile(r"\s+|\S+")


def pretokenize(text: str) -> list[str]:
    """Splits ``text`` into the pieces BPE runs on (Llama 3's regex), e.g. ``"12345" -> ["123", "45"]``."""
    return (_ASCII_PRETOKENIZE_RE if text.isascii() else _PRETOKENIZE_RE).findall(text)


def split_long_runs(text: str, max_run: int = MAX_NO_WHITESPACES_CHARS) -> Iterator[str]:
    """Cuts ``text`` so that no piece holds more than ``max_run`` consecutive (non-)whitespace characters.

    Produces exactly the pieces of Meta's ``_split_whitespaces_or_nonwhitespaces``: a run of one class
    (``str.isspace``) longer than ``max_run`` is cut every ``max_run`` characters, each cut ending the
    current piece. Runs are found with a C regex, so the cost is linear with a small constant.
    """
    if not text:
        yield text
        return
    start = 0
    for m in _RUN_RE.finditer(text):
        run_start, run_end = m.span()
        cut = run_start + max_run
        while cut < run_end:
            yield text[start:cut]
            start = cut
            cut += max_run
    yield text[start:]


def _chunks(text: str) -> Iterator[str]:
    for i in range(0, len(text), MAX_ENCODE_CHARS):
        yield from split_long_runs(text[i : i + MAX_ENCODE_CHARS])


def read_tiktoken_file(path: str | os.PathLike) -> dict[bytes, int]:
    """Reads a ``base64(token) rank`` file; ranks must be exactly 0 … n-1 (rank == id)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{path}:{lineno}: expected 'base64(token) rank', got {line[:80]!r}")
            try:
                token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: malformed line {line[:80]!r}: {e}") from None
            if token in ranks:
                raise ValueError(f"{path}:{lineno}: token {token!r} appears twice")
            ranks[token] = rank
    if not ranks:
        raise ValueError(f"tokenizer file is empty: {path}")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks must be exactly 0..{len(ranks) - 1} (rank == id)")
    return ranks


def write_tiktoken_file(path: str | os.PathLike, mergeable_ranks: Mapping[bytes, int]) -> None:
    """Writes ranks in Meta's ``tokenizer.model`` format (sorted by rank), atomically."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        for token, rank in sorted(mergeable_ranks.items(), key=lambda kv: kv[1]):
            f.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")
    os.replace(tmp, path)


AllowedSpecial = Literal["all"] | Collection[str]


class DialogMasks(NamedTuple):
    """Per-token masks of an encoded dialog (:meth:`Tokenizer.encode_dialog_masks`); disjoint."""

    assistant_content: list[bool]  # the assistant messages' content tokens
    formatting: list[bool]  # BOS, headers, <|eot_id|>, <|eom_id|>, <|python_tag|>


class Tokenizer:
    """Llama 3 tokenizer on ``tiktoken.Encoding``; see the module docstring for the format."""

    def __init__(
        self,
        mergeable_ranks: Mapping[bytes, int],
        special_tokens: Sequence[str] = LLAMA3_1_SPECIAL_TOKENS,
        name: str = "llama3",
    ):
        if len(special_tokens) != NUM_SPECIAL_TOKENS or len(set(special_tokens)) != NUM_SPECIAL_TOKENS:
            raise ValueError(f"expected {NUM_SPECIAL_TOKENS} distinct special tokens, got {len(special_tokens)}")
        self.num_base_tokens = len(mergeable_ranks)
        self._special_tokens = {tok: self.num_base_tokens + i for i, tok in enumerate(special_tokens)}
        self.model = tiktoken.Encoding(
            name=name,
            pat_str=PAT_STR,
            mergeable_ranks=dict(mergeable_ranks),
            special_tokens=self._special_tokens,
        )
        self._special_re = re.compile("|".join(re.escape(t) for t in special_tokens))
        self.bos_id = self._special_tokens["<|begin_of_text|>"]
        self.eos_id = self._special_tokens["<|end_of_text|>"]
        self.pad_id = self._special_tokens["<|finetune_right_pad_id|>"]
        self.eom_id = self._special_tokens["<|eom_id|>"]
        self.eot_id = self._special_tokens["<|eot_id|>"]
        self.python_tag_id = self._special_tokens["<|python_tag|>"]
        self.start_header_id = self._special_tokens["<|start_header_id|>"]
        self.end_header_id = self._special_tokens["<|end_header_id|>"]

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Tokenizer":
        """Loads Meta's ``tokenizer.model`` (tiktoken ranks); specials follow the last rank."""
        return cls(read_tiktoken_file(path), name=os.path.basename(os.fspath(path)))

    def save(self, path: str | os.PathLike) -> None:
        """Writes the BPE ranks in Meta's format (specials are implied by the format)."""
        write_tiktoken_file(path, self.model._mergeable_ranks)  # pylint: disable=protected-access

    # ---- properties -------------------------------------------------------------------------------------
    @property
    def n_words(self) -> int:
        """Total number of ids: BPE ranks plus the 256 specials."""
        return self.model.n_vocab

    @property
    def vocab_size(self) -> int:
        return self.model.n_vocab

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special_tokens)

    @property
    def stop_ids(self) -> tuple[int, int, int]:
        """Ids that end generation: ``<|end_of_text|>``, ``<|eom_id|>``, ``<|eot_id|>``."""
        return (self.eos_id, self.eom_id, self.eot_id)

    # ---- encode / decode --------------------------------------------------------------------------------
    def encode(
        self,
        text: str,
        bos: bool = False,
        eos: bool = False,
        allowed_special: AllowedSpecial = (),
        disallowed_special: AllowedSpecial = (),
    ) -> list[int]:
        """Encodes ``text`` to ids, optionally framed by BOS/EOS.

        Defaults as Meta's reference tokenizer and Hugging Face's: special-token strings in ``text`` are encoded
        as ordinary text unless listed in ``allowed_special``.

        Args:
          text: the string to encode.
          bos, eos: prepend ``<|begin_of_text|>`` / append ``<|end_of_text|>``.
          allowed_special: special-token strings (or ``"all"``) encoded as their special id when met in text.
          disallowed_special: special-token strings (or ``"all"``) whose presence in ``text`` (unless allowed)
            raises ``ValueError``; the default ``()`` encodes them as ordinary text.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        allowed = self._special_set(allowed_special, "allowed_special")
        disallowed = self._special_set(disallowed_special, "disallowed_special") - allowed
        if disallowed:
            for m in self._special_re.finditer(text):
                if m.group() in disallowed:
                    raise ValueError(
                        f"text contains the special token {m.group()!r} at character {m.start()}, which is not "
                        "allowed; pass allowed_special={...} to encode it as a special token, or leave "
                        "disallowed_special at its default () to encode it as plain text"
                    )
        ids: list[int] = [self.bos_id] if bos else []
        encode = self.model.encode
        for chunk in _chunks(text):
            ids.extend(encode(chunk, allowed_special=allowed, disallowed_special=()))
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Decodes ids to text (invalid UTF-8 byte sequences become U+FFFD)."""
        ids = [int(i) for i in ids]
        n = self.n_words
        for i in ids:
            if not 0 <= i < n:
                raise ValueError(f"token id {i} out of range [0, {n})")
        return self.model.decode(ids)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token (the special's string for a special id)."""
        if not 0 <= token_id < self.n_words:
            raise ValueError(f"token id {token_id} out of range [0, {self.n_words})")
        return self.model.decode_single_token_bytes(token_id)

    def _special_set(self, value: AllowedSpecial, arg: str) -> set[str]:
        if value == "all":
            return set(self._special_tokens)
        if isinstance(value, str):
            raise TypeError(f"{arg} must be 'all' or a collection of special-token strings, got {value!r}")
        out = set(value)
        unknown = out - self._special_tokens.keys()
        if unknown:
            raise ValueError(f"{arg} names unknown special tokens: {sorted(unknown)}")
        return out

    # ---- chat format ------------------------------------------------------------------------------------
    def encode_header(self, role: str) -> list[int]:
        """``<|start_header_id|>role<|end_header_id|>\\n\\n``."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
        return [self.start_header_id, *self.encode(role), self.end_header_id, *self.encode("\n\n")]

    def encode_dialog(
        self, messages: Sequence[Mapping[str, object]], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[bool]]:
        """Encodes a dialog in the Llama 3 chat format.

        Args:
          messages: dicts ``{"role": "system"|"user"|"assistant"|"ipython", "content": str}``; an assistant
            tool call that waits for a result may set ``"eom": True`` to end with ``<|eom_id|>``. Content is
            encoded as plain text (special-token strings in it are not special), except that an assistant
            message may start with ``<|python_tag|>``, which is encoded as that special token.
          add_generation_prompt: append the assistant header, so a model continues with the reply.

        Returns:
          ``(tokens, assistant_mask)``: the mask is True exactly on assistant content tokens and their closing
          ``<|eot_id|>`` / ``<|eom_id|>``.
        """
        tokens: list[int] = [self.bos_id]
        mask: list[bool] = [False]
        for i, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            if role not in ROLES:
                raise ValueError(f"message {i}: unknown role {role!r}; expected one of {ROLES}")
            if not isinstance(content, str):
                raise ValueError(f"message {i} ({role}): content must be a str, got {type(content).__name__}")
            unknown = set(message) - {"role", "content", "eom"}
            if unknown:
                raise ValueError(f"message {i} ({role}): unknown keys {sorted(unknown)}")
            eom = bool(message.get("eom", False))
            if eom and role != "assistant":
                raise ValueError(f"message {i}: 'eom' is only valid on assistant messages, not {role!r}")
            header = self.encode_header(role)
            body = self._encode_content(content.strip(), role)
            body.append(self.eom_id if eom else self.eot_id)
            tokens += header + body
            is_assistant = role == "assistant"
            mask += [False] * len(header) + [is_assistant] * len(body)
        if add_generation_prompt:
            header = self.encode_header("assistant")
            tokens += header
            mask += [False] * len(header)
        return tokens, mask

    def encode_dialog_masks(
        self, messages: Sequence[Mapping[str, object]], add_generation_prompt: bool = False
    ) -> tuple[list[int], DialogMasks]:
        """Like :meth:`encode_dialog`, with two disjoint masks instead of one.

        Returns:
          ``(tokens, DialogMasks(assistant_content, formatting))``: ``assistant_content`` is True on the
          assistant messages' content tokens only; ``formatting`` is True on every control token of the chat
          format (BOS, ``<|start_header_id|>role<|end_header_id|>\\n\\n`` of every message, the closing
          ``<|eot_id|>`` / ``<|eom_id|>`` and ``<|python_tag|>``). ``encode_dialog``'s mask equals
          ``assistant_content`` plus the assistant messages' ``<|python_tag|>`` and closing tokens.
        """
        tokens, sft_mask = self.encode_dialog(messages, add_generation_prompt)
        formatting = [True]  # BOS
        for message in messages:
            header = self.encode_header(str(message["role"]))
            body = self._encode_content(str(message["content"]).strip(), str(message["role"]))
            formatting += [True] * len(header) + [t == self.python_tag_id for t in body] + [True]
        if add_generation_prompt:
            formatting += [True] * len(self.encode_header("assistant"))
        content = [m and not f for m, f in zip(sft_mask, formatting)]
        return tokens, DialogMasks(assistant_content=content, formatting=formatting)

    def _encode_content(self, content: str, role: str) -> list[int]:
        tag = "<|python_tag|>"
        if role == "assistant" and content.startswith(tag):
            return [self.python_tag_id, *self.encode(content[len(tag) :])]
        return self.encode(content)


# ---- BPE training -----------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by byte-level BPE (Hugging Face ``ByteLevel``)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_BYTE_ENCODER = _bytes_to_unicode()
_BYTE_DECODER = {c: b for b, c in _BYTE_ENCODER.items()}


def token_bytes_to_hf(token: bytes) -> str:
    """A token's bytes -> its Hugging Face byte-level string (GPT-2's printable alphabet)."""
    return "".join(_BYTE_ENCODER[b] for b in token)


def hf_token_to_bytes(token: str) -> bytes:
    """Inverse of the byte-level alphabet: a Hugging Face byte-level token string -> its bytes."""
    try:
        return bytes(_BYTE_DECODER[c] for c in token)
    except KeyError as e:
        raise ValueError(f"token {token!r} contains {e.args[0]!r}, not a byte-level character") from None


def make_hf_bpe(vocab_size: int):
    """An untrained HF byte-level BPE tokenizer with Llama 3's pre-tokenization, and its trainer."""
    from tokenizers import Regex, models, pre_tokenizers, trainers  # pylint: disable=import-outside-toplevel
    from tokenizers import Tokenizer as HFTokenizer  # pylint: disable=import-outside-toplevel

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    return hf, trainer


def hf_bpe_to_ranks(hf) -> dict[bytes, int]:
    """Converts a trained HF byte-level BPE into tiktoken ranks (bytes: byte value; merge i: 256 + i)."""
    model = json.loads(hf.to_str())["model"]
    ranks = {bytes([b]): b for b in range(256)}
    for i, merge in enumerate(model["merges"]):
        left, right = merge if isinstance(merge, list) else merge.split(" ")
        token = hf_token_to_bytes(left) + hf_token_to_bytes(right)
        if token in ranks:
            raise ValueError(f"merge {i} {merge!r} produces the existing token {token!r}")
        ranks[token] = 256 + i
    return ranks


def train_bpe(texts: Iterable[str], vocab_size: int, path: str | os.PathLike) -> Tokenizer:
    """Trains byte-level BPE on ``texts`` and writes it to ``path`` in Meta's format.

    Args:
      texts: training documents.
      vocab_size: number of BPE ranks (256 bytes + merges); the 256 specials come after, so the tokenizer has
        ``vocab_size + 256`` ids.
      path: where to write the ``tokenizer.model`` file.

    Returns:
      ``Tokenizer.from_file(path)``.

    Raises:
      ValueError: ``vocab_size`` < 256, or the texts are too small to learn ``vocab_size - 256`` merges.
    """
    if vocab_size < 256:
        raise ValueError(f"vocab_size={vocab_size} must be at least 256 (the byte alphabet)")
    hf, trainer = make_hf_bpe(vocab_size)
    hf.train_from_iterator(texts, trainer)
    ranks = hf_bpe_to_ranks(hf)
    if len(ranks) != vocab_size:
        raise ValueError(
            f"training texts yield only {len(ranks)} BPE ranks, fewer than vocab_size={vocab_size}; "
            "train on more text or ask for a smaller vocabulary"
        )
    write_tiktoken_file(path, ranks)
    return Tokenizer.from_file(path)
