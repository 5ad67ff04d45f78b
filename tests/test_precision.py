"""Tests for native bfloat16 detection and the oneDNN default: faked
/proc/cpuinfo flags and GPU compute capabilities, the one-line warning of
`--precision=mixed_bfloat16` for training (Config warnings) and for export,
and what `python -m mlcrl_tf.train` sets before TensorFlow loads."""

import logging
import os
import subprocess
import sys

import pytest

from mlcrl_tf.modeling import hardware
from mlcrl_tf.modeling import precision as precision_lib
from mlcrl_tf.run_dir import config as config_lib
from mlcrl_tf.serving import export_lib
from mlcrl_tf.training import onednn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AVX2_EPYC = "fpu vme sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 sha_ni vaes"
XEON_AMX = AVX2_EPYC + " avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8"
AVX512_BF16_ONLY = AVX2_EPYC + " avx512f avx512_bf16"


def _cpuinfo(path, flags, name="AMD EPYC", key="flags"):
    path.write_text("".join(
        f"processor\t: {i}\nvendor_id\t: x\nmodel name\t: {name}\n{key}\t\t: {flags}\n\n"
        for i in range(2)))
    return str(path)


@pytest.fixture()
def fake_cpu(tmp_path, monkeypatch):
    """Points hardware.CPUINFO at a fake file; no GPU is visible."""
    monkeypatch.setattr(precision_lib, "gpu_compute_capabilities", lambda: [])

    def fake(flags, name="AMD EPYC", key="flags"):
        monkeypatch.setattr(hardware, "CPUINFO", _cpuinfo(tmp_path / "cpuinfo", flags, name,
                                                          key))
    return fake


# --------------------------------------------------------------------------
# Native bfloat16
# --------------------------------------------------------------------------

@pytest.mark.parametrize("flags,native", [
    (AVX2_EPYC, False), (XEON_AMX, True), (AVX512_BF16_ONLY, True),
    ("avx2 amx_bf16", True), ("avx2 avx512f avx512_vnni", False)])
def test_native_bfloat16_from_cpu_flags(tmp_path, flags, native):
    flags_read = hardware.cpu_flags(_cpuinfo(tmp_path / "cpuinfo", flags))
    assert "avx2" in flags_read
    assert hardware.cpu_has_native_bfloat16(flags_read) is native


def test_aarch64_features_and_unreadable_cpuinfo(tmp_path):
    arm = hardware.cpu_flags(_cpuinfo(tmp_path / "arm", "fp asimd sve bf16 i8mm",
                                      key="Features"))
    assert hardware.cpu_has_native_bfloat16(arm) is True
    assert hardware.cpu_flags(str(tmp_path / "missing")) is None
    assert hardware.cpu_has_native_bfloat16(None) is None  # unknown: no warning


@pytest.mark.parametrize("capability,native", [((7, 5), False), ((8, 0), True),
                                               ((8, 6), True), ((9, 0), True)])
def test_native_bfloat16_from_gpu_capability(capability, native):
    assert hardware.gpu_has_native_bfloat16(capability) is native


def test_the_problem_names_the_device(fake_cpu, monkeypatch):
    fake_cpu(AVX2_EPYC)
    assert precision_lib.native_bfloat16_problem() == (
        "AMD EPYC (AVX2, no AMX-BF16 nor AVX-512 BF16), a CPU without native bfloat16")
    fake_cpu(XEON_AMX, name="Intel(R) Xeon(R) Platinum 8481C")
    assert precision_lib.native_bfloat16_problem() is None
    # A visible GPU decides, whatever the CPU.
    monkeypatch.setattr(precision_lib, "gpu_compute_capabilities", lambda: [(7, 5)])
    assert "compute capability 7.5" in precision_lib.native_bfloat16_problem()
    fake_cpu(AVX2_EPYC)
    monkeypatch.setattr(precision_lib, "gpu_compute_capabilities", lambda: [(8, 0), (8, 6)])
    assert precision_lib.native_bfloat16_problem() is None


