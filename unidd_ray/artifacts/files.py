"""Versioned, checksummed, atomically written outputs.

Files are written under a temporary name in the same directory and renamed
into place (``os.replace`` is atomic on POSIX), so a crash never leaves a
half-written file under its final name.  Directories are assembled in a
temporary sibling and renamed as a whole.  Both get the permissions of a plain
``open``/``mkdir`` under the process umask (``mkstemp``/``mkdtemp`` would leave
them private to the owner), so other users of shared storage can read them.
``manifest.json`` records the sha256 of every file of an artifact so tampering
or truncation is detected.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import yaml

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class ArtifactError(ValueError):
    """An artifact is missing, incomplete, tampered with, or belongs to other inputs."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_json(obj: Any) -> str:
    """Content hash of a JSON-serialisable object (sorted keys)."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, default=str).encode())


def current_umask() -> int:
    """The process umask, read without changing it where Linux shows it (``os.umask`` sets it to read it,
    which a thread creating a file at that moment would see)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0o666 less the umask."""
    return 0o666 & ~current_umask()


def directory_mode() -> int:
    """The mode ``mkdir`` gives a new directory: 0o777 less the umask."""
    return 0o777 & ~current_umask()


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), file_mode())  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def atomic_write_yaml(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, yaml.safe_dump(obj, sort_keys=False))


@contextlib.contextmanager
def atomic_file(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; it is renamed to ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, file_mode())  # mkstemp makes it 0600 (and the block may have written a new file)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


# ----------------------------------------------------------------------------- whose directory is it
# The top-level names each kind of output directory is made of.  A directory of that kind holding anything
# else (a user's notes, a project's sources) is not replaced: its other files would be deleted with it.
OUTPUT_ENTRIES = {
    "teacher": {"teacher.pt", "teacher.json", "config.yaml"},
    "stats": {"stats.parquet", MANIFEST, "summary.json", "config.yaml"},
    "distilled": {"images", "manifest.parquet", MANIFEST, "summary.json", "config.yaml", "batches.json",
                  "distilled.beton", "plan.json", "emu_state.pt", ".batches"},
    "soft_labels": {"soft_labels.parquet", "config.yaml", MANIFEST},
    "evaluation": {"summary.json", "config.yaml", ".seeds"},
    "tune": {"ranking.json", "ranking.md", "best_recipe.yaml", "ray"},
    "import": {"teacher", "stats", "import.json"},  # `unidd-ray import unidd`: the authors' teacher and statistics
    "rehearsal": {"train", "val", "LOC_val_solution.csv", "rehearsal.json"},  # `unidd-ray rehearsal-data`
}
# What an output of a kind without a manifest holds once finished (a record file and a key it always has),
# and what it holds while in progress (an evaluation keeps its finished seeds, a sweep its Ray Tune state,
# before the first summary).
_FINISHED = {"teacher": ("teacher.json", "arch"), "evaluation": ("summary.json", "top1"),
             "tune": ("ranking.json", "rows"), "import": ("import.json", "source"),
             "rehearsal": ("rehearsal.json", "classes")}
_IN_PROGRESS = {"evaluation": ".seeds", "tune": "ray"}
# A pipeline's run directory: its record, the files it writes and the stage directories it names.
RUN_RECORD = "pipeline.json"
_RUN_FILES = {RUN_RECORD, "config.yaml", "results.json", "results.md", "report.html", "report.json", "report",
              "ray.log"}
_RUN_STAGE = re.compile(r"(data|teacher|stats|[a-z0-9_-]+-ipc\d+|eval-[a-z0-9_-]+-ipc\d+)(-[0-9a-f]{12})+(\.partial)?|tune-.+")


class OutputError(ArtifactError):
    """An output path holds something the tool did not write there; nothing was changed."""


def output_kind(directory: str | Path) -> str | None:
    """The kind of output ``directory`` holds (``teacher``, ``stats``, ``distilled``, ..., ``run``), or None
    when it holds none: the kind its manifest names, else the one whose record is there."""
    directory = Path(directory)
    kind = _json_object(directory / MANIFEST).get("kind")
    if kind in OUTPUT_ENTRIES:
        return kind
    for kind, (record, key) in _FINISHED.items():
        if key in _json_object(directory / record):
            return kind
    names = {p.name for p in directory.iterdir()} if directory.is_dir() else set()
    for kind, progress in _IN_PROGRESS.items():
        if progress in names and names <= OUTPUT_ENTRIES[kind]:
            return kind
    if (directory / RUN_RECORD).is_file() or (names and _run_names(names) == names and "config.yaml" in names
                                               and len(names) > 1):
        return "run"  # written before 2026-12 (no record yet): its config and the stages it named
    return None


def _json_object(path: Path) -> dict:
    """The JSON object in ``path``, or an empty one when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _run_names(names: set[str]) -> set[str]:
    """The names among ``names`` that a pipeline writes into its run directory (hidden ones are its
    staging, checkpoint and lock folders)."""
    return {n for n in names if n in _RUN_FILES or n.startswith(".") or _RUN_STAGE.fullmatch(n)}


