"""The paper variants train only on the user's files: Meta's tokenizer and the paper's mixture by source name.

Without them a run stops before building anything (no workdir, corpus or tokenizer written), in one line naming
each missing knob; with them (tiny stand-ins here) the mixture's weights reach the data pipeline, and a phase's
`weights` change the mixture within a stage's one stream."""

import collections
import importlib.util
import json
import os
import pathlib

import pytest
from array_record.python import array_record_module

from llama_jax import experiment as E
from llama_jax.data import batch as batch_lib
from llama_jax.data import pipeline, tokenizer
from llama_jax.stages import KINDS
from llama_jax.stages.pretrain import Pretrain
from llama_jax.train import driver, kind as kind_lib, stream as stream_lib

REPO = pathlib.Path(__file__).resolve().parents[2]
PAPER_PRETRAIN = ["llama3.1-8b", "llama3.1-70b", "llama3.1-405b"]
MIX_NAMES = ["general_knowledge", "math_reasoning", "code", "multilingual"]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _posttrain_files(tmp_path) -> str:
    """The posttrain paper variant's knobs but the tokenizer: an SFT, prompt and preference file, an init dir."""
    files = {"sft": '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}',
             "prompts": '{"prompt": [{"role": "user", "content": "hi"}]}',
             "preferences": '{"prompt": [{"role": "user", "content": "hi"}], "chosen": "yo", "rejected": "no"}'}
    inputs = tmp_path / "inputs"
    (inputs / "init").mkdir(parents=True, exist_ok=True)
    for name, line in files.items():
        (inputs / f"{name}.jsonl").write_text(line + "\n")
    return ",".join(f"{name}={inputs / name}.jsonl" for name in files) + f",init={inputs / 'init'},sampler=self"


def _long_context_paper(init):
    """`long_context.py:paper` extending the (empty) checkpoint directory `init` (its gates need a start)."""
    c = _load("long_context").get_config("paper")
    c.init_from = str(init)
    return c


def _paper_configs(tmp_path):
    """(label, config) of every paper variant, as loaded: no tokenizer, no data files."""
    out = [(f"pretrain:{v}", _load("pretrain").get_config(v)) for v in PAPER_PRETRAIN]
    knobs = "paper," + _posttrain_files(tmp_path)
    out.append(("long_context:paper", _long_context_paper(tmp_path / "inputs" / "init")))
    with pytest.raises(ValueError, match=r"^experiments/posttrain.py:paper needs tokenizer=PATH$"):
        _load("posttrain").get_config(knobs)
    post = _load("posttrain").get_config(f"{knobs},tokenizer={tmp_path}/t.model")
    post.tokenizer = ""  # as --config.tokenizer= would: still no embedded fallback
    out.append(("posttrain:paper", post))
    return out


def _written(root: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if "inputs" not in p.parts)