# --------------------------------------------------------------------------
# The one-line warnings
# --------------------------------------------------------------------------

def _config(**kwargs):
    return config_lib.Config(model_dir="runs/x", train_files="x-*.tfrecord",
                             backbone="small_cnn", backbone_weights=None, **kwargs)


def test_training_warns_in_one_line_on_a_cpu_without_native_bfloat16(fake_cpu):
    fake_cpu(AVX2_EPYC)
    messages = config_lib.warnings_for(_config(precision="mixed_bfloat16"))
    assert len(messages) == 1 and "\n" not in messages[0]
    assert messages[0].startswith(
        "--precision=mixed_bfloat16 on AMD EPYC (AVX2, no AMX-BF16 nor AVX-512 BF16), a CPU "
        "without native bfloat16: training measured 7-13x slower than float32")
    assert "on an AVX2-only AMD EPYC (ResNet-50, 224 px, batch 8" in messages[0]
    assert "Intel Xeon with AMX-BF16" in messages[0]
    assert config_lib.warnings_for(_config()) == []  # float32: nothing to say
    fake_cpu(XEON_AMX, name="Intel Xeon")
    assert config_lib.warnings_for(_config(precision="mixed_bfloat16")) == []


def test_export_warns_in_one_line_on_a_cpu_without_native_bfloat16(fake_cpu, tmp_path,
                                                                   caplog):
    fake_cpu(AVX2_EPYC)
    caplog.set_level(logging.WARNING)
    # The warning comes before the restore: a directory without a run is enough.
    with pytest.raises(ValueError, match="holds no run.json"):
        export_lib.export_from_model_dir(str(tmp_path), str(tmp_path / "e"),
                                         precision="mixed_bfloat16")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert warnings[0].startswith(
        "--precision=mixed_bfloat16 on AMD EPYC (AVX2, no AMX-BF16 nor AVX-512 BF16), a CPU "
        "without native bfloat16: if it is served here, serving measured 1.04-1.28x slower")
    caplog.clear()
    fake_cpu(XEON_AMX, name="Intel Xeon")
    with pytest.raises(ValueError, match="holds no run.json"):
        export_lib.export_from_model_dir(str(tmp_path), str(tmp_path / "e"),
                                         precision="mixed_bfloat16")
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


# --------------------------------------------------------------------------
# oneDNN: what the training command sets before TensorFlow loads
# --------------------------------------------------------------------------

TRAIN = ["python", "-m", "mlcrl_tf.train"]
AVX2_FLAGS = frozenset(AVX2_EPYC.split())


@pytest.mark.parametrize("orig_argv,module", [
    (["python", "-m", "mlcrl_tf.train", "--x"], "mlcrl_tf.train"),
    (["python", "-X", "dev", "-W", "ignore", "-mmlcrl_tf.train"], "mlcrl_tf.train"),
    (["python", "-u", "-m", "mlcrl_tf.export"], "mlcrl_tf.export"),
    (["python", "script.py", "-m", "mlcrl_tf.train"], None),
    (["python", "-c", "import mlcrl_tf", "-m"], None)])
def test_the_running_module_is_read_from_the_original_argv(orig_argv, module):
    assert onednn.running_module(orig_argv) == module


def _decide(args, environ=None, flags=AVX2_FLAGS, orig=TRAIN):
    environ = {} if environ is None else environ
    value = onednn.set_train_default(orig + args, ["-m"] + args, environ, flags)
    return value, environ.get("TF_ENABLE_ONEDNN_OPTS")


