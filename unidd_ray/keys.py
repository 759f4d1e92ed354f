"""Content addressing: the keys that name a run's stage directories and the identities a resumed stage must match.

A stage directory is named by a key: the first 12 hex digits of the sha256 of the stage's kind, the settings
that change its result and the identities of its inputs (the dataset's fingerprint, the teacher's weights,
the statistics, the distilled set's images).  A stage whose directory is complete is reused; changing a
setting one method reads (cfm's ``beta_max``) moves only that method's recovery and evaluation.  Settings
that change how fast a stage runs, not what it computes (CPU counts, retries, memory layout), and settings
that say how much of it to do (the evaluation's seed count: seed k's student is the same for any count) are
left out.

A resumed stage (squeeze and recover continue from checkpoints, an evaluation keeps its finished seeds)
records the identity of what it was started with; :func:`check_resumable` refuses to continue with
anything else, naming what differs.

``CACHE_FORMAT`` is the version of these rules: a run directory made under other rules cannot be reused
(the pipeline says so, and how to start over), since its directories would be found under other keys.
"""

from __future__ import annotations

from unidd_ray.artifacts.files import differences, sha256_json
from unidd_ray.config import EvaluateConfig, ModelConfig, Recipe, RecoverConfig, SqueezeConfig, to_dict
from unidd_ray.data.normalization import DATASET
from unidd_ray.methods import get_method

CACHE_FORMAT = 2
PERFORMANCE_KEYS = {
    "stats": {"actors", "cpus_per_actor", "gpus_per_actor", "max_retries", "blocks_per_unit"},
    "recover": {"cpus_per_worker", "use_gpu", "max_failures", "save_beton", "channels_last"},
    "evaluate": {"workers", "cpus_per_worker", "use_gpu", "eval_batch_size", "channels_last"},
    "squeeze": {"cpus_per_worker", "use_gpu", "max_failures", "eval_batch_size"},
    "data": {"num_workers", "resolution"},  # (prepare does not read data.resolution: the side models train at)
}
EXTENT_KEYS = {"evaluate": {"seeds"}}
# Settings added under this format, each with the value that computes what the stages did before it: at that
# value a setting stays out of the key, so the directories made before it keep their keys.
ADDED_KEYS = {"recover": {"init": "random", "lr_schedule": "cosine", "roll": "symmetric", "augment": True,
                          "classes": None, "amp": "none"},
              "stats": {"artifact": None},
              # students: each evaluation's key has the one student it trains (evaluate.student); the list is []
              "evaluate": {"protocol": "ours", "batch_size_by_ipc": None, "students": [], "amp": "none"}}
# Settings renamed under this format enter the key under their former name (the keys of stored stages stay).
RENAMED_KEYS = {"recover": {"batch_classes": "classes_per_batch"}}


def key_settings(kind: str, settings: dict) -> dict:
    """The settings of a ``kind`` stage that go into its key (its performance and extent settings left out, an
    added setting at its former behaviour left out, a renamed one under its former name)."""
    drop = PERFORMANCE_KEYS.get(kind, set()) | EXTENT_KEYS.get(kind, set())
    added, renamed = ADDED_KEYS.get(kind, {}), RENAMED_KEYS.get(kind, {})
    return {renamed.get(k, k): v for k, v in settings.items()
            if k not in drop and not (k in added and v == added[k])}


def stage_key(kind: str, settings: dict, **inputs) -> str:
    """A stage directory's key from its settings (:func:`key_settings` applied) and its inputs."""
    return sha256_json({"kind": kind, "format": CACHE_FORMAT, "settings": key_settings(kind, settings),
                        "inputs": inputs})[:12]


# ----------------------------------------------------------------------------- inputs
def lossy_storage(info) -> dict:
    """How a prepared dataset was stored, when that changes its pixels: raw storage is a function of the
    source alone (its fingerprint is in every key already); JPEG storage also of the size cap and quality."""
    if info.storage == "raw":
        return {}
    return {"storage": {"storage": info.storage, "max_resolution": info.max_resolution,
                        "jpeg_quality": info.jpeg_quality, "write_mode": info.write_mode}}


def dataset_identity(info) -> dict:
    """The prepared dataset as a stage input: its fingerprint and, for JPEG storage, how it was stored."""
    return {"fingerprint": info.fingerprint, **lossy_storage(info)}


