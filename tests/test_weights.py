"""Bringing a model from another codebase: `model.weights` in the layouts people publish (nested
under a checkpoint key, DDP / torch.compile prefixes, safetensors), strict failures that say what
the file holds, factories without num_classes, and factories named by a `.py` file's path."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, require, tiny_run_args
from safetensors.torch import save_file
from torch import nn

from qatdist import config
from qatdist.config import ConfigError, DataConfig, ModelConfig
from qatdist.config.factories import load_factory
from qatdist.data import transforms
from qatdist.models import build_fp32, build_model
from qatdist.models.weights import load_weights
from qatdist.run import report

SHARED_MODEL = ROOT.parent / "shared" / "models" / "resnet20_cifar10"


class Net(nn.Module):
    """Conv-BN (buffers, num_batches_tracked) and a head of `width` outputs."""

    def __init__(self, width: int = 10, blocks: int = 1):
        super().__init__()
        self.features = nn.Sequential(
            *(
                nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3))
                for _ in range(blocks)
            )
        )
        self.fc = nn.Linear(3, width)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


def trained(seed: int = 1, **kw) -> Net:
    """A Net whose every entry differs from a fresh one's (BatchNorm statistics included)."""
    torch.manual_seed(seed)
    net = Net(**kw)
    net(torch.randn(4, 3, 8, 8))  # train mode: running statistics move
    return net


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


# --- the layouts people publish ----------------------------------------------------------------


def wrapped_state(net: Net, prefix: str | None) -> dict:
    """The state dict as the wrapper saves it: DataParallel (same names as DDP, no process
    group needed) adds `module.`, torch.compile `_orig_mod.` (nothing is compiled here)."""
    if prefix == "module.":
        return nn.DataParallel(net).state_dict()
    if prefix == "_orig_mod.":
        return torch.compile(net).state_dict()
    if prefix == "_orig_mod.module.":
        return torch.compile(nn.DataParallel(net)).state_dict()
    return net.state_dict()


@pytest.mark.parametrize("prefix", [None, "module.", "_orig_mod.", "_orig_mod.module."])
@pytest.mark.parametrize("nesting_key", [None, "state_dict", "model", "model_state_dict", "ema"])
def test_published_layouts_load_and_say_how(tmp_path, nesting_key, prefix):
    source_net = trained()
    state = wrapped_state(source_net, prefix)
    if prefix:
        assert all(name.startswith(prefix) for name in state)
    content = {nesting_key: state, "epoch": 7, "best_acc1": 0.9} if nesting_key else state
    path = tmp_path / "weights.pt"
    torch.save(content, path)
    net = Net()
    source = load_weights(net, str(path))
    assert_same_state(net, source_net)
    assert source.nesting_key == nesting_key
    assert source.prefix_stripped == prefix
    assert source.file == str(path.resolve())
    assert source.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_nested_state_dict_is_chosen_over_another_one(tmp_path):
    """A checkpoint with the model and an optimizer state: the model's entries are read."""
    source_net = trained()
    optimizer = torch.optim.SGD(source_net.parameters(), lr=0.1, momentum=0.9)
    path = tmp_path / "ckpt.pt"
    torch.save({"optimizer": optimizer.state_dict(), "model": source_net.state_dict()}, path)
    net = Net()
    assert load_weights(net, str(path)).nesting_key == "model"
    assert_same_state(net, source_net)


def test_safetensors_file_loads(tmp_path):
    source_net = trained()
    path = tmp_path / "weights.safetensors"
    save_file(nn.DataParallel(source_net).state_dict(), str(path))
    net = Net()
    source = load_weights(net, str(path))
    assert_same_state(net, source_net)
    assert (source.nesting_key, source.prefix_stripped) == (None, "module.")


def test_the_load_is_logged_in_one_line(tmp_path, caplog):
    path = tmp_path / "w.pt"
    torch.save({"state_dict": nn.DataParallel(trained()).state_dict()}, path)
    with caplog.at_level("INFO", logger="qatdist"):
        load_weights(Net(), str(path))
    (line,) = [r.getMessage() for r in caplog.records if r.name == "qatdist.models.weights"]
    assert str(path.resolve()) in line
    assert "under 'state_dict'" in line and "prefix 'module.' stripped" in line


# --- strict failures ---------------------------------------------------------------------------


