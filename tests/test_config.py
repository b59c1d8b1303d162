"""Config loading: precedence, strictness, validation, round trip, and every shipped config."""

import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from qatdist import config
from qatdist.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return str(path)


@pytest.fixture
def shards(tmp_path):
    """Two empty files that stand for shards (validation only checks that patterns match)."""
    for name in ("train-000000.tar", "val-000000.tar"):
        (tmp_path / name).write_bytes(b"")
    return {"train_shards": f"{tmp_path}/train-*.tar", "val_shards": f"{tmp_path}/val-*.tar"}


def test_precedence_cli_over_file_over_defaults(tmp_path, shards):
    path = write(tmp_path, "[train]\nlr = 0.2\nbatch_size = 8\n")
    cfg = config.load(path, {"data": shards, "train": {"lr": 0.3}})
    assert cfg.train.lr == 0.3  # CLI
    assert cfg.train.batch_size == 8  # file
    assert cfg.train.epochs == config.TrainConfig().epochs  # default


def test_cli_values_follow_the_key_type(tmp_path, shards):
    path, overrides = config.parse_overrides(
        [
            "--config",
            "x.toml",
            "--train.lr=0.5",
            "--model.name",
            "resnet50",
            "--quant.fp32_module_names=['conv1','fc']",
            "--data.allow_pipe=true",
            "--runtime.cores=0",
        ]
    )
    assert path == "x.toml"
    overrides["data"].update(shards)
    cfg = config.load(write(tmp_path, ""), overrides)
    assert cfg.train.lr == 0.5
    assert cfg.model.name == "resnet50"
    assert cfg.quant.fp32_module_names == ["conv1", "fc"]
    assert cfg.data.allow_pipe is True
    assert cfg.runtime.cores == "0"  # a string key keeps the typed text


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"train": {"batch_sise": 4}}, "unknown config key train.batch_sise"),
        ({"trian": {"lr": 0.1}}, "unknown config section [trian]"),
        ({"train": {"batch_size": 0}}, "train.batch_size"),
        ({"train": {"batch_size": "8"}}, "train.batch_size: expected int"),
        ({"train": {"lr": -0.1}}, "train.lr"),
        ({"train": {"lr": True}}, "train.lr: expected float"),
        ({"data": {"on_error": "ignore"}}, "data.on_error"),
        ({"runtime": {"pinning": "yes"}}, "runtime.pinning"),
        ({"runtime": {"grad_compression": "int8"}}, "runtime.grad_compression"),
        ({"runtime": {"latency_batch_sizes": [1, 64]}}, "runtime.latency_batch_sizes"),
        ({"optim": {"name": "lamb"}}, "optim.name"),
        (
            {"task": {"name": "detection"}},
            "task.name: expected a built-in task (classification, segmentation)",
        ),
        ({"task": {"name": "/nonexistent/task.py:build"}}, "task.name: expected an existing .py"),
        ({"task": {"name": "mytasks:"}}, "task.name: expected 'package.module:function'"),
        ({"quant": {"fp32_module_names": "fc"}}, "quant.fp32_module_names"),
        ({"data": {"train_shards": "/nonexistent/shard-{0..3}.tar"}}, "data.train_shards"),
        ({"data": {"train_shards": "pipe:curl x"}}, "data.train_shards"),
        (
            {"train": {"distill_teacher_weights": "/nonexistent/t.pt", "distill_weight": 0.5}},
            "train.distill_teacher_weights: expected an existing weight file",
        ),
        (
            {"train": {"distill_teacher_weights": __file__}},
            "train.distill_teacher_weights: expected to be used with train.distill_weight > 0",
        ),
    ],
)
def test_rejections_name_the_key(tmp_path, shards, overrides, message):
    merged = {"data": dict(shards)}
    for section, values in overrides.items():
        merged.setdefault(section, {}).update(values)
    with pytest.raises(ConfigError) as err:
        config.load(write(tmp_path, ""), merged)
    assert message in str(err.value)


def test_final_openvino_without_openvino_names_the_key_and_the_install(
    tmp_path, shards, monkeypatch
):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "openvino" else real(name)
    )
    merged = {"data": dict(shards), "runtime": {"final_openvino": True}}
    with pytest.raises(ConfigError) as err:
        config.load(write(tmp_path, ""), merged)
    assert "runtime.final_openvino" in str(err.value)
    assert "pip install -e '.[peers]'" in str(err.value)
    merged["runtime"]["final_openvino"] = False
    assert config.load(write(tmp_path, ""), merged).runtime.final_openvino is False


def test_missing_and_invalid_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        config.load(str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(write(tmp_path, "[train\nlr = "))


def test_resolved_toml_round_trips(tmp_path, shards):
    cfg = config.load(write(tmp_path, ""), {"data": shards, "quant": {"fp32_module_names": ["fc"]}})
    again = config.load(write(tmp_path, config.to_toml(cfg)))
    assert again == cfg


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_parses(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative shard paths need not exist where demo data is generated
    text = path.read_text()
    assert text.lstrip().startswith("#"), "each config starts with its launch command"
    cfg = config.from_dict(__import__("tomllib").loads(text))
    assert cfg.data.image_size >= 16


def test_train_rejects_bad_config_before_any_process_group(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "qatdist.train", "--train.batch_size=0"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "train.batch_size" in result.stderr
    assert not (tmp_path / "runs").exists()  # nothing written


def test_help_lists_every_key():
    result = subprocess.run(
        [sys.executable, "-m", "qatdist.train", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0
    for name, values in config.Config().to_dict().items():
        for key in values:
            assert f"--{name}.{key}" in result.stdout


def test_schedule_fractions_become_steps_and_the_resolved_config_holds_steps(shards):
    cfg = config.load(
        None,
        {
            "data": shards,
            "quant": {"bn_freeze_at": 0.75, "observer_freeze_at": 0.9, "fake_quant_start_at": 0},
            "optim": {"warmup_at": 0.05},
        },
    )
    resolved = config.with_schedule_steps(cfg, total_steps=200)
    q, o = resolved.quant, resolved.optim
    assert (q.fake_quant_start_step, q.bn_freeze_step, q.observer_freeze_step) == (0, 150, 180)
    assert o.warmup_steps == 10
    assert (q.bn_freeze_at, q.observer_freeze_at, o.warmup_at) == (-1.0, -1.0, -1.0)
    # the resolved config loads again as it is (what export_final.py rebuilds from)
    reloaded = config.from_dict(tomllib.loads(config.to_toml(resolved)))
    assert reloaded.quant == q and reloaded.optim == o
    # step keys untouched by a fraction stay as given
    assert config.with_schedule_steps(config.load(None, {"data": shards}), 200) == config.load(
        None, {"data": shards}
    )


@pytest.mark.parametrize(
    ("quant", "message"),
    [
        (
            {"observer_freeze_at": 1.5},
            "quant.observer_freeze_at: expected -1 or a number in [0, 1]",
        ),
    ],
)
def test_bad_schedule_fractions_are_refused(shards, quant, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        config.load(None, {"data": shards, "quant": quant})
