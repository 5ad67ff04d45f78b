"""Flagfiles by name (mlcrl_tf.flagfiles): shipped configs, includes, errors."""

import configparser
import fnmatch
import os
import subprocess
import sys

from absl import flags
import pytest

from mlcrl_tf.training import flagfiles
from mlcrl_tf.training import train_flags

from conftest import REPO

SHIPPED = ("ablation.flags", "base.flags", "coco.flags", "coco_keras_hub.flags", "demo.flags",
           "voc.flags")


def _config(argv):
    """Expands `argv`, parses it into fresh training flags, returns the Config."""
    values = flags.FlagValues()
    train_flags.define_flags(values)
    values(flagfiles.expand(["train"] + argv))
    return train_flags.config_from_flags(values)


def _write(path, *lines):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


def _assert_coco_recipe(config):
    assert config.train_files == "data/coco/train2014-*.tfrecord"  # not rewritten
    assert config.eval_files == "data/coco/val2014-*.tfrecord"
    assert (config.num_classes, config.batch_size, config.epochs) == (80, 32, 40)
    assert config.lr_decay_epochs == (30,)
    assert (config.backbone, config.backbone_weights, config.image_size) == (
        "resnet101", "imagenet", 448)
    assert (config.learning_rate, config.backbone_learning_rate) == (0.01, 0.001)
    assert (config.momentum, config.weight_decay, config.crl_margin) == (0.9, 1e-4, 0.5)


def test_shipped_configs_are_in_the_package():
    assert tuple(flagfiles.shipped_names()) == SHIPPED
    assert os.path.realpath(os.path.join(REPO, "configs")) == os.path.realpath(
        flagfiles.CONFIGS_DIR)
    # setup.cfg ships every one of them (package_data glob).
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, "setup.cfg"))
    patterns = cfg["options.package_data"]["mlcrl_tf"].split()
    for name in SHIPPED:
        assert any(fnmatch.fnmatch(f"configs/{name}", p) for p in patterns), name


def test_coco_by_name_from_an_empty_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _assert_coco_recipe(_config(["--flagfile=coco.flags", "--model_dir=x"]))
    # The old spelling works from anywhere too, and from the repository root.
    _assert_coco_recipe(_config(["--flagfile=configs/coco.flags", "--model_dir=x"]))
    monkeypatch.chdir(REPO)
    _assert_coco_recipe(_config(["--flagfile=configs/coco.flags", "--model_dir=x"]))