def test_a_state_dict_of_another_model_lists_top_level_keys_and_a_few_names(tmp_path):
    path = tmp_path / "other.th"
    other = Net(width=10, blocks=12).state_dict()  # 12 blocks: 84 entries the model lacks
    torch.save(
        {"best_prec1": 91.7, "state_dict": {f"module.{k}": v for k, v in other.items()}}, path
    )
    with pytest.raises(ConfigError) as err:
        load_weights(Net(width=10, blocks=1), str(path))
    message = str(err.value)
    assert message.startswith(f"model.weights: {path} does not fit")
    assert "top-level keys (2): best_prec1, state_dict" in message
    assert "under 'state_dict' with prefix 'module.' stripped" in message
    assert "77 unexpected (features.1.0.weight, " in message
    assert "features.11.1.running_var" not in message  # the first few names, not every key
    assert len(message) < 1000


def test_wrong_shapes_and_missing_entries_are_named(tmp_path):
    path = tmp_path / "w.pt"
    state = trained(width=5).state_dict()
    del state["features.0.1.running_mean"]
    torch.save(state, path)
    with pytest.raises(ConfigError) as err:
        load_weights(Net(width=10), str(path))
    message = str(err.value)
    assert "1 missing (features.0.1.running_mean)" in message
    assert "2 of another shape (fc.weight (file (5, 3), model (10, 3)), fc.bias" in message


