"""Dialog / preference jsonl: validation, malformed counting, the bad-input messages, masks, packing."""
import json

import numpy as np
import pytest

from llama_jax.posttrain import data


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _pref(chosen="4", rejected="5", **extra):
    return {"prompt": [{"role": "user", "content": "What is 2 + 2?"}], "chosen": chosen, "rejected": rejected,
            **extra}


def test_read_counts_malformed_records(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    tool = {"messages": [{"role": "user", "content": "compute"},
                         {"role": "assistant", "content": "<|python_tag|>print(2+2)", "eom": True},
                         {"role": "ipython", "content": "4"}, {"role": "assistant", "content": "4"}]}
    lines = [json.dumps(good), "{not json", json.dumps({"messages": [{"role": "user", "content": "x"},
                                                                       {"role": "assistant", "content": " "}]}),
             json.dumps({"messages": [{"role": "robot", "content": "x"}]}), json.dumps(tool)]
    records, report = data.read_jsonl(_write(tmp_path / "d.jsonl", lines), "dialog")
    assert len(records) == 2 and report.total == 5 and report.kept == 2 and report.skipped == 3
    assert report.malformed == {"bad JSON": 1, "empty assistant turn": 1, "messages[0]": 1}
    with pytest.raises(ValueError, match=r"d.jsonl:2: bad JSON"):
        data.read_jsonl(str(tmp_path / "d.jsonl"), "dialog", strict=True)


def test_bad_preference_records_have_clear_messages():
    with pytest.raises(ValueError, match="chosen equals rejected"):
        data.parse_preference(_pref("4", " 4 "))
    with pytest.raises(ValueError, match="empty assistant turn: rejected is empty"):
        data.parse_preference(_pref("4", ""))
    with pytest.raises(ValueError, match="edited equals chosen"):
        data.parse_preference(_pref("4", "5", edited="4"))
    assert data.parse_preference(_pref("4", "5", edited="Four: 4"))["edited"] == "Four: 4"


def test_dialog_longer_than_the_sequence_is_dropped_or_refused(tok):
    msgs = [{"role": "user", "content": "What is 2 + 2? " * 10}, {"role": "assistant", "content": "4"}]
    assert data.encode_sft(tok, msgs, seq_len=16) is None
    with pytest.raises(ValueError, match=r"dialog has \d+ tokens, longer than the sequence length 16 \+ 1 "
                                         r"\(truncation policy 'error'"):
        data.encode_sft(tok, msgs, seq_len=16, truncation="error")
    assert data.encode_sft(tok, msgs, seq_len=256) is not None


def test_sft_mask_is_the_assistant_turns(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 3 + 4?"},
            {"role": "assistant", "content": "7"}]
    s = data.encode_sft(tok, msgs, seq_len=128)
    counted = s["targets"][s["loss_mask"] == 1].tolist()
    assert counted == tok.encode("7") + [tok.eot_id]


def test_preference_mask_excludes_formatting_tokens(tok):
    prompt = [{"role": "user", "content": "compute 2 + 2"}]
    tokens, content = data.encode_response(tok, prompt, "<|python_tag|>print(2 + 2)")
    counted = tokens[content].tolist()
    assert counted == tok.encode("print(2 + 2)")  # no <|python_tag|>, header or <|eot_id|>
    specials = {tok.eot_id, tok.eom_id, tok.python_tag_id, tok.start_header_id, tok.end_header_id, tok.bos_id}
    assert not specials & set(counted)
    enc = data.encode_preference(tok, _pref("4", "5"), seq_len=64)
    assert tok.decode(enc["chosen"]["targets"][enc["chosen"]["loss_mask"] == 1]) == "4"
    assert tok.decode(enc["rejected"]["targets"][enc["rejected"]["loss_mask"] == 1]) == "5"


def test_pack_rows_numbers_documents():
    seqs = [{k: np.arange(1, n + 1, dtype=np.int32) for k in ("inputs", "targets", "loss_mask")} for n in (3, 4, 5)]
    rows = data.pack_rows(seqs, 8)
    assert len(rows) == 2
    np.testing.assert_array_equal(rows[0]["segment_ids"], [1, 1, 1, 2, 2, 2, 2, 0])
    np.testing.assert_array_equal(rows[0]["positions"], [0, 1, 2, 0, 1, 2, 3, 0])
    np.testing.assert_array_equal(rows[1]["segment_ids"], [1] * 5 + [0] * 3)


def test_arithmetic_task_splits_are_disjoint(tmp_path):
    from llama_jax.posttrain import tasks
    paths = tasks.write_arithmetic(str(tmp_path), max_operand=8, n_sft=20, n_prompts=20, n_heldout=10)
    questions = {}
    for name, kind in (("sft", "dialog"), ("prompts", "prompt"), ("heldout", "prompt")):
        records, _ = data.read_jsonl(paths[name], kind)
        questions[name] = {(r.get("messages") or r["prompt"])[0]["content"] for r in records}
    assert len(questions["heldout"]) == 10
    assert not questions["heldout"] & (questions["sft"] | questions["prompts"])
    assert not questions["sft"] & questions["prompts"]
    assert tasks.verify_arithmetic({"answer": 12}, "7 + 5 = 12") == 1.0
    assert tasks.verify_arithmetic({"answer": 12}, "12 is not 13") == 0.0


def test_every_bad_input_has_one_clear_message(tmp_path, tok):
    # a preference response longer than the sequence length: dropped (None) by default, or refused
    long = _pref("4 " * 40, "5")
    assert data.encode_preference(tok, long, seq_len=16) is None
    with pytest.raises(ValueError, match=r"preference chosen response has \d+ tokens, longer than the sequence "
                                         r"length 16 \+ 1 \(truncation policy 'error'"):
        data.encode_preference(tok, long, seq_len=16, truncation="error")
    with pytest.raises(ValueError, match=r"truncation='cut'; expected one of \('drop', 'error'\)"):
        data.encode_sft(tok, [{"role": "user", "content": "x " * 40}, {"role": "assistant", "content": "y"}],
                        seq_len=8, truncation="cut")
    # an empty assistant turn in a dialog, a file with no valid record
    with pytest.raises(ValueError, match=r"empty assistant turn: messages\[1\] has no content"):
        data.parse_dialog({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]})
    path = _write(tmp_path / "bad.jsonl", [json.dumps(_pref("4", "4")), "[]"])
    with pytest.raises(ValueError, match=r"bad.jsonl: no valid preference records \(2 read, malformed: "
                                         r"\{'chosen equals rejected': 1, 'not a preference record': 1\}\)"):
        data.read_jsonl(path, "preference")