def test_every_paper_variant_resolves_and_stops_before_building_anything_without_its_files(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the embedded corpus or tokenizer was built")

    monkeypatch.setattr(driver.corpus_lib, "default_tokenizer", refuse)
    for label, c in _paper_configs(tmp_path):
        stages = E.resolve(c, KINDS)  # resolving (and `plan`) needs no data
        assert stages and c.tokenizer_required, label
        assert all(s["kind"] != "corpus" for st in stages for s in st.data["sources"]), label
        c.data.cache_dir = str(tmp_path / "cache")
        with pytest.raises(ValueError) as error:
            driver.run_experiment(c, str(tmp_path / "run"), KINDS)
        message = str(error.value)
        assert "\n" not in message and "Meta's tokenizer.model (set --config.tokenizer=PATH)" in message, label
        if label.startswith("posttrain"):  # its data are files the variant's knobs name
            assert "data.paths" not in message
        else:
            names = MIX_NAMES + (["high_quality"] if label.startswith("long_context") else [])
            assert f"data sources {', '.join(names)} (set --config.data.paths.<name>=PATH for each: " \
                   "array_record files)" in message, label
        assert _written(tmp_path) == [], label  # no workdir, corpus cache or tokenizer


def test_the_papers_mix_by_name_and_the_anneal_upsamples_high_quality(tmp_path):
    for variant in PAPER_PRETRAIN:
        c = _load("pretrain").get_config(variant)
        assert {s["name"]: s["weight"] for s in c.data.sources} == {
            "general_knowledge": 0.50, "math_reasoning": 0.25, "code": 0.17, "multilingual": 0.08}  # §3.1.2
        assert sorted(c.data.paths) == sorted(MIX_NAMES)
    stages = E.resolve(_long_context_paper(tmp_path), KINDS)
    anneal = {s["name"]: s["weight"] for s in stages[-1].data["sources"]}
    longest = {s["name"]: s["weight"] for s in stages[-2].data["sources"]}
    assert stages[-1].kind == "anneal" and "high_quality" not in longest
    assert anneal["high_quality"] == 0.3 and sum(anneal.values()) == pytest.approx(1.0)
    for name in MIX_NAMES:  # the rest keeps the pretraining proportions
        assert anneal[name] / 0.7 == pytest.approx(longest[name], abs=1e-4)


def _array_record(path: pathlib.Path, texts: list[str]) -> str:
    writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
    for text in texts:
        writer.write(json.dumps({"text": text}).encode())
    writer.close()
    return str(path)


def _rows_per_source(data_cfg: dict, tok, rows: int) -> collections.Counter:
    """Rows of each source in the first `rows` training rows (each source is packed on its own)."""
    names = [s["name"] for s in data_cfg["sources"]]
    it = pipeline.make_train_iterator(data_cfg, tok, 16, 20, seed=0, process_index=0, process_count=1,
                                      track_documents=True)
    counts = collections.Counter()
    for _ in range(rows // 20):
        for row in next(it)["documents"]:
            counts[names[(int(row[row > 0][0]) - 1) % len(names)]] += 1
    return counts


@pytest.fixture(scope="module")
def given(tmp_path_factory):
    """(tokenizer path, {source name: ArrayRecord file}): tiny stand-ins for Meta's tokenizer and the paper data."""
    inputs = tmp_path_factory.mktemp("given") / "inputs"
    inputs.mkdir()
    names = MIX_NAMES + ["high_quality"]
    tok_path = str(inputs / "tokenizer.model")
    tokenizer.train_bpe([f"{n} document {i} about {n}" for n in names for i in range(20)], 300, tok_path)
    return tok_path, {n: _array_record(inputs / f"{n}.array_record", [f"{n} document {i} " * 3 for i in range(40)])
                      for n in names}


def _given_config(name, variant, given):
    c = _load(name).get_config(variant)
    if name == "long_context":
        c.init_from = os.path.dirname(given[0])
    c.tokenizer = given[0]
    for source in c.data.paths:
        c.data.paths[source] = given[1][source]
    driver.check_inputs(c)  # nothing missing
    return c


def test_given_files_carry_the_mixture_weights_into_the_pipeline(given):
    c = _given_config("long_context", "paper", given)
    tok = tokenizer.Tokenizer.from_file(given[0])
    stages = E.resolve(c, KINDS)
    for stage, rows in ((stages[0], 200), (stages[-1], 2000)):
        data_cfg = E.thaw(stage.data)
        assert all(s["path"] == c.data.paths[s["name"]] for s in data_cfg["sources"])
        counts = _rows_per_source(data_cfg, tok, rows)
        for s in data_cfg["sources"]:
            assert counts[s["name"]] / rows == pytest.approx(s["weight"], abs=0.01), (stage.name, s["name"])


def test_a_phase_changes_the_mixture_within_one_stream_and_schedule(given):
    c = _given_config("pretrain", "llama3.1-8b", given)
    later = {"general_knowledge": 0.3, "multilingual": 0.28}  # e.g. more non-English later in training
    c.stages = [E.stage("pretrain", [E.phase(16, 20, until_tokens=10 * 320), E.phase(16, 20, weights=later)],
                        E.optim(1e-3, 1), steps=20)]
    (stage,) = E.resolve(c, KINDS)
    assert [dict(p.weights) for p in stage.phases] == [{}, later] and stage.schedule_steps == 20
    names = [s["name"] for s in stage.data["sources"]]
    counts = [collections.Counter(), collections.Counter()]

    class Recording(Pretrain):  # the rows' sources, from the host-only document ids the stream takes off
        def train_iterator(self, ctx, phase, start_documents):
            it = super().train_iterator(ctx, phase, start_documents)

            class Counted:
                def __next__(self_inner):
                    batch = next(it)
                    for row in batch[batch_lib.DOCUMENT_KEY]:
                        counts[phase][names[(int(row[row > 0][0]) - 1) % len(names)]] += 1
                    return batch
            return Counted()

    ctx = kind_lib.StageContext(stage=stage, config=c, tokenizer=tokenizer.Tokenizer.from_file(given[0]), mesh=None,
                                rules=None, writer=None, data_cfg=E.thaw(stage.data), to_device=None, eval_step=None)
    stream = stream_lib.StageStream(Recording(), ctx)
    stream.open(0, num_shards=1)
    for step in range(20):
        stream.next(step)
    for phase, weights in ((0, E.PAPER_MIX), (1, dict(E.PAPER_MIX, **later))):
        assert sum(counts[phase].values()) == 200
        for name, weight in weights.items():
            assert counts[phase][name] / 200 == pytest.approx(weight, abs=0.01), (phase, name)
    c.stages = [E.stage("pretrain", [E.phase(16, 20, weights={"cod": 0.5})], E.optim(1e-3, 1), steps=2)]
    with pytest.raises(ValueError, match=r"stage 'pretrain' phase 0: mixture weights name unknown data source\(s\) "
                                         r"\['cod'\]"):
        E.resolve(c, KINDS)