def test_a_file_without_a_state_dict_is_refused(tmp_path):
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ConfigError, match="^model.weights: .*holds a list, not a state dict"):
        load_weights(Net(), str(tmp_path / "list.pt"))
    torch.save({"epoch": 3, "note": "no tensors"}, tmp_path / "meta.pt")
    with pytest.raises(ConfigError, match=r"holds no state dict .*top-level keys \(2\): epoch"):
        load_weights(Net(), str(tmp_path / "meta.pt"))
    torch.save(nn.Linear(2, 2), tmp_path / "module.pt")  # a whole pickled model
    with pytest.raises(ConfigError, match=r"^model.weights: .*a whole model\?\); save `model"):
        load_weights(Net(), str(tmp_path / "module.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match="^model.weights: cannot read .*junk.pt"):
        load_weights(Net(), str(tmp_path / "junk.pt"))


def test_weights_source_is_a_registered_report_key(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(trained().state_dict(), path)
    source = load_weights(Net(), str(path))
    fields = report.report_fields(weights_source=dataclasses.asdict(source))
    assert fields["weights_source"]["nesting_key"] is None
    assert report.report_fields(weights_source=None) == {"weights_source": None}
    assert "`weights_source`" in report.keys_markdown()
    assert f"sha256 `{source.sha256}`" in report.markdown(fields | {"latency": []})


# --- factories ---------------------------------------------------------------------------------

FACTORIES = """
import torch
from torch import nn


def no_num_classes():
    layers = [nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(1)]
    return nn.Sequential(*layers, nn.Linear(4, 10))


def with_num_classes(num_classes):
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(3, num_classes))


def broken():
    return nn.Linear(3, 4, bais=True)


def two_outputs():
    return TwoOutputs()


class TwoOutputs(nn.Module):
    def forward(self, x):
        return x, x


def transform_factory(cfg):
    def transform(img, rng):
        return torch.full((3, cfg.image_size, cfg.image_size), 0.5).numpy()

    return transform
"""
BROKEN_LINE = FACTORIES.splitlines().index("    return nn.Linear(3, 4, bais=True)") + 1


@pytest.fixture()
def factory_file(tmp_path, monkeypatch) -> str:
    """A user's own module, outside sys.path, named relative to the working directory."""
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "models.py").write_text(FACTORIES)
    monkeypatch.chdir(tmp_path)
    return "theirs/models.py"


def test_factory_without_num_classes_is_called_without_it(factory_file):
    model = build_model(
        ModelConfig(name=f"{factory_file}:no_num_classes"), num_classes=10, image_size=16
    )
    # The width check ran in eval mode on a zero image: each module's mode and the BatchNorm
    # statistics are as the factory left them.
    assert all(module.training for module in model.modules())
    assert torch.equal(model[1].running_mean, torch.zeros(4))
    assert model[1].num_batches_tracked == 0
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_width_check_leaves_the_rng_alone(factory_file):
    """The check draws no random number: a seeded build has the factory's own weights, and the
    RNG goes on as after the factory alone (every rank's initial weights stay identical)."""
    spec = f"{factory_file}:with_num_classes"
    torch.manual_seed(3)
    built = build_model(ModelConfig(name=spec), 10, image_size=8)
    after_build = torch.rand(1)
    torch.manual_seed(3)
    direct = load_factory(spec, "model.name")(num_classes=10)
    assert_same_state(built, direct)
    assert torch.equal(torch.rand(1), after_build)


def test_factory_width_must_match_data_num_classes(factory_file):
    with pytest.raises(ConfigError) as err:
        build_model(ModelConfig(name=f"{factory_file}:no_num_classes"), 7, image_size=16)
    message = str(err.value)
    assert message.startswith("model.name: factory 'theirs/models.py:no_num_classes'")
    assert "without num_classes" in message and "10 outputs" in message
    assert "data.num_classes is 7" in message


def test_factory_errors_are_config_errors_naming_key_and_factory(factory_file):
    with pytest.raises(ConfigError) as err:
        build_model(ModelConfig(name=f"{factory_file}:broken"), 4, image_size=16)
    assert str(err.value).startswith(
        "model.name: factory 'theirs/models.py:broken' raised TypeError"
    )
    assert f"(at models.py:{BROKEN_LINE})" in str(err.value)  # where the user's code failed
    with pytest.raises(ConfigError, match="^model.name: .*two_outputs.* returns tuple"):
        build_model(ModelConfig(name=f"{factory_file}:two_outputs"), 4, image_size=16)
    with pytest.raises(ConfigError, match="^model.name: cannot load factory .*no_such_function"):
        build_model(ModelConfig(name=f"{factory_file}:no_such_function"), 4, image_size=16)
    with pytest.raises(ConfigError, match="^model.name: factory file not found: missing.py"):
        build_model(ModelConfig(name="missing.py:net"), 4, image_size=16)
    with pytest.raises(ConfigError, match="named by its path: 'path/to/resnet.py:resnet20'"):
        build_model(ModelConfig(name="resnet:resnet20"), 4, image_size=16)


def test_a_file_is_loaded_once_per_process_by_absolute_path(factory_file, tmp_path):
    relative = load_factory(f"{factory_file}:no_num_classes", "model.name")
    absolute = load_factory(f"{tmp_path / factory_file}:no_num_classes", "model.name")
    assert relative is absolute
    assert sys.modules[relative.__module__].__file__ == str(tmp_path / factory_file)


def test_py_form_for_data_transform(factory_file):
    cfg = DataConfig(image_size=8, transform=f"{factory_file}:transform_factory")
    transforms.check_transform(cfg)  # builds it and runs it on a probe image


@pytest.mark.parametrize("key", ["model.name", "data.transform"])
def test_config_checks_need_the_py_file(tmp_path, monkeypatch, key):
    for name in ("train-0.tar", "val-0.tar"):
        (tmp_path / name).write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    section, field = key.split(".")
    values = {"data": {"train_shards": "train-*.tar", "val_shards": "val-*.tar"}}
    values.setdefault(section, {})[field] = "lib/models.py:build"
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    with pytest.raises(ConfigError, match=f"^{key}: expected an existing .py file"):
        config.load(str(empty), values)
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "models.py").write_text("")
    assert config.load(str(empty), values)  # the form and the file: the rest waits for the run
    values[section][field] = "lib/models.py:"
    with pytest.raises(ConfigError, match=f"^{key}: expected 'package.module:function' or"):
        config.load(str(empty), values)


def test_train_exits_2_when_the_factory_raises(tiny_shards, tmp_path, factory_file):
    """A factory error surfaces after the config checks (in the trainer): still exit code 2 and
    a message naming model.name and the factory, not a traceback."""
    args = tiny_run_args(tiny_shards, tmp_path / "run", f"--model.name={factory_file}:broken")
    result = subprocess.run(
        [sys.executable, "-m", "qatdist.train", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "config error: model.name: factory 'theirs/models.py:broken' raised" in result.stderr
    assert "Traceback" not in result.stderr


# --- the public CIFAR-10 ResNet-20, from its own codebase ----------------------------------------


def test_public_resnet20_loads_as_its_own_code_loads_it():
    require(SHARED_MODEL.is_dir(), f"{SHARED_MODEL} is not on this machine")
    weights = SHARED_MODEL / "resnet20-12fca82f.th"
    cfg = ModelConfig(name=f"{SHARED_MODEL / 'resnet.py'}:resnet20", weights=str(weights))
    model, source = build_fp32(cfg, num_classes=10, image_size=32)
    assert (source.nesting_key, source.prefix_stripped) == ("state_dict", "module.")

    # The eager load its README describes: the DDP-saved state dict, prefix removed by hand.
    spec = importlib.util.spec_from_file_location("resnet20_reference", SHARED_MODEL / "resnet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    reference = module.resnet20()
    saved = torch.load(weights, map_location="cpu", weights_only=True)["state_dict"]
    reference.load_state_dict({k.removeprefix("module."): v for k, v in saved.items()})

    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.eval()(images), reference.eval()(images))
