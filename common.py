"""Definitions that several scripts share, written once so that they cannot drift apart.

Keep this module small: a piece belongs here only when two scripts need the very same thing.
It imports nothing heavy (no torch, no transformers): every script imports it at start.
"""

import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def prompt_prefix(instruction: str | None) -> str:
    """The string prepended to a text: the recipe embeds f"{instruction} {text}" (exactly one space),
    and the raw text when the instruction is empty. sentence-transformers prompts, `BiEncoder.encode`'s
    `prompt`, the miner and the evaluation all prepend this same string."""
    return f"{instruction} " if instruction else ""


def with_prompt(instruction: str | None, text: str) -> str:
    """The text as the model reads it: prompt_prefix(instruction) + text."""
    return prompt_prefix(instruction) + text


# ----------------------------------------------------------------------------------------------
# Atomic writes: a reader (or a run resumed after a crash) sees the old content or the new one,
# never a half-written file or folder.


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside the folder `path` durable (POSIX: the rename lives in the folder's entry)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """A temp path next to `path` for the block to write; then fsync'ed and renamed to `path`.
    On any error the temp file is removed and `path` is unchanged.

        with atomic_file(path) as tmp:
            pq.write_table(table, tmp)
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # the block may have written through any library: sync what is there
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write `data` (text or bytes) to `path` atomically (see atomic_file)."""
    with atomic_file(path) as tmp:
        with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)


def remove_stale_temp_dirs(out: str | Path) -> None:
    """Temp folders `<out>.tmp-<pid>` of runs killed (SIGKILL, power loss) before they could clean up."""
    out = Path(out)
    for tmp in out.parent.glob(f"{out.name}.tmp-*"):
        try:
            pid = int(tmp.name.rsplit("-", 1)[1])
            os.kill(pid, 0)  # raises when no such process: the run that owned it is gone
        except ProcessLookupError:
            print(f"removing {tmp} left by an interrupted run")
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, PermissionError):
            pass


@contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Build a folder in `<out>.tmp-<pid>` and move it to `out` when the block ends without error.

    An existing `out` is replaced only then (renamed aside, the new folder renamed in, the old one
    removed); on any error, Ctrl-C included, the temp folder is removed and `out` is unchanged.
    Only the caller decides whether an existing `out` may be replaced.

        with atomic_dir(out) as tmp:
            write(tmp); check(tmp)
    """
    out = Path(out)
    remove_stale_temp_dirs(out)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    try:
        tmp.mkdir(parents=True)
        yield tmp
        if out.exists():
            old = out.with_name(f"{out.name}.old-{os.getpid()}")
            os.rename(out, old)
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(old, out)
                raise
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------------
# User errors. Anything a user can get wrong (a bad value, a missing file, data in the wrong layout)
# raises UserError with a message that says what to fix; run_cli prints it as
# "<script>: error: <message>" (argparse's own format) and exits with status 2 (argparse's), without
# a traceback. Every other exception, a ValueError raised inside numpy, pydantic (DeepSpeed's config)
# or transformers included, is a bug or an internal failure: it keeps its traceback and exit status 1.

USER_ERROR_STATUS = 2


class UserError(ValueError):
    """A mistake the user can fix; the message names the flag or file and what to do.

    A ValueError, so that code calling the scripts' functions as a library may catch either."""


def run_cli(main: Callable, argv: list[str] | None = None) -> int:
    """main(argv) -> exit status: 0, main's own int status, or USER_ERROR_STATUS after a UserError.

    if __name__ == "__main__":
        sys.exit(run_cli(main))
    """
    try:
        status = main(argv)
    except UserError as e:
        script = getattr(sys.modules.get(main.__module__), "__file__", None) or sys.argv[0]
        print(f"{Path(script).name}: error: {e}", file=sys.stderr, flush=True)
        return USER_ERROR_STATUS
    return status if isinstance(status, int) else 0


def read_json_file(path: str | Path, flag: str | None = None, error: type[UserError] = UserError) -> dict:
    """The JSON object in a file (named with `flag`, when a flag named it); a missing or malformed file
    raises `error`, a UserError (prepare_data.py's DataError for the data's own files)."""
    where = f"{flag} {path}" if flag else str(path)
    try:
        value = json.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise error(f"{where}: missing file") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{where}: not readable JSON ({e})") from e
    if not isinstance(value, dict):
        raise error(f"{where}: expected a JSON object, got {type(value).__name__}")
    return value


def _causes(e: BaseException) -> Iterator[BaseException]:
    """The exception and the chain of exceptions it was raised from."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def load_error_message(flag: str, name: str, what: str, error: BaseException) -> str:
    """Why `from_pretrained(name)` failed, and what to do, for a model or tokenizer given by `flag`."""
    errors = list(_causes(error))
    kinds = {cls.__name__ for e in errors for cls in type(e).__mro__}
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    tried = f"{flag} {name}: cannot load the {what} ({first})"
    folder = Path(name).expanduser()
    if folder.is_dir():
        return f"{tried}. The folder {name} exists but holds no loadable {what}: check its files (config.json ...)"
    if folder.exists():
        return f"{tried}. {name} is a file; give the model folder that holds it"
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith("/")
    if looks_like_path or "HFValidationError" in kinds:
        return f"{tried}. No folder {name} exists: check the path (it is not a Hugging Face hub name either)"
    if "GatedRepoError" in kinds or "gated" in str(error).lower():
        return (
            f"{tried}. {name} is a gated repository: accept its licence on https://huggingface.co/{name}, then run "
            "`huggingface-cli login` (or set HF_TOKEN)"
        )
    if "RepositoryNotFoundError" in kinds:
        return f"{tried}. No Hugging Face repository {name}: check the spelling (org/name), or give a local folder"
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if offline or "LocalEntryNotFoundError" in kinds:
        where = "HF_HUB_OFFLINE is set" if offline else "The Hugging Face Hub cannot be reached"
        return (
            f"{tried}. {where} and {name} is not in the local cache: check the spelling; on a machine with network, "
            f"`huggingface-cli download {name}` (then copy the cache or the folder here), or give a local folder"
        )
    return f"{tried}. Check the hub name's spelling, your network and `huggingface-cli login`, or give a local folder"


def load_pretrained(load: Callable, name: str, flag: str, what: str = "model"):
    """load(name), e.g. AutoTokenizer.from_pretrained; a failure becomes a UserError
    that names the flag, what was tried and what to do (misspelt, offline without a cache, gated)."""
    try:
        return load(name)
    except (OSError, ValueError) as e:  # transformers and huggingface_hub raise these for a name it cannot use
        raise UserError(load_error_message(flag, str(name), what, e)) from e


def resolve_device(device: str) -> str:
    """--device auto: cuda when a GPU is visible, else cpu; --device cuda without a GPU is a UserError."""
    import torch  # here, not at start: this module imports nothing heavy

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no GPU is visible; use --device cpu")
    return device