def teacher_settings(model_cfg: ModelConfig) -> dict:
    """The teacher section as it enters a key: ``normalization: dataset`` (the default, a function of the dataset,
    whose identity is in the key) is left out, so a recipe that does not set it keeps the key it had before the
    setting existed."""
    model = to_dict(model_cfg)
    model.pop("artifact", None)  # a teacher artifact takes the stage's place: that stage has no key
    if model.get("normalization") == DATASET:
        del model["normalization"]
    return model


def teacher_normalization(tinfo, info) -> dict:
    """The teacher's input normalisation where it is not the dataset's own mean and std (``{}`` where it is): a
    stage input of its own, since a pretrained teacher's weights (its sha256) are the same under any."""
    mean, std = getattr(tinfo, "mean", None), getattr(tinfo, "std", None)
    if mean is None or (list(mean) == list(getattr(info, "mean", None) or [])
                        and list(std) == list(getattr(info, "std", None) or [])):
        return {}
    return {"normalization": {"mean": list(mean), "std": list(std)}}


def teacher_identity(tinfo, info):
    """The teacher as a stage input: its weights' sha256, with its normalisation where it is not the dataset's
    (:func:`teacher_normalization`; so the keys of a teacher normalised with the dataset's stay as they were)."""
    normalization = teacher_normalization(tinfo, info)
    return {"sha256": tinfo.sha256, **normalization} if normalization else tinfo.sha256


def distilled_identity(rows: list[dict], files: dict[str, str]) -> str:
    """What an evaluation reads of a distilled set: every image's path, class and sha256, in the order of its
    ``manifest.parquet`` ``rows`` (an image's row is its id in the augmentation stream and in stored soft
    labels); ``files``: its manifest's checksums.  Its summary, config and optional ``.beton`` are left out, so
    a set recomputed bit for bit, or written with other performance settings, is the same input."""
    try:
        return sha256_json([(r["path"], int(r["class"]), files[r["path"]]) for r in rows])
    except KeyError as exc:
        raise ValueError(f"image {exc} of manifest.parquet is not in manifest.json: the set is damaged, recover it "
                         "again") from None


# ----------------------------------------------------------------------------- stage keys
def data_key(recipe: Recipe) -> str:
    """The prepared dataset's key: the source and how it is stored."""
    return stage_key("data", to_dict(recipe.data))


def teacher_key(recipe: Recipe, info, weights_sha256: str | None) -> str:
    """The teacher's key on the prepared dataset ``info``; ``weights_sha256``: its starting weights' (by content,
    not path)."""
    model = {**teacher_settings(recipe.teacher), "weights": weights_sha256}
    return stage_key("squeeze", {**to_dict(recipe.squeeze), "model": model, "resolution": recipe.data.resolution},
                     dataset=dataset_identity(info))


def stats_key(recipe: Recipe, info, tinfo) -> str:
    """The real statistics' key under the teacher ``tinfo``."""
    return stage_key("stats", to_dict(recipe.stats), teacher=teacher_identity(tinfo, info),
                     dataset=dataset_identity(info))


def stats_artifact_key(stats_sha256: str) -> str:
    """The key of a statistics artifact given to the run (``stats.artifact``) rather than computed by it: its
    file's sha256 is all it is."""
    return stage_key("stats-artifact", {}, statistics=stats_sha256)


def random_key(recipe: Recipe, ipc: int, info, tinfo) -> str:
    """The random real subset's key: IPC images per class drawn with the IPC's recover seed, written at the
    teacher's side like the recovered sets (read and encoded with the teacher's normalisation)."""
    return stage_key("random", {"ipc": ipc, "seed": recipe.recover_for(ipc).seed, "resolution": tinfo.resolution,
                                **teacher_normalization(tinfo, info)},
                     dataset=dataset_identity(info))


