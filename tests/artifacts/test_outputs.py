"""Output paths: a command writes only into a new or empty directory or over an earlier output of its own kind,
and refuses anything else before any work, naming the path and the fix.  Nothing of the user's is touched."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from unidd_ray.artifacts.files import OutputError, atomic_directory, check_output, output_kind, replace_directory


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _user_folder(path: Path) -> Path:
    (path / "src").mkdir(parents=True)
    (path / "src" / "main.py").write_text("print('mine')\n")
    (path / "README").write_text("my project\n")
    (path / "thesis.txt").write_text("chapter 1\n")
    return path


# ----------------------------------------------------------------------------- the rule
@pytest.mark.parametrize("kind", ["teacher", "stats", "distilled", "soft_labels", "evaluation", "tune", "run"])
def test_only_new_empty_or_same_kind_outputs_are_accepted(tmp_path, kind):
    check_output(tmp_path / "new", kind)
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty", kind)
    user = _user_folder(tmp_path / "user")
    with pytest.raises(OutputError, match=r"user holds files unidd-ray did not write \(README, src, thesis.txt\).*"
                                          r"give --out a new or empty directory"):
        check_output(user, kind)
    (tmp_path / "file").write_text("mine")
    with pytest.raises(OutputError, match="file exists and is not a directory"):
        check_output(tmp_path / "file", kind)


def _teacher_output(path: Path) -> Path:
    path.mkdir()
    (path / "teacher.json").write_text(json.dumps({"arch": "convnet"}))
    (path / "teacher.pt").write_bytes(b"weights")
    return path


def test_an_output_of_the_same_kind_is_replaced_but_not_one_with_foreign_files(tmp_path):
    teacher = _teacher_output(tmp_path / "teacher")
    assert output_kind(teacher) == "teacher"
    check_output(teacher, "teacher")
    with pytest.raises(OutputError, match="holds a teacher output, not a stats output"):
        check_output(teacher, "stats")
    (teacher / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"holds a teacher output and files it is not made of \(notes.txt\)"):
        check_output(teacher, "teacher")


def test_replacing_refuses_a_directory_that_became_someone_elses(tmp_path):
    """The check is made again at the moment of the replacement, not only before the work."""
    final = tmp_path / "out"
    with pytest.raises(OutputError, match="files unidd-ray did not write"):
        with atomic_directory(final, "stats") as staging:
            (staging / "stats.parquet").write_bytes(b"x")
            _user_folder(final)  # the user puts a project there while the stage runs
    assert _tree(final) == {"README": b"my project\n", "src/main.py": b"print('mine')\n", "thesis.txt": b"chapter 1\n"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the staging directory is gone
    src = tmp_path / "src"
    src.mkdir()
    with pytest.raises(OutputError):
        replace_directory(src, final, "distilled")
    assert (final / "thesis.txt").is_file() and src.is_dir()


def test_a_run_directory_of_an_earlier_version_is_recognised(tmp_path):
    run = tmp_path / "run"
    for name in ("data-0123456789ab", "teacher-ff156f617b69", "cfm-ipc10-abcdefabcdef", "eval-cfm-ipc10-abcdefabcdef",
                 ".teacher-ff156f617b69.ray", "tune-cfm_beta_alpha"):
        (run / name).mkdir(parents=True)
    (run / "config.yaml").write_text("name: x\n")
    assert output_kind(run) == "run"
    check_output(run, "run")
    (run / "thesis.txt").write_text("mine")
    with pytest.raises(OutputError):
        check_output(run, "run")
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "config.yaml").write_text("my recipe\n")  # a user's folder holding only a recipe: not a run
    with pytest.raises(OutputError):
        check_output(lone, "run")


# ----------------------------------------------------------------------------- the commands
def _stage_args(digits_data, digits_teacher, digits_stats) -> dict[str, list[str]]:
    common = ["--recipe", "digits"]
    return {
        "squeeze": ["squeeze", *common, "--data", str(digits_data)],
        "stats": ["stats", *common, "--data", str(digits_data), "--teacher", str(digits_teacher)],
        "recover": ["recover", *common, "--data", str(digits_data), "--teacher", str(digits_teacher), "--stats",
                    str(digits_stats), "--ipc", "1"],
    }


@pytest.mark.parametrize("command", ["squeeze", "stats", "recover"])
def test_stage_commands_refuse_a_users_folder_before_any_work(command, tmp_path, digits_data, digits_teacher,
                                                              digits_stats, no_ray, capsys):
    from unidd_ray.cli import main

    args = _stage_args(digits_data, digits_teacher, digits_stats)[command]
    folder = _user_folder(tmp_path / "mine")
    before = _tree(folder)
    assert main([*args, "--out", str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{folder} holds files unidd-ray did not write" in err[0], err
    (tmp_path / "file").write_text("mine")
    assert main([*args, "--out", str(tmp_path / "file")]) == 2
    assert "file exists and is not a directory" in capsys.readouterr().err
    assert _tree(folder) == before and (tmp_path / "file").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "mine"]  # no staging, checkpoints or lock left


def test_recover_out_dot_in_a_project_folder_deletes_nothing(tmp_path, digits_data, digits_teacher, digits_stats,
                                                            no_ray, monkeypatch, capsys):
    from unidd_ray.cli import main

    project = _user_folder(tmp_path / "project")
    before = _tree(project)
    monkeypatch.chdir(project)
    args = _stage_args(digits_data, digits_teacher, digits_stats)["recover"]
    assert main([*args, "--out", "."]) == 2
    assert "holds files unidd-ray did not write" in capsys.readouterr().err
    assert _tree(project) == before and sorted(p.name for p in tmp_path.iterdir()) == ["project"]


def test_recover_neither_resumes_nor_removes_someone_elses_partial_folder(tmp_path, digits_data, digits_teacher,
                                                                         digits_stats, no_ray, capsys):
    from unidd_ray.cli import main

    partial = _user_folder(tmp_path / "out.partial")
    before = _tree(partial)
    args = _stage_args(digits_data, digits_teacher, digits_stats)["recover"]
    assert main([*args, "--out", str(tmp_path / "out"), "--resume"]) == 2
    assert "out.partial holds files unidd-ray did not write" in capsys.readouterr().err
    assert _tree(partial) == before


def test_evaluate_relabel_tune_and_pipeline_refuse_a_users_folder(tmp_path, digits_data, digits_teacher, no_ray,
                                                                  capsys):
    from unidd_ray.cli import main

    folder = _user_folder(tmp_path / "mine")
    before = _tree(folder)
    distilled = tmp_path / "set"  # need not exist: the output is checked first
    for args in (["evaluate", "--recipe", "digits", "--distilled", str(distilled), "--teacher", str(digits_teacher),
                  "--data", str(digits_data), "--out", str(folder)],
                 ["relabel", "--recipe", "digits", "--distilled", str(distilled), "--teacher", str(digits_teacher),
                  "--out", str(folder)],
                 ["tune", "--recipe", "digits", "--space", "tune_spaces/cfm_beta_alpha.yaml", "--set",
                  f"out={tmp_path / 'run'}", "--out", str(folder)],
                 ["pipeline", "--recipe", "digits", "--set", f"out={folder}"]):
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "holds files unidd-ray did not write" in err[0], (args, err)
    assert _tree(folder) == before and not (tmp_path / "run").exists()


def test_prepare_refuses_a_users_folder_before_reading_the_source(tmp_path, capsys, monkeypatch):
    from unidd_ray import cli
    from unidd_ray.data import sources

    def no_read(*args, **kwargs):
        raise AssertionError("the source was read")

    monkeypatch.setattr(sources, "load_source", no_read)
    folder = _user_folder(tmp_path / "mine")
    assert cli.main(["prepare", "--dataset", "digits", "--out", str(folder)]) == 2
    assert "is not a prepared dataset" in capsys.readouterr().err
    assert (folder / "thesis.txt").read_text() == "chapter 1\n" and os.listdir(tmp_path) == ["mine"]