def test_train_cli_from_an_empty_directory(tmp_path):
    """`python -m mlcrl_tf.train --flagfile=coco.flags` parses from anywhere."""
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(
        [sys.executable, "-m", "mlcrl_tf.train", "--flagfile=coco.flags",
         "--only_check_args"], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_later_flags_override_and_includes_expand_in_place(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = flagfiles.expand(["train", "--batch_size=1", "--flagfile=voc.flags",
                             "--batch_size=2"])
    assert argv[:2] == ["train", "--batch_size=1"] and argv[-1] == "--batch_size=2"
    base = argv.index("--backbone=resnet101")
    assert base < argv.index("--model_dir=runs/voc2007_crl")  # base.flags first
    assert not any("flagfile" in a for a in argv)
    assert _config(["--flagfile=voc.flags", "--batch_size=2"]).batch_size == 2


def test_nested_includes_resolve_next_to_the_including_file(tmp_path, monkeypatch):
    _write(tmp_path / "proj" / "top.flags", "# top", "--flagfile=inc/mid.flags",
           "--batch_size=3")
    _write(tmp_path / "proj" / "inc" / "mid.flags", "--flagfile=leaf.flags",
           "// a comment", "", "--epochs=7")
    _write(tmp_path / "proj" / "inc" / "leaf.flags", "--epochs=5", "  --image_size=64  ")
    # A same-named file in the working directory loses to the one beside the includer.
    _write(tmp_path / "cwd" / "inc" / "mid.flags", "--epochs=99")
    _write(tmp_path / "cwd" / "extra.flags", "--seed=4")
    monkeypatch.chdir(tmp_path / "cwd")
    argv = flagfiles.expand(["p", "--flagfile=../proj/top.flags", "--flagfile", "extra.flags"])
    assert argv == ["p", "--epochs=5", "--image_size=64", "--epochs=7", "--batch_size=3",
                    "--seed=4"]
    # Not beside the includer: the working directory, then the shipped configs.
    _write(tmp_path / "proj" / "b.flags", "--flagfile=extra.flags", "--flagfile=base.flags")
    argv = flagfiles.expand(["p", f"--flagfile={tmp_path / 'proj' / 'b.flags'}"])
    assert argv[1] == "--seed=4" and "--backbone=resnet101" in argv
    # A file in the working directory wins over a shipped one of the same name.
    _write(tmp_path / "cwd" / "coco.flags", "--epochs=1")
    assert flagfiles.expand(["p", "--flagfile=coco.flags"]) == ["p", "--epochs=1"]
    # Arguments after `--` are not flags.
    assert flagfiles.expand(["p", "--", "--flagfile=nope"]) == ["p", "--", "--flagfile=nope"]


def test_a_user_flagfile_includes_ours_by_name(tmp_path, monkeypatch):
    mine = _write(tmp_path / "me" / "my.flags", "--flagfile=coco.flags",
                  "--model_dir=runs/mine", "--batch_size=8", "--variant=baseline")
    monkeypatch.chdir(tmp_path)
    config = _config([f"--flagfile={mine}"])
    assert (config.model_dir, config.batch_size, config.variant) == ("runs/mine", 8,
                                                                     "baseline")
    assert (config.num_classes, config.epochs, config.learning_rate) == (80, 40, 0.01)


def test_a_file_included_twice_is_not_a_cycle(tmp_path):
    a = _write(tmp_path / "a.flags", "--flagfile=b.flags", "--flagfile=c.flags")
    _write(tmp_path / "b.flags", "--flagfile=base.flags", "--epochs=2")
    _write(tmp_path / "c.flags", "--flagfile=base.flags", "--epochs=3")
    argv = flagfiles.expand(["p", f"--flagfile={a}"])
    assert argv.count("--backbone=resnet101") == 2 and argv[-1] == "--epochs=3"


def test_a_missing_name_lists_the_shipped_ones(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(flagfiles.FlagfileError) as e:
        flagfiles.expand(["p", "--flagfile=cocoa.flags"])
    message = str(e.value)
    assert "--flagfile=cocoa.flags" in message and "\n" not in message
    assert ("shipped: ablation.flags, base.flags, coco.flags, coco_keras_hub.flags, "
            "demo.flags, voc.flags") in message
    inner = _write(tmp_path / "x.flags", "--flagfile=gone.flags")
    with pytest.raises(flagfiles.FlagfileError, match=r"gone\.flags \(included from .*x\.flags"):
        flagfiles.expand(["p", f"--flagfile={inner}"])
    with pytest.raises(flagfiles.FlagfileError, match="needs a file name"):
        flagfiles.expand(["p", "--flagfile"])
    # As the CLIs' flags parser: one line on stderr, exit status 1, no traceback.
    with pytest.raises(SystemExit) as exit_info:
        flagfiles.parse_flags_with_usage(["p", "--flagfile=cocoa.flags"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("FATAL Flags parsing error: --flagfile=cocoa.flags")
    assert err.count("\n") == 1 and "Traceback" not in err


def test_include_cycles_are_an_error(tmp_path):
    selfish = _write(tmp_path / "self.flags", "--epochs=1", "--flagfile=self.flags")
    with pytest.raises(flagfiles.FlagfileError, match="include cycle"):
        flagfiles.expand(["p", f"--flagfile={selfish}"])
    a = _write(tmp_path / "a.flags", "--flagfile=b.flags")
    _write(tmp_path / "b.flags", "--flagfile=a.flags")
    with pytest.raises(flagfiles.FlagfileError,
                       match=r"include cycle: .*a\.flags -> .*b\.flags -> .*a\.flags"):
        flagfiles.expand(["p", f"--flagfile={a}"])


def test_coco_keras_hub_is_the_coco_recipe_with_a_keras_hub_backbone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = flagfiles.expand(["train", "--flagfile=coco_keras_hub.flags"])
    coco = flagfiles.expand(["train", "--flagfile=coco.flags"])
    assert argv[:len(coco)] == coco  # coco.flags (with base.flags) first
    assert argv[len(coco):] == ["--backbone=keras_hub:resnet_101_imagenet",
                                "--backbone_weights=imagenet",
                                "--model_dir=runs/coco_crl_keras_hub",
                                "--export_dir=saved_models/coco_crl_keras_hub"]
