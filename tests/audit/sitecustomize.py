"""Test helper: which process writes where, observed from inside real runs (nothing is replaced).

Python imports `sitecustomize` at start-up from the path, so putting this folder on PYTHONPATH
loads it into every process of an `accelerate launch` (the launcher, torchrun and each rank).
When AUDIT_WRITES_UNDER is set, an audit hook (PEP 578) records every file-system write that
Python code makes under that folder, and at exit the process saves them to
AUDIT_WRITES_LOG/<RANK or 'launcher'>-<pid>.json. Writes made by native code (safetensors,
torch.save) raise no audit event; the Python-side writes of every stage (json, yaml, tokenizer
and adapter configs, mkdir, rename, rmtree) do.
"""

import atexit
import json
import os
import sys

_ROOT = os.environ.get("AUDIT_WRITES_UNDER")
_WRITE_EVENTS = {"os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "os.link", "os.symlink",
                 "os.truncate", "shutil.rmtree", "shutil.copyfile", "shutil.move"}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _under_root(path) -> bool:
    if isinstance(path, int) or path is None:
        return False
    path = os.path.abspath(os.fsdecode(path))
    return path == _ROOT or path.startswith(_ROOT + os.sep)


def _install() -> None:
    writes = []

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & _WRITE_FLAGS)
            paths = [path] if writing else []
        elif event in _WRITE_EVENTS:
            paths = [a for a in args[:2] if isinstance(a, str | bytes | os.PathLike)]
        else:
            return
        writes.extend([event, os.fsdecode(p)] for p in paths if _under_root(p))

    def save():
        log_dir = os.environ["AUDIT_WRITES_LOG"]
        name = f"{os.environ.get('RANK', 'launcher')}-{os.getpid()}.json"
        with open(os.path.join(log_dir, name), "w") as handle:
            json.dump({"argv": sys.argv, "writes": writes}, handle)

    sys.addaudithook(hook)
    atexit.register(save)


if _ROOT:
    _ROOT = os.path.abspath(_ROOT)
    _install()
