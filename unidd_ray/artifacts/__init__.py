"""The files the stages write and read, one module per artifact, each with its reader, writer and verifier.

- :mod:`~unidd_ray.artifacts.files`: atomic writes, manifests of checksums, whose directory an output may
  replace, where Ray Train keeps a stage's checkpoints;
- :mod:`~unidd_ray.artifacts.locks`: one writer per output;
- :mod:`~unidd_ray.artifacts.dataset`: the prepared dataset's card (``dataset.json``) and labels;
- :mod:`~unidd_ray.artifacts.teacher`: ``teacher.pt`` + ``teacher.json``;
- :mod:`~unidd_ray.artifacts.statistics`: the real-feature moments (``stats.parquet``);
- :mod:`~unidd_ray.artifacts.distilled`: a distilled set (PNGs + ``manifest.parquet``);
- :mod:`~unidd_ray.artifacts.soft_labels`: stored soft labels (``soft_labels.parquet``);
- :mod:`~unidd_ray.artifacts.evaluation`: an evaluation's per-seed records and summary.
"""