def check_output(path: str | Path, kind: str, *, option: str = "--out") -> None:
    """Refuse to write an output of ``kind`` to ``path`` unless ``path`` is new, an empty directory, or an
    earlier output of the same kind made only of that kind's files (re-runs and ``--resume`` replace it).
    A pipeline's run directory (``kind="run"``) may hold any stage directory the pipeline names.

    Raises :class:`OutputError` naming the path, what is in the way and the fix; changes nothing.
    """
    path = Path(path)
    fix = f"give {option} a new or empty directory"
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_dir():
        raise OutputError(f"{path} exists and is not a directory; {fix}")
    names = sorted(p.name for p in path.iterdir())
    if not names:
        return
    found = output_kind(path)
    if found != kind:
        what = f"a {found} output" if found else f"files unidd-ray did not write ({_listing(names)})"
        raise OutputError(f"{path} holds {what}, not a {kind} output: unidd-ray only replaces an earlier output of "
                          f"the same kind; {fix}")
    own = _run_names(set(names)) if kind == "run" else OUTPUT_ENTRIES[kind]
    foreign = [n for n in names if n not in own]
    if foreign:
        raise OutputError(f"{path} holds a {kind} output and files it is not made of ({_listing(foreign)}), which "
                          f"writing there could overwrite or delete; move them out, or {fix}")


def _listing(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


@contextlib.contextmanager
def atomic_directory(final: str | Path, kind: str) -> Iterator[Path]:
    """Build a directory in a temporary sibling and move it to ``final`` only if the block succeeds.

    ``final`` must be new, empty or an earlier output of ``kind`` (:func:`check_output`, checked before the
    block runs and again before the move); an existing one is replaced only after the new one is complete.
    """
    final = Path(final)
    check_output(final, kind)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        os.chmod(tmp, directory_mode())  # mkdtemp makes it 0700
        replace_directory(tmp, final, kind)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def replace_directory(src: str | Path, dst: str | Path, kind: str) -> None:
    """Move the finished directory ``src`` to ``dst``; an existing ``dst`` (an earlier output of ``kind``:
    anything else is refused by :func:`check_output`) is removed only once ``src`` has replaced it (until then
    it is moved aside under a hidden name beside it, ``.NAME.XXXXXXXX.old``).

    Such a folder left behind by a crash between the two renames holds an output that has been
    superseded; the next replacement of ``dst`` removes it.
    """
    src, dst = Path(src), Path(dst)
    check_output(dst, kind)
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".old", dir=dst.parent))
        os.replace(dst, old / dst.name)
        os.replace(src, dst)
    else:
        os.replace(src, dst)
    for stale in set_aside(dst):
        shutil.rmtree(stale, ignore_errors=True)


