"""Architecture registry, user entry points, and safetensors-only checkpoints."""

from __future__ import annotations

import pickle
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from worker.engine import architectures as A
from worker.engine.errors import ArchitectureError, CheckpointError


@pytest.mark.parametrize(
    ("name", "shape", "kwargs"),
    [
        ("mlp", (64,), {"hidden": [32]}),
        ("mlp", (1, 8, 8), {}),
        ("small_cnn", (1, 8, 8), {"width": 8}),
        ("small_cnn", (1, 28, 28), {}),
        ("lenet5", (1, 8, 8), {}),
        ("lenet5", (3, 32, 32), {}),
        ("resnet18", (3, 32, 32), {"width": 8}),
        ("resnet18", (1, 28, 28), {"width": 4}),
    ],
)
def test_builtins_forward(name, shape, kwargs):
    spec = A.default_spec(name, shape, 7, **kwargs)
    model = A.build(spec).eval()
    out = model(torch.randn(3, *shape))
    assert out.shape == (3, 7)
    assert torch.isfinite(out).all()


def test_resnet18_has_cifar_stem_and_width():
    model = A.build({"name": "resnet18", "kwargs": {"num_classes": 10, "in_channels": 3, "width": 16}})
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    assert model.fc.in_features == 8 * 16
    full = A.build({"name": "resnet18", "kwargs": {"num_classes": 10}})
    assert 11_000_000 < sum(p.numel() for p in full.parameters()) < 11_300_000  # 11.17M as torchvision's


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"name": "vgg99", "kwargs": {}}, "architecture.name: unknown architecture 'vgg99'"),
        ({"name": "mlp", "kwargs": {"num_classes": 3}}, "architecture.kwargs:"),
        ({"name": "mlp", "kwargs": {"num_classes": 3, "in_features": 4, "depth": 9}}, "architecture.kwargs:"),
        ({"name": "mlp", "kwargs": [1]}, "architecture.kwargs: must be an object"),
        ({"kwargs": {}}, "architecture: must be an object"),
        ({"name": "mlp", "kwargs": {}, "extra": 1}, "architecture: unknown field"),
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(ArchitectureError, match=message):
        A.build(spec)


def test_conv_nets_refuse_flat_inputs():
    with pytest.raises(ArchitectureError, match=r"needs \(C, H, W\) inputs"):
        A.default_spec("small_cnn", (64,), 10)


def test_user_architecture_from_entry_point(tmp_path, monkeypatch):
    """A distribution on sys.path that declares an entry point in unlearnd.architectures is found."""
    pkg = tmp_path / "mynets"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent("""
        from torch import nn
        def tiny(num_classes, in_features=4):
            return nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_classes))
    """))
    dist = tmp_path / "mynets-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mynets\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[unlearnd.architectures]\ntiny = mynets:tiny\nbroken = mynets:nope\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "tiny" in A.available()
    model = A.build({"name": "tiny", "kwargs": {"num_classes": 3, "in_features": 5}})
    assert model(torch.randn(2, 5)).shape == (2, 3)
    with pytest.raises(ArchitectureError, match="entry point 'broken' failed to load"):
        A.build({"name": "broken", "kwargs": {}})
    sys.modules.pop("mynets", None)


def test_safetensors_round_trip(tmp_path):
    spec = A.default_spec("small_cnn", (1, 8, 8), 10, width=8)
    model = A.build(spec)
    with torch.no_grad():
        model.fc.weight.add_(1.0)
    A.save_weights(model, tmp_path / "w.safetensors")
    loaded = A.load_model(spec, tmp_path / "w.safetensors")
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    assert not list(tmp_path.glob("*.tmp"))


def test_checkpoint_errors(tmp_path):
    spec = A.default_spec("small_cnn", (1, 8, 8), 10, width=8)
    state = {k: v.clone() for k, v in A.build(spec).state_dict().items()}

    wrong_shape = dict(state, **{"fc.weight": torch.zeros(3, 32)})
    with pytest.raises(CheckpointError, match=r"fc.weight has shape \(3, 32\), expected \(10, 32\)"):
        A.load_weights(A.build(spec), wrong_shape)

    missing = {k: v for k, v in state.items() if k != "fc.bias"}
    with pytest.raises(CheckpointError, match=r"missing \['fc.bias'\]"):
        A.load_weights(A.build(spec), missing)

    nan = dict(state, **{"fc.bias": torch.full((10,), float("nan"))})
    with pytest.raises(CheckpointError, match="fc.bias contains NaN"):
        A.load_weights(A.build(spec), nan)

    # A pickle (what torch.save writes) is never read.
    (tmp_path / "w.pt").write_bytes(pickle.dumps(state))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        A.read_weights(tmp_path / "w.pt")

    save_file({"other.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="keys do not match"):
        A.load_model(spec, tmp_path / "other.safetensors")


def test_fresh_init_differs_and_is_seeded():
    spec = A.default_spec("small_cnn", (1, 8, 8), 10, width=8)
    model = A.build(spec)
    a, b, c = A.fresh_init(model, 1), A.fresh_init(model, 1), A.fresh_init(model, 2)
    assert torch.equal(a.fc.weight, b.fc.weight)
    assert not torch.equal(a.fc.weight, c.fc.weight)
    assert not torch.equal(a.fc.weight, model.fc.weight)


def test_seeded_build_is_reproducible_and_leaves_the_global_rng_alone():
    spec = A.default_spec("small_cnn", (1, 8, 8), 10, width=8)
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a, b, c = A.build(spec, seed=5), A.build(spec, seed=5), A.build(spec, seed=6)
    assert torch.equal(torch.rand(1), expected_next)
    assert torch.equal(a.fc.weight, b.fc.weight) and not torch.equal(a.fc.weight, c.fc.weight)
