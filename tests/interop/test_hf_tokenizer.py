"""Hugging Face export of the tokenizer, chat template and generation config: transformers' AutoTokenizer,
apply_chat_template and generate against llama_jax's Tokenizer and greedy decode; tokenizer.json read back."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from llama_jax.data.tokenizer import LLAMA3_1_SPECIAL_TOKENS, PAT_STR
from llama_jax.infer import sampling, text
from llama_jax.interop import checkpoints, hf, hf_tokenizer, native
from tests.interop.helpers import random_params, tiny_cfg

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CFG = tiny_cfg(vocab_size=1280, max_seq_len=128)  # the fixture tokenizer's 1024 ranks + 256 specials
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}

DIALOGS = [
    [{"role": "user", "content": "What does str.strip() do?"}],
    [{"role": "system", "content": "  You answer in one line.\n"},
     {"role": "user", "content": "def f(x):\n    return x * 2\n\nWhat is f(21)?"},
     {"role": "assistant", "content": "It returns 42."},
     {"role": "user", "content": "Thanks! 日本語 ünïcödé, tabs\tand 12345678 digits"}],
    # a tool call that waits for its result (<|python_tag|> ... <|eom_id|>), the result, then the answer
    [{"role": "system", "content": "Environment: ipython"},
     {"role": "user", "content": "Sum 1..100 with Python."},
     {"role": "assistant", "content": "<|python_tag|>print(sum(range(1, 101)))", "eom": True},
     {"role": "ipython", "content": "5050"},
     {"role": "assistant", "content": "The sum is 5050."}],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": "   "}],
]


@pytest.fixture(scope="module")
def export(tmp_path_factory, bpe_tokenizer):
    """A tiny random model exported to HF with the fixture tokenizer: (folder, params)."""
    folder = tmp_path_factory.mktemp("export") / "hf"
    params = random_params(CFG, seed=2)
    hf.save(folder, CFG, params, tokenizer=bpe_tokenizer)
    return str(folder), params


@pytest.fixture(scope="module")
def auto_tokenizer(export):
    return transformers.AutoTokenizer.from_pretrained(export[0])


def test_vocab_and_merges_equal_transformers_own_tiktoken_converter(bpe_tokenizer, bpe_tokenizer_path):
    from transformers.convert_slow_tokenizer import TikTokenConverter  # pylint: disable=import-outside-toplevel

    ref_vocab, ref_merges = TikTokenConverter(vocab_file=bpe_tokenizer_path, pattern=PAT_STR).\
        extract_vocab_merges_from_model(bpe_tokenizer_path)
    vocab, merges = hf_tokenizer.vocab_and_merges(bpe_tokenizer.model._mergeable_ranks)
    assert vocab == ref_vocab
    assert merges == [tuple(m) for m in ref_merges] and len(merges) > 1024 - 256


def test_export_folder_files(export, bpe_tokenizer):
    files = set(os.listdir(export[0]))
    assert {hf_tokenizer.TOKENIZER_JSON, hf_tokenizer.TOKENIZER_CONFIG, hf_tokenizer.GENERATION_CONFIG,
            hf.CONFIG_FILE} <= files
    with open(os.path.join(export[0], hf_tokenizer.GENERATION_CONFIG)) as f:
        gen = json.load(f)
    assert gen["bos_token_id"] == 1024 == bpe_tokenizer.bos_id
    assert gen["eos_token_id"] == [1025, 1032, 1033]  # <|end_of_text|>, <|eom_id|>, <|eot_id|>
    with open(os.path.join(export[0], hf.CONFIG_FILE)) as f:
        config = json.load(f)
    assert config["bos_token_id"] == 1024 and config["eos_token_id"] == [1025, 1032, 1033]


def test_auto_tokenizer_ids_equal_on_text_and_special_text(auto_tokenizer, bpe_tokenizer, stdlib_texts):
    held_out = stdlib_texts[1]
    assert sum(map(len, held_out)) > 200_000
    for doc in held_out:
        ids = bpe_tokenizer.encode(doc)
        assert auto_tokenizer(doc, add_special_tokens=False)["input_ids"] == ids
        assert auto_tokenizer.decode(ids) == doc
    # periodic strings, where BPE merge order and tie-breaking matter most
    for unit in (" ", "=", "-", "\n", "\t", "a", "0", "ab", " =", "\n    ", "日本"):
        for k in range(1, 41):
            for doc in (unit * k, "x" + unit * k + "y"):
                assert auto_tokenizer(doc, add_special_tokens=False)["input_ids"] == bpe_tokenizer.encode(doc)
    mixed = "<|begin_of_text|>x = 1<|eot_id|>\n\n<|reserved_special_token_7|> <|python_tag|>   tail "
    ours = bpe_tokenizer.encode(mixed, bos=True, allowed_special="all")
    assert auto_tokenizer(mixed)["input_ids"] == ours  # BOS added, special text is special
    assert ours.count(bpe_tokenizer.bos_id) == 2
    assert bpe_tokenizer.special_tokens["<|reserved_special_token_7|>"] in ours
    for token, i in bpe_tokenizer.special_tokens.items():
        assert auto_tokenizer.convert_tokens_to_ids(token) == i
    assert auto_tokenizer.decode(ours) == bpe_tokenizer.decode(ours)
    assert auto_tokenizer.bos_token == "<|begin_of_text|>" and auto_tokenizer.eos_token == "<|eot_id|>"


@pytest.mark.parametrize("dialog", range(len(DIALOGS)))
def test_apply_chat_template_equals_encode_dialog(auto_tokenizer, bpe_tokenizer, dialog):
    messages = DIALOGS[dialog]
    for prompt in (False, True):
        ids = auto_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=prompt,
                                                 return_dict=True)["input_ids"]
        assert ids == bpe_tokenizer.encode_dialog(messages, add_generation_prompt=prompt)[0]


def test_chat_template_rejects_what_encode_dialog_rejects(auto_tokenizer, bpe_tokenizer):
    for bad, match in (([{"role": "tool", "content": "x"}], "unknown role"),
                       ([{"role": "user", "content": "x", "eom": True}], "eom"),
                       ([{"role": "user", "content": 3}], "must be a")):
        with pytest.raises(ValueError, match=match):
            bpe_tokenizer.encode_dialog(bad)
        with pytest.raises(Exception, match=match):
            auto_tokenizer.apply_chat_template(bad, tokenize=False)


def test_transformers_greedy_generate_equals_llama_jax(export, auto_tokenizer, bpe_tokenizer):
    folder, params = export
    m = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    stops = hf_tokenizer.stop_ids(folder, bpe_tokenizer)
    assert stops == bpe_tokenizer.stop_ids
    prompts = [auto_tokenizer("def fibonacci(n):")["input_ids"],
               auto_tokenizer.apply_chat_template(DIALOGS[0], add_generation_prompt=True, return_dict=True)[
                   "input_ids"]]
    for prompt in prompts:
        with torch.no_grad():
            out = m.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt):].tolist()
        if out and out[-1] in stops:
            out = out[:-1]  # transformers keeps the stop id; llama_jax reports it as the finish reason
        ours = sampling.generate(CFG, params, [prompt], max_new_tokens=24, stop_ids=stops).tokens[0]
        assert out == ours and len(ours) >= 1


def test_tokenizer_json_reads_back_with_the_same_ids(export, bpe_tokenizer, bpe_tokenizer_path, stdlib_texts,
                                                     tmp_path):
    back = hf_tokenizer.read(os.path.join(export[0], hf_tokenizer.TOKENIZER_JSON))
    assert back.model._mergeable_ranks == bpe_tokenizer.model._mergeable_ranks
    assert back.special_tokens == bpe_tokenizer.special_tokens
    # a tokenizer.json made by transformers' own converter from the Meta file reads back to the same ids
    from transformers.convert_slow_tokenizer import TikTokenConverter  # pylint: disable=import-outside-toplevel

    converted = TikTokenConverter(vocab_file=bpe_tokenizer_path, pattern=PAT_STR,
                                  extra_special_tokens=list(LLAMA3_1_SPECIAL_TOKENS)).converted()
    converted.save(str(tmp_path / "tokenizer.json"))
    from_transformers = hf_tokenizer.read(tmp_path)
    for doc in stdlib_texts[1][:6]:
        assert from_transformers.encode(doc) == back.encode(doc) == bpe_tokenizer.encode(doc)
    assert from_transformers.encode_dialog(DIALOGS[2]) == bpe_tokenizer.encode_dialog(DIALOGS[2])


def test_tokenizer_json_that_is_not_tiktoken_style_is_rejected(export, tmp_path):
    with open(os.path.join(export[0], hf_tokenizer.TOKENIZER_JSON)) as f:
        data = json.load(f)
    bad = json.loads(json.dumps(data))
    bad["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\w+|\s+"
    (tmp_path / "regex.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="regex.*not Llama 3's"):
        hf_tokenizer.read(tmp_path / "regex.json")
    bad = json.loads(json.dumps(data))
    bad["model"]["merges"] = bad["model"]["merges"][::-1]
    (tmp_path / "merges.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="not in rank order"):
        hf_tokenizer.read(tmp_path / "merges.json")
    bad = json.loads(json.dumps(data))
    bad["added_tokens"] = bad["added_tokens"][:10]
    (tmp_path / "specials.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="expected 256 special tokens"):
        hf_tokenizer.read(tmp_path / "specials.json")
    bad = json.loads(json.dumps(data))
    bad["added_tokens"][8]["content"] = "<|something_else|>"  # Llama 3.0 has no <|eom_id|>
    (tmp_path / "names.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"special tokens \['<\|eom_id\|>'\] are missing"):
        hf_tokenizer.read(tmp_path / "names.json")


def test_convert_carries_the_tokenizer_or_says_where_it_looked(export, bpe_tokenizer, bpe_tokenizer_path,
                                                               tmp_path):
    folder, params = export
    native.save(tmp_path / "bare", CFG, params)  # a checkpoint without a tokenizer
    with pytest.raises(FileNotFoundError, match=r"no tokenizer found in .*bare.*tokenizer\.model.*tokenizer\.json"
                                                r".*--weights_only"):
        checkpoints.convert(tmp_path / "bare", tmp_path / "hf_none", None, "hf")
    assert not os.path.exists(tmp_path / "hf_none")
    checkpoints.convert(tmp_path / "bare", tmp_path / "weights", None, "hf", weights_only=True)
    assert not os.path.exists(tmp_path / "weights" / hf_tokenizer.TOKENIZER_JSON)
    checkpoints.convert(tmp_path / "bare", tmp_path / "given", None, "hf", tokenizer=bpe_tokenizer_path)
    assert hf_tokenizer.read(tmp_path / "given").special_tokens == bpe_tokenizer.special_tokens

    # HF folder with only tokenizer.json -> llama_jax keeps it as tokenizer.model; generation reads either
    assert not os.path.exists(os.path.join(folder, "tokenizer.model"))
    checkpoints.convert(folder, tmp_path / "lj", None, "llama_jax")
    assert hf_tokenizer.read(tmp_path / "lj" / "tokenizer.model").model._mergeable_ranks == \
        bpe_tokenizer.model._mergeable_ranks
    from_hf, gen_hf = text.generate_text(folder, "import os", max_new_tokens=6)
    from_lj, gen_lj = text.generate_text(str(tmp_path / "lj"), "import os", max_new_tokens=6)
    assert gen_hf.tokens == gen_lj.tokens and from_hf == from_lj

    out = subprocess.run([sys.executable, "-m", "llama_jax.convert", "--from=llama_jax", "--to=hf",
                          f"--input={tmp_path / 'bare'}", f"--output={tmp_path / 'cli'}"], env=ENV,
                         capture_output=True, text=True)
    assert out.returncode == 2 and "no tokenizer found in" in out.stderr and "--weights_only" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and not os.path.exists(tmp_path / "cli")


def test_too_small_model_vocabulary_is_named(export, bpe_tokenizer, tmp_path):
    # checked before any tensor is read, so the (larger) params of the export do not matter here
    with pytest.raises(ValueError, match="tokenizer has 1280 ids .* vocabulary of 512"):
        hf.save(tmp_path / "m", CFG.replace(vocab_size=512), export[1], tokenizer=bpe_tokenizer)
    assert not os.path.exists(tmp_path / "m")
    np.testing.assert_equal(os.listdir(tmp_path), [])
