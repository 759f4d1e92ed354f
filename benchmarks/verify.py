"""What checking a prepared dataset's files costs per GB, before a stage reads them.

Writes a file of random bytes (``--gb``, default 1), then times, page cache warm:

- ``record``: what ``prepare`` adds to record the file (one pass: the whole file's sha256 and that of
  every 64 MiB piece, ``unidd_ray.artifacts.dataset.file_record``);
- ``verify``: ``verify_file`` (the pieces hashed in parallel threads) on 1 thread and on every core.

Each is the median of ``--repeats`` runs; the check's memo of files already verified in the process is
cleared before each run.  A cold read is bounded by the disk's read rate instead.

    python benchmarks/verify.py [--gb 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import unidd_ray  # noqa: F401
from unidd_ray.artifacts import dataset as dataset_info
from unidd_ray.artifacts.dataset import file_record, verify_file

from _common import timeit, write_result


def _random_file(path: Path, gb: float) -> int:
    block = os.urandom(64 << 20)
    size = int(gb * (1 << 30))
    with open(path, "wb") as f:
        written = 0
        while written < size:
            f.write(block[:size - written])
            written += min(len(block), size - written)
    return size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "file.bin"
        size = _random_file(path, args.gb)
        gb = size / 1e9
        record = file_record(path)  # also warms the page cache
        results = {"bytes": size, "chunk_bytes": record["chunk_bytes"], "pieces": len(record["chunks"])}
        timed = timeit(lambda: file_record(path), repeats=args.repeats, warmup=0)
        results["record"] = {**timed, "s_per_gb": timed["median_s"] / gb}
        for threads in sorted({1, os.cpu_count() or 1}):
            def verify(threads=threads):
                dataset_info._VERIFIED.clear()
                verify_file(path, record, threads=threads)

            timed = timeit(verify, repeats=args.repeats, warmup=0)
            results[f"verify_{threads}_threads"] = {**timed, "s_per_gb": timed["median_s"] / gb}
    out = write_result("verify", results)
    for key, value in results.items():
        if isinstance(value, dict):
            print(f"{key:20s} {value['median_s']:.3f} s   {value['s_per_gb']:.3f} s/GB")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