def recover_settings(cfg: RecoverConfig) -> dict:
    """The settings of ``cfg`` its method reads (its :mod:`unidd_ray.methods` entry's ``unread`` left out), less
    the performance settings.  ``distribution`` enters as the ``sync`` it replaced: ``round`` (each worker its own
    batch) for ``independent`` and for one worker, where both compute the same; ``exact`` for an exact recovery
    over several workers (never a key before: the former ``sync: step`` batches were not the authors')."""
    unread = get_method(cfg.method).unread
    settings = {k: v for k, v in to_dict(cfg).items() if k not in unread}
    settings["sync"] = "exact" if settings.pop("distribution") == "exact" and cfg.workers > 1 else "round"
    return key_settings("recover", settings)


def recover_key(cfg: RecoverConfig, info, tinfo, stats: str | None) -> str:
    """A recovery's key; ``stats``: the statistics key for a spectral method, else None."""
    return stage_key("recover", recover_settings(cfg), teacher=teacher_identity(tinfo, info), stats=stats,
                     dataset=dataset_identity(info))


def data_parallel_input(cfg: EvaluateConfig) -> dict:
    """The evaluation's worker count where it changes the result: with ``split: data`` it shards every batch
    (and each worker's BatchNorm sees its shard only); with ``split: seeds`` it is a performance setting."""
    return {"data_parallel_workers": cfg.workers} if cfg.split == "data" and cfg.workers > 1 else {}


def evaluate_settings(cfg: EvaluateConfig) -> dict:
    """What an evaluation's students depend on among its settings (those of its key)."""
    return {**key_settings("evaluate", to_dict(cfg)), **data_parallel_input(cfg)}


def evaluate_key(cfg: EvaluateConfig, info, tinfo, distilled: str) -> str:
    """An evaluation's key: its settings but the seed count, the teacher, the dataset and the distilled set's
    images (``distilled``: :func:`distilled_identity`)."""
    return stage_key("evaluate", evaluate_settings(cfg), teacher=teacher_identity(tinfo, info),
                     distilled=distilled, dataset=dataset_identity(info))


# ----------------------------------------------------------------------------- what a resumed stage must match
def training_identity(squeeze_cfg: SqueezeConfig, model_cfg: ModelConfig, info, resolution: int,
                      weights_sha256: str | None) -> dict:
    """What a teacher's training depends on: the squeeze settings of its key, the model, its starting weights'
    sha256, its normalisation (unless ``dataset``), the side and the dataset."""
    normalization = teacher_settings(model_cfg).get("normalization")
    return {"squeeze": key_settings("squeeze", to_dict(squeeze_cfg)),
            "teacher": {"arch": model_cfg.arch, "options": dict(model_cfg.options), "weights": weights_sha256,
                        **({} if normalization is None else {"normalization": normalization})},
            "resolution": resolution, "dataset": dataset_identity(info)}


def recovery_identity(cfg: RecoverConfig, info, tinfo, stats_sha256: str | None) -> dict:
    """What the recovered images depend on besides the plan: the settings of the recovery's key, the teacher's
    sha256 (and normalisation, :func:`teacher_identity`), the statistics' sha256 (spectral methods) and the
    dataset."""
    return {"recover": recover_settings(cfg), "teacher": teacher_identity(tinfo, info), "statistics": stats_sha256,
            "dataset": dataset_identity(info)}


def seed_key(cfg: EvaluateConfig, distilled: str, teacher_sha256, dataset: dict,
             soft_labels: str | None) -> str:
    """What a stored per-seed result of an evaluation must match to be reused: the settings its students
    depend on (so a re-run with other performance settings or another seed count keeps the finished seeds), the
    distilled images, the teacher (``teacher_sha256``: :func:`teacher_identity`), the dataset and the stored soft
    labels (by content; None: online or hard)."""
    return sha256_json({"evaluate": evaluate_settings(cfg), "distilled": distilled, "teacher": teacher_sha256,
                        "dataset": dataset, "soft_labels": soft_labels})


def check_resumable(recorded: dict | None, current: dict, *, what: str, fix: str) -> None:
    """Refuse to continue ``what`` unless the identity it ``recorded`` when it started is ``current``, naming
    the settings and inputs that differ and the ``fix``."""
    if not recorded:
        raise ValueError(f"cannot resume {what}: it records no settings and inputs (an earlier unidd_ray started "
                         f"it), so its work may belong to another run; {fix}")
    differ = differences(recorded, current)
    if differ:
        raise ValueError(f"cannot resume {what}: it was started with other settings or inputs ({'; '.join(differ)}); "
                         f"{fix}")