def set_aside(dst: str | Path) -> list[Path]:
    """The ``.NAME.XXXXXXXX.old`` folders :func:`replace_directory` moves an earlier ``dst`` into (the eight
    characters are ``tempfile``'s; no other output's name matches, ``NAME.partial``'s included)."""
    dst = Path(dst)
    pattern = re.compile(rf"\.{re.escape(dst.name)}\.[a-z0-9_]{{8}}\.old")
    return sorted(p for p in dst.parent.iterdir() if pattern.fullmatch(p.name) and p.is_dir())


def differences(recorded: dict, current: dict, prefix: str = "") -> list[str]:
    """``name: recorded -> current`` for every entry of two nested mappings that differs (dotted names; a
    value longer than 40 characters of JSON is cut short)."""

    def short(v):
        text = json.dumps(v, default=str)
        return text if len(text) <= 40 else text[:16] + "…"

    out = []
    for key in list(recorded) + [k for k in current if k not in recorded]:
        a, b, name = recorded.get(key), current.get(key), f"{prefix}{key}"
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{name}.")
        else:
            out.append(f"{name}: {short(a)} -> {short(b)}")
    return out


def write_manifest(directory: str | Path, kind: str, files: list[str] | None = None, **meta) -> dict:
    """Record the sha256 of ``files`` in ``manifest.json``.

    Default: every file but the manifest, leaving out hidden ones (a name or folder starting with a dot:
    temporary files, working records).
    """
    directory = Path(directory)
    if files is None:
        files = sorted(str(rel) for rel in (p.relative_to(directory) for p in directory.rglob("*") if p.is_file())
                       if str(rel) != MANIFEST and not any(part.startswith(".") for part in rel.parts))
    manifest = {
        "kind": kind,
        "format_version": FORMAT_VERSION,
        "files": {name: sha256_file(directory / name) for name in files},
        **meta,
    }
    atomic_write_json(directory / MANIFEST, manifest)
    return manifest


def read_manifest(directory: str | Path, kind: str | None = None, *, verify: bool = True) -> dict:
    """Read ``manifest.json`` and (by default) check every recorded checksum."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{directory} is not a complete artifact: {MANIFEST} is missing "
                            "(the stage that writes it did not finish)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is corrupt: {exc}") from exc
    if kind is not None and manifest.get("kind") != kind:
        raise ArtifactError(f"{directory} holds a {manifest.get('kind')!r} artifact, expected {kind!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{directory} has format version {manifest.get('format_version')}, "
                            f"this unidd_ray reads version {FORMAT_VERSION}")
    if verify:
        for name, digest in manifest.get("files", {}).items():
            file = directory / name
            if not file.is_file():
                raise ArtifactError(f"{file} listed in the manifest is missing")
            if sha256_file(file) != digest:
                raise ArtifactError(f"{file} does not match its recorded sha256: the file was modified or "
                                    "truncated; re-run the stage that wrote it")
    return manifest


def stage_storage(out_dir: str | Path, storage_path: str | None = None) -> Path:
    """Where Ray Train keeps the checkpoints of the stage writing ``out_dir``.

    Default: ``.<name>.ray`` beside ``out_dir``.  With a shared ``storage_path`` (a file system
    every node mounts, e.g. EFS or NFS), a directory under it named after ``out_dir`` plus a hash of
    its absolute path, so that two outputs never share (or delete) each other's checkpoints.
    """
    out_dir = Path(out_dir).resolve()
    if not storage_path:
        return out_dir.parent / f".{out_dir.name}.ray"
    if "://" in str(storage_path):
        raise ValueError(f"storage_path {storage_path!r} is a URI; the stages read and write their checkpoints "
                         "through the file system: mount the bucket on every node (e.g. EFS, Filestore, "
                         "s3fs/gcsfuse) and give the mount point")
    key = hashlib.sha256(str(out_dir).encode()).hexdigest()[:8]
    return Path(storage_path).resolve() / f"{out_dir.name}-{key}"
