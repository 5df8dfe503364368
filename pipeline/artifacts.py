"""Self-describing stage directories.

Each stage directory holds its outputs plus `recipe.yaml` (the resolved recipe),
`metrics.json`, and `provenance.json` (what the stage was built from, with a fingerprint
that later stages record in turn). `COMPLETE` is written last: a directory without it is
a partial run and is never reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from importlib import metadata
from pathlib import Path

import yaml

from pipeline.config import Recipe, to_dict

COMPLETE = "COMPLETE"
LIBRARIES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate")


class StageConflict(RuntimeError):
    pass


def fingerprint(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_provenance(stage_dir: Path) -> dict:
    path = Path(stage_dir) / "provenance.json"
    if not (Path(stage_dir) / COMPLETE).exists():
        raise FileNotFoundError(f"{stage_dir} is not a completed stage; run that stage first")
    return json.loads(path.read_text())


def upstream(stage_dir: Path) -> dict:
    """What a later stage records about an input stage: where it is and its fingerprint."""
    return {"path": str(stage_dir), "fingerprint": read_provenance(stage_dir)["fingerprint"]}


def _diff(old, new, prefix="") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new)) for d in _diff(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def begin(stage_dir: Path, inputs: dict, overwrite: bool = False, keep_partial: bool = False) -> bool:
    """Prepare `stage_dir` for a run with `inputs`; True means a finished identical run is reused.

    A finished run built from other inputs is kept unless `overwrite`, so nothing is
    replaced by accident. A partial run is cleared unless `keep_partial` (training resume).
    """
    stage_dir = Path(stage_dir)
    if (stage_dir / COMPLETE).exists():
        old = json.loads((stage_dir / "provenance.json").read_text())["inputs"]
        old, new = json.loads(json.dumps(old, default=str)), json.loads(json.dumps(inputs, default=str))
        if old == new:
            return True
        if not overwrite:
            changes = "; ".join(_diff(old, new))
            raise StageConflict(
                f"{stage_dir} was built from a different recipe ({changes}). "
                "Pass --overwrite to replace it, or choose another --out_dir."
            )
        shutil.rmtree(stage_dir)
    elif stage_dir.exists() and not keep_partial:
        shutil.rmtree(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    return False


def library_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def write_json(path: Path, obj) -> None:
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def finish(stage_dir: Path, stage: str, inputs: dict, recipe: Recipe, metrics: dict) -> Path:
    stage_dir = Path(stage_dir)
    (stage_dir / "recipe.yaml").write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False))
    write_json(stage_dir / "metrics.json", metrics)
    write_json(
        stage_dir / "provenance.json",
        {
            "stage": stage,
            "fingerprint": fingerprint(inputs),
            "inputs": inputs,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "libraries": library_versions(),
        },
    )
    (stage_dir / COMPLETE).write_text("")
    return stage_dir


def link_tree(src: Path, dst: Path) -> None:
    """Hard-link every file of `src` into `dst` (copy across filesystems): cache hits cost no space."""
    for path in Path(src).rglob("*"):
        target = Path(dst) / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        link_file(path, target)


def link_file(src: Path, dst: Path) -> None:
    """Hard-link `src` at `dst`, replacing it; a copy where a link cannot be made (another filesystem)."""
    Path(dst).unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
