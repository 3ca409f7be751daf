"""Entry points report bad input in one line (`llama_jax: error: ...`, exit code 2), never a traceback."""

import os
import subprocess
import sys
import textwrap

import pytest

from llama_jax import cli
from llama_jax.data import tokenizer as tokenizer_lib
from llama_jax.infer import text
from llama_jax.interop import native
from tests.interop.helpers import random_params, tiny_cfg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
       "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}


def _error_line(args, cwd):
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, env=ENV, cwd=cwd)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("llama_jax: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


def test_convert_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    line = _error_line(["-m", "llama_jax.convert", "--from=workdir", "--to=hf", "--input=empty", "--output=out"],
                       tmp_path)
    assert "'empty' is not a training workdir" in line, line
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken/file").write_text("x")
    line = _error_line(["-m", "llama_jax.convert", "--from=hf", "--to=llama_jax", "--input=empty",
                        "--output=taken"], tmp_path)
    assert "--output=taken exists and is not empty" in line, line
    assert os.listdir(tmp_path / "taken") == ["file"]


def test_workdir_that_is_a_file_or_not_writable(tmp_path):
    (tmp_path / "afile").write_text("x")
    args = ["-m", "llama_jax.main", f"--config={REPO}/experiments/pretrain.py:tiny"]
    line = _error_line([*args, "--workdir=afile"], tmp_path)
    assert line == "llama_jax: error: --workdir=afile is a file, not a directory", line
    line = _error_line([*args, "--workdir=afile/run"], tmp_path)
    assert "afile is a file, not a directory" in line, line
    if os.geteuid() != 0:  # root may write anywhere
        (tmp_path / "locked").mkdir(mode=0o500)
        line = _error_line([*args, "--workdir=locked/run"], tmp_path)
        assert "locked is not writable" in line, line


def test_os_errors_name_the_file_not_the_errno(tmp_path):
    script = textwrap.dedent("""
        from llama_jax import cli
        def main():
            open("/nonexistent-dir/x.json")
        cli.run(main)
    """)
    line = _error_line(["-c", script], tmp_path)
    assert line == "llama_jax: error: No such file or directory: '/nonexistent-dir/x.json'", line


@pytest.fixture(scope="module")
def short_checkpoint(tmp_path_factory):
    """A llama_jax checkpoint with a 16-token context and a byte-level tokenizer (256 ranks + 256 specials)."""
    path = tmp_path_factory.mktemp("ckpt") / "lj"
    cfg = tiny_cfg(vocab_size=512, max_seq_len=16)
    native.save(path, cfg, random_params(cfg))
    tokenizer_lib.write_tiktoken_file(path / "tokenizer.model", {bytes([i]): i for i in range(256)})
    return str(path)


def test_generate_errors(tmp_path, short_checkpoint):
    line = _error_line(["-m", "llama_jax.generate", "--checkpoint=nothere", "--prompt=hi"], tmp_path)
    assert "checkpoint 'nothere' does not exist" in line, line
    with pytest.raises(ValueError, match=r"the prompt is 21 tokens long; the model's max_seq_len of 16 leaves no "
                                         r"room for new tokens \(at most 15 prompt tokens\)"):
        text.generate_text(short_checkpoint, "twenty characters...", max_new_tokens=4)
    with pytest.raises(ValueError, match=r"special-token text '<\|eot_id\|>'; pass --special_tokens=special"):
        text.generate_text(short_checkpoint, "a<|eot_id|>", max_new_tokens=2)
    tok = tokenizer_lib.Tokenizer.from_file(os.path.join(short_checkpoint, "tokenizer.model"))
    _, as_special = text.generate_text(short_checkpoint, "a<|eot_id|>", max_new_tokens=2, special_tokens="special")
    _, as_text = text.generate_text(short_checkpoint, "a<|eot_id|>", max_new_tokens=2, special_tokens="text")
    assert as_special.prompt_tokens == 3 and as_text.prompt_tokens == 1 + len("a<|eot_id|>")
    assert tok.eot_id not in tok.encode("a<|eot_id|>", disallowed_special=())


def test_usage_errors_are_one_line_naming_the_flag(tmp_path):
    """Unknown, missing or stray arguments: one line and exit code 2, not the whole help and exit code 1."""
    for args, want in [
        (["-m", "llama_jax.convert", "--bogus=1"], "bad flag: Unknown command line flag 'bogus'"),
        (["-m", "llama_jax.convert", "--from=hf"], "missing required flags --to, --input, --output"),
        (["-m", "llama_jax.generate", "--prompt=hi"], "missing required flag --checkpoint"),
        (["-m", "llama_jax.main", "--workdir=w"], "missing required flag --config"),
        (["-m", "llama_jax.scaling", "--workdir=w"], "expected one command of fit; got none"),
        (["-m", "llama_jax.scaling", "fit", "extra", "--workdir=w"], "expected one command of fit; got fit extra"),
        (["-m", "llama_jax.convert", "--from=hf", "--to=hf", "--input=a", "--output=b", "extra"],
         "unexpected arguments: extra"),
        (["-m", "llama_jax.main", f"--config={REPO}/experiments/pretrain.py:tiny", "--config.nope=1",
          "--workdir=w"], "bad flag: a --config override names no config field: 'nope'"),
    ]:
        line = _error_line(args, tmp_path)
        assert line == f"llama_jax: error: {want}", (args, line)
    assert os.listdir(tmp_path) == []


def test_a_missing_experiment_file_is_named(tmp_path):
    for module, extra in [("llama_jax.main", ["--workdir=w"]), ("llama_jax.plan", [])]:
        line = _error_line(["-m", module, "--config=experiments/nope.py:tiny", *extra], tmp_path)
        assert line == ("llama_jax: error: bad flag: --config=experiments/nope.py:tiny: experiment file "
                        "'experiments/nope.py' does not exist"), line
    assert os.listdir(tmp_path) == []


def test_flag_values_out_of_range_are_refused(tmp_path):
    for args, want in [
        (["-m", "llama_jax.generate", "--checkpoint=c", "--prompt=hi", "--temperature=-1"],
         "--temperature=-1.0: must be >= 0 (0 = greedy)"),
        (["-m", "llama_jax.generate", "--checkpoint=c", "--prompt=hi", "--top_p=0"], "--top_p=0.0: must be in (0, 1]"),
        (["-m", "llama_jax.plan", f"--config={REPO}/experiments/pretrain.py:tiny", "--peak_flops=-1"],
         "--peak_flops=-1.0: must be a positive number of FLOP/s"),
        (["-m", "llama_jax.plan", f"--config={REPO}/experiments/pretrain.py:tiny", "--mfu=1.5"],
         "--mfu=1.5: must be in (0, 1]"),
        (["-m", "llama_jax.scaling", "fit", "--workdir=w", "--bootstrap=-5"],
         "--bootstrap=-5: must be >= 0 (0 = no intervals)"),
        (["-m", "llama_jax.convert", "--from=hf", "--to=hf", "--input=a", "--output=b", "--shard_size=0"],
         "--shard_size=0: must be a positive byte count such as 5GB, 500MB or 1000000"),
    ]:
        line = _error_line(args, tmp_path)
        assert line == f"llama_jax: error: bad flag: {want}", (args, line)
    assert os.listdir(tmp_path) == []


def test_empty_paths_are_refused(tmp_path):
    """`--workdir=$UNSET` must not train into the current directory."""
    for args in [["-m", "llama_jax.main", f"--config={REPO}/experiments/pretrain.py:tiny", "--workdir="],
                 ["-m", "llama_jax.convert", "--from=hf", "--to=hf", "--input=a", "--output="],
                 ["-m", "llama_jax.generate", "--checkpoint=", "--prompt=hi"],
                 ["-m", "llama_jax.scaling", "fit", "--workdir="]]:
        line = _error_line(args, tmp_path)
        flag = args[-1] if args[-1].endswith("=") else args[-2]
        assert line == f"llama_jax: error: bad flag: {flag}: must not be empty (an unset variable?)", line
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="--workdir is empty"):
        cli.check_output_dir("", "--workdir")


def test_convert_names_a_missing_input(tmp_path):
    line = _error_line(["-m", "llama_jax.convert", "--from=hf", "--to=hf", "--input=/nonexistent",
                        "--output=out"], tmp_path)
    assert line == "llama_jax: error: input checkpoint '/nonexistent' does not exist", line
    assert os.listdir(tmp_path) == []