def test_the_train_command_turns_onednn_on_where_tensorflow_leaves_it_off(monkeypatch):
    monkeypatch.setattr(hardware.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(hardware.platform, "system", lambda: "Linux")
    assert _decide([]) == ("1", "1")  # AVX2 only: TensorFlow would leave it off
    assert _decide([], flags=frozenset(XEON_AMX.split())) == (None, None)  # on anyway
    assert _decide(["--onednn=off"]) == ("0", "0")
    assert _decide(["--onednn", "off"]) == ("0", "0")
    assert _decide(["--onednn=on"], flags=frozenset(XEON_AMX.split())) == ("1", "1")
    assert _decide(["--onednn=off", "--onednn=auto"]) == ("1", "1")  # the last one wins
    assert _decide(["--onednn=bogus"]) == ("1", "1")  # absl reports the bad value
    # The user's variable always wins; other commands and programs are left alone.
    assert _decide(["--onednn=on"], {"TF_ENABLE_ONEDNN_OPTS": "0"}) == (None, "0")
    assert _decide([], orig=["python", "-m", "mlcrl_tf.export"]) == (None, None)
    assert onednn.set_train_default(TRAIN, ["script.py"], {}, AVX2_FLAGS) is None
    monkeypatch.setattr(hardware.platform, "system", lambda: "Darwin")
    assert _decide([]) == (None, None)  # TensorFlow's default where we did not measure


def test_a_flagfile_sets_onednn_too(tmp_path):
    inner = tmp_path / "inner.flags"
    inner.write_text("# comment\n--onednn=off\n")
    outer = tmp_path / "outer.flags"
    outer.write_text(f"--flagfile={inner.name}\n--epochs=2\n")
    assert onednn.command_line_setting([f"--flagfile={outer}"]) == "off"
    assert onednn.command_line_setting([f"--flagfile={outer}", "--onednn=on"]) == "on"
    assert onednn.command_line_setting(["--flagfile=missing.flags"]) == "auto"


def test_a_flag_that_could_not_apply_warns_in_one_line(monkeypatch):
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    (message,) = config_lib.warnings_for(_config(onednn="on"))
    assert message.startswith("--onednn=on has no effect here: `python -m mlcrl_tf.train`")
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "1")
    (message,) = config_lib.warnings_for(_config(onednn="off"))
    assert message == ("--onednn=off is overridden by TF_ENABLE_ONEDNN_OPTS=1 in the "
                       "environment (the variable wins; TensorFlow read it when it loaded).")
    assert config_lib.warnings_for(_config(onednn="on")) == []
    assert config_lib.warnings_for(_config(onednn="auto")) == []
    with pytest.raises(ValueError, match="--onednn='maybe' is unknown"):
        config_lib.validate(_config(onednn="maybe"))


BANNER = "oneDNN custom operations are on"


def _helpfull(module, args=(), **env):
    """`python -m module --helpfull` with TensorFlow's INFO lines shown."""
    full = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    full.update(TF_CPP_MIN_LOG_LEVEL="0", **env)
    return subprocess.Popen([sys.executable, "-m", module, *args, "--helpfull"], cwd=REPO,
                            env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


@pytest.mark.skipif(not hardware.is_linux_x86(), reason="the default is for Linux x86-64")
def test_the_train_command_loads_tensorflow_with_the_decided_onednn():
    """TensorFlow's own banner says whether oneDNN was on when it loaded."""
    runs = {"train": _helpfull("mlcrl_tf.train"),
            "train_off": _helpfull("mlcrl_tf.train", ["--onednn=off"]),
            "env_wins": _helpfull("mlcrl_tf.train", ["--onednn=on"],
                                  TF_ENABLE_ONEDNN_OPTS="0")}
    out = {name: proc.communicate(timeout=300) for name, proc in runs.items()}
    for name, (stdout, stderr) in out.items():
        assert "--model_dir" in stdout, (name, stderr[-2000:])
    assert "--onednn: <auto|on|off>" in out["train"][0]
    assert BANNER in out["train"][1]  # on by default for training
    assert BANNER not in out["train_off"][1]
    assert BANNER not in out["env_wins"][1]  # the user's variable wins
