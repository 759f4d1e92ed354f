"""Versioned, checksummed, atomically written outputs.

Files are written under a temporary name in the same directory and renamed
into place (``os.replace`` is atomic on POSIX), so a crash never leaves a
half-written file under its final name.  Directories are assembled in a
temporary sibling and renamed as a whole.  ``manifest.json`` records the
sha256 of every file of an artifact so tampering or truncation is detected.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
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


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
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
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Build a directory in a temporary sibling and move it to ``final`` only if the block succeeds.

    An existing ``final`` is replaced only after the new one is complete.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        replace_directory(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def replace_directory(src: str | Path, dst: str | Path) -> None:
    """Move the finished directory ``src`` to ``dst``; an existing ``dst`` is removed only once ``src`` has
    replaced it (until then it is moved aside under a hidden name beside it)."""
    src, dst = Path(src), Path(dst)
    if not dst.exists():
        os.replace(src, dst)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".old", dir=dst.parent))
    os.replace(dst, old / dst.name)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


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
