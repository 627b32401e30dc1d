"""The command-line grammar shared by every script, and the helpers of common.py behind it.

A user error (a bad value, a missing file, a model or tokenizer that cannot be loaded) ends with
"<script>: error: <message>" on stderr, exit status 2 and no traceback; the message names the flag.
The checks call the scripts' main() through common.run_cli in this process (what `__main__` does),
which proves that no exception escapes, without the start-up time of a subprocess.
"""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

import common
import evaluate
import export_hf
import options
import prepare_data
import train_biencoder as tb
from common import USER_ERROR_STATUS, UserError, run_cli
from tiny_models import REPO

sys.path.insert(0, str(REPO / "bench"))
import bench_packed_vs_padded  # noqa: E402
import bench_setup  # noqa: E402

# ----------------------------------------------------------------------------------------------
# common.py: atomic writes


def test_write_atomic_replaces_whole_files_and_leaves_no_temp(tmp_path):
    path = tmp_path / "state.json"
    common.write_atomic(path, "old")
    common.write_atomic(path, b"new")
    assert path.read_bytes() == b"new"
    with pytest.raises(RuntimeError), common.atomic_file(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash while writing")
    assert path.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_atomic_dir_swaps_only_a_complete_folder(tmp_path):
    out = tmp_path / "out"
    with common.atomic_dir(out) as tmp:
        assert tmp != out and not out.exists()
        (tmp / "a").write_text("1")
    assert (out / "a").read_text() == "1"
    with pytest.raises(KeyboardInterrupt), common.atomic_dir(out) as tmp:
        (tmp / "b").write_text("2")
        raise KeyboardInterrupt
    assert sorted(p.name for p in out.iterdir()) == ["a"]  # the old folder, untouched
    stale = tmp_path / "out.tmp-999999999"  # left by a killed run (no such pid)
    stale.mkdir()
    with common.atomic_dir(out) as tmp:
        (tmp / "c").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ----------------------------------------------------------------------------------------------
# common.py: the user-error exit path and the load errors


def test_run_cli_turns_a_user_error_into_one_line_and_status_2(capsys):
    def main(argv):
        raise UserError(f"--x {argv[0]}: bad; use --x 1")

    assert run_cli(main, ["7"]) == USER_ERROR_STATUS == 2
    err = capsys.readouterr().err
    assert err.endswith(": error: --x 7: bad; use --x 1\n") and "Traceback" not in err
    assert run_cli(lambda argv: None) == 0
    assert run_cli(lambda argv: {"result": 1}) == 0  # evaluate.main returns its result
    assert run_cli(lambda argv: 1) == 1  # a script's own status (bench: paths disagree)
    with pytest.raises(KeyError):  # anything else is a bug: its traceback stays
        run_cli(lambda argv: {}["x"])


def test_a_value_error_from_inside_a_library_keeps_its_traceback_and_status_1():
    """numpy, pydantic (DeepSpeed's config) and transformers raise ValueError for their own problems
    too: only UserError is a user's mistake; any other ValueError is a bug report, traceback and all."""
    with pytest.raises(ValueError, match="cannot reshape"):
        run_cli(lambda argv: np.zeros(2).reshape(3))
    code = (
        "import sys; import numpy as np; from common import run_cli\n"
        "def main(argv): np.zeros(2).reshape(3)\n"
        "sys.exit(run_cli(main))"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 1 and "Traceback (most recent call last)" in res.stderr
    assert "ValueError: cannot reshape array" in res.stderr and ": error:" not in res.stderr


def test_a_malformed_json_file_named_by_a_flag_is_a_user_error(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text('{"zero_optimization": {"stage": 3,}}')
    with pytest.raises(UserError, match=r"--deepspeed .*ds.json: not readable JSON \(Expecting property name"):
        tb.build_ds_config(tb.TrainConfig(deepspeed=str(bad)), 1)
    with pytest.raises(UserError, match=r"--config .*ds.json: not readable JSON"):
        tb.parse_config(["--config", str(bad)])


class GatedRepoError(OSError):  # the names huggingface_hub gives its errors
    pass


class RepositoryNotFoundError(OSError):
    pass


def load_failure(cause: Exception) -> OSError:
    try:
        try:
            raise cause
        except Exception as e:
            raise OSError("cannot load it") from e
    except OSError as e:
        return e


@pytest.mark.parametrize(
    "name,cause,offline,words",
    [
        ("meta-llama/Llama-3.1-8B", GatedRepoError("401"), "0", ("gated", "huggingface-cli login", "licence")),
        ("nope/nope", RepositoryNotFoundError("404"), "0", ("check the spelling", "local folder")),
        ("nope/nope", FileNotFoundError("not cached"), "1", ("HF_HUB_OFFLINE", "huggingface-cli download nope/nope")),
        ("./no/such/folder", ValueError("Repo id must use"), "0", ("No folder ./no/such/folder", "check the path")),
    ],
)
def test_load_errors_say_what_was_tried_and_what_to_do(monkeypatch, name, cause, offline, words):
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    message = common.load_error_message("--model", name, "model", load_failure(cause))
    assert message.startswith(f"--model {name}: cannot load the model (cannot load it)")
    for w in words:
        assert w in message, message


def test_load_error_of_an_existing_folder(tmp_path):
    message = common.load_error_message("--model", str(tmp_path), "model", OSError("no config.json"))
    assert f"The folder {tmp_path} exists" in message


# ----------------------------------------------------------------------------------------------
# The scripts: a model or tokenizer that cannot be loaded (offline: run_tests.sh sets HF_HUB_OFFLINE=1)


def user_error(capsys, main, args, *words) -> str:
    assert run_cli(main, [str(a) for a in args]) == USER_ERROR_STATUS
    err = capsys.readouterr().err
    assert ": error: " in err and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    return err


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as run_tests.sh: never a download, and a fast failure


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, llama_tokenizer_path):
    """A two-query prepared folder (the real Llama-3 tokenizer)."""
    root = tmp_path_factory.mktemp("cli")
    rows = [{"query": f"question {i}", "pos": [f"answer {i}"], "neg": ["other", "more"]} for i in range(2)]
    (root / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--jsonl", root / "mine.jsonl", "--tokenizer", llama_tokenizer_path, "--output-dir", root / "prepared"]
    assert run_cli(prepare_data.main, [str(a) for a in args + ["--num-negatives", "2", "--num-proc", "1"]]) == 0
    return root


def test_prepare_data_names_the_tokenizer_that_cannot_be_loaded(prepared, tmp_path, capsys):
    args = ["--jsonl", prepared / "mine.jsonl", "--tokenizer", "nope/nope", "--output-dir", tmp_path / "out"]
    user_error(capsys, prepare_data.main, args, "--tokenizer nope/nope", "HF_HUB_OFFLINE", "local folder")
    assert not (tmp_path / "out").exists()


def test_train_names_the_model_that_cannot_be_loaded(prepared, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args = ["--model", "nope/nope", "--data", prepared / "prepared", "--output-dir", tmp_path / "run"]
    args += ["--num-negatives", "2"]
    user_error(capsys, tb.main, args, "--model nope/nope", "HF_HUB_OFFLINE")
    args[1] = tmp_path / "no_such_model"
    user_error(capsys, tb.main, args, f"--model {tmp_path / 'no_such_model'}", "check the path")
    assert not (tmp_path / "run").exists()


def test_evaluate_names_the_model_that_cannot_be_loaded(capsys):
    args = ["--model", "nope/nope", "--beir", REPO / "data" / "scifact-beir"]
    user_error(capsys, evaluate.main, args, "--model nope/nope", "HF_HUB_OFFLINE")


SCRIPTS = ["prepare_data.py", "mine_negatives.py", "train_biencoder.py", "export_hf.py", "evaluate.py"]
SCRIPTS += ["bench/bench_setup.py", "bench/bench_prepare.py", "bench/bench_packed_vs_padded.py"]
SCRIPTS += ["bench/bench_train.py", "bench/bench_export.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_ends_through_run_cli(script):
    """What a subprocess would show, without its start-up time: `__main__` hands main to run_cli
    (prepare_data.py, export_hf.py and train_biencoder.py are also run as commands by their tests)."""
    tail = (REPO / script).read_text().rstrip().splitlines()[-2:]
    assert tail[0] == 'if __name__ == "__main__":' and "run_cli(main))" in tail[1], tail


def test_export_bad_arguments_are_user_errors(tmp_path, capsys):
    user_error(capsys, export_hf.main, ["--run", tmp_path / "nowhere"], "export_hf.py: error: ", "nowhere")
    user_error(capsys, export_hf.main, ["--verify-only", tmp_path, "--output-dir", tmp_path / "x"], "--output-dir")
    user_error(capsys, export_hf.main, ["--max-shard-size", "lots"], "--max-shard-size")
    with pytest.raises(SystemExit) as e:  # argparse's own errors: the same status
        export_hf.parse_args(["--dtype", "float16"])
    assert e.value.code == USER_ERROR_STATUS


# ----------------------------------------------------------------------------------------------
# One name per meaning: --output-dir (a folder), --output-json (a result file); old names hidden


def test_old_flag_spellings_still_work_and_are_hidden(capsys):
    assert export_hf.parse_args(["--out", "x"]).output_dir == "x"
    assert export_hf.parse_args(["--output-dir", "y"]).output_dir == "y"
    assert bench_packed_vs_padded.parse_args(["--output", "r.json"]).output_json == "r.json"
    assert bench_packed_vs_padded.parse_args(["--output-json", "s.json"]).output_json == "s.json"
    for parse in (export_hf.parse_args, bench_packed_vs_padded.parse_args, bench_setup.main):
        with pytest.raises(SystemExit):
            parse(["--help"])
        text = capsys.readouterr().out
        assert "--output-dir" in text or "--output-json" in text
        assert "--out " not in text and "--out," not in text and "--output " not in text


def test_every_training_flag_has_help_and_one_default():
    for f in dataclasses.fields(tb.TrainConfig):
        assert "help" in f.metadata, f"declare TrainConfig.{f.name} with option(default, help)"
        text = options.flag_help(f)
        assert text.count("(default: ") == 1 and len(text) > len("(default: x)") + 10, (f.name, text)
    assert tb.RESUME_FIELDS == options.resume_fields(tb.TrainConfig)
    assert "seed" in tb.RESUME_FIELDS and "max_steps" not in tb.RESUME_FIELDS  # a run may be extended


def test_export_device_has_one_default():
    cfg = export_hf.parse_args([])
    assert cfg.device == export_hf.ExportConfig().device == "auto"
    assert common.resolve_device("auto") in ("cpu", "cuda") and common.resolve_device("cpu") == "cpu"


def test_no_script_imports_another_script():
    """The five scripts share code through the modules below them, never through each other."""
    import ast

    scripts = {"prepare_data", "train_biencoder", "export_hf", "evaluate", "mine_negatives"}
    modules = [p for p in REPO.glob("*.py")] + list((REPO / "model").glob("*.py"))
    for path in modules:
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
        assert not imported & (scripts - {path.stem}), (path.name, imported & scripts)
    assert len(modules) > 10
