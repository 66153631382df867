"""Architecture registry: built-ins, user architectures from entry points, safetensors I/O.

A spec is ``{"name": "small_cnn", "kwargs": {...}}``; every built-in takes ``num_classes`` and
the input geometry in its kwargs, so a spec alone rebuilds the model. User architectures are
callables ``(**kwargs) -> nn.Module`` registered in the ``unlearnd.architectures`` entry-point
group of their own distribution.

Weights are read and written as safetensors only: never ``torch.load`` of a file.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import ArchitectureError, CheckpointError

ENTRY_POINT_GROUP = "unlearnd.architectures"
Builder = Callable[..., nn.Module]
_BUILTINS: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    def deco(fn: Builder) -> Builder:
        _BUILTINS[name] = fn
        return fn

    return deco


class MLP(nn.Module):
    def __init__(self, in_features: int, num_classes: int, hidden: tuple[int, ...] = (256, 128)):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        prev = in_features
        for h in hidden:
            layers += [nn.Linear(prev, h), nn.ReLU(inplace=True)]
            prev = h
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


@register("mlp")
def mlp(num_classes: int, in_features: int, hidden: list[int] | tuple[int, ...] = (256, 128)) -> nn.Module:
    return MLP(int(in_features), int(num_classes), tuple(int(h) for h in hidden))


class SmallCNN(nn.Module):
    """conv-BN-ReLU-pool ×2, conv-BN-ReLU, global average pool, linear head. Any input size ≥ 4."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32):
        super().__init__()
        w = width

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(in_channels, w), nn.MaxPool2d(2),
            *block(w, 2 * w), nn.MaxPool2d(2),
            *block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


@register("small_cnn")
def small_cnn(num_classes: int, in_channels: int = 1, width: int = 32) -> nn.Module:
    return SmallCNN(int(in_channels), int(num_classes), int(width))


class LeNet5(nn.Module):
    """LeNet-5 as in IAU's CNN (conv 6, conv 16, fc 400→120→84), made size-agnostic.

    Both convolutions are padded ('same') and an adaptive pool brings the map to 5×5, so the
    fully connected part is exactly IAU's 400→120→84→C for any input of at least 4×4.
    """

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(5), nn.Flatten(),
            nn.Linear(400, 120), nn.ReLU(inplace=True), nn.Linear(120, 84), nn.ReLU(inplace=True),
        )
        self.fc = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


@register("lenet5")
def lenet5(num_classes: int, in_channels: int = 3) -> nn.Module:
    return LeNet5(int(in_channels), int(num_classes))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 with the CIFAR stem (3×3 conv1, stride 1, no max-pool); ``width`` = first stage."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 64):
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(in_channels, w, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        stages, cin = [], w
        for i, cout in enumerate((w, 2 * w, 4 * w, 8 * w)):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register("resnet18")
def resnet18(num_classes: int, in_channels: int = 3, width: int = 64) -> nn.Module:
    return ResNet18(int(in_channels), int(num_classes), int(width))


def available() -> dict[str, Builder]:
    """Built-ins plus installed entry points (an entry point may not shadow a built-in)."""
    found = dict(_BUILTINS)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in found:
            found[ep.name] = ep  # loaded lazily in build()
    return found


def _resolve(name: str) -> Builder:
    found = available()
    if name not in found:
        raise ArchitectureError(f"architecture.name: unknown architecture {name!r}; known: {sorted(found)}")
    b = found[name]
    if not callable(b) or hasattr(b, "load"):
        try:
            b = b.load()
        except Exception as exc:  # a broken plugin must not take the engine down
            raise ArchitectureError(f"architecture.name: entry point {name!r} failed to load: {exc}") from exc
    return b


def validate_spec(spec: object) -> dict:
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ArchitectureError('architecture: must be an object {"name": str, "kwargs": {...}}')
    kwargs = spec.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise ArchitectureError("architecture.kwargs: must be an object")
    extra = set(spec) - {"name", "kwargs"}
    if extra:
        raise ArchitectureError(f"architecture: unknown field(s) {sorted(extra)}")
    return {"name": spec["name"], "kwargs": dict(kwargs)}


def build(spec: dict, seed: int | None = None) -> nn.Module:
    """Instantiate the architecture a spec names; bad names or kwargs raise :class:`ArchitectureError`.

    With ``seed`` the initialization is reproducible (the global RNG is left as it was).
    """
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build(spec)
    spec = validate_spec(spec)
    builder = _resolve(spec["name"])
    try:
        inspect.signature(builder).bind(**spec["kwargs"])
    except TypeError as exc:
        raise ArchitectureError(f"architecture.kwargs: {exc}") from exc
    except ValueError:  # builtins without signatures: let the call decide
        pass
    try:
        model = builder(**spec["kwargs"])
    except (TypeError, ValueError) as exc:
        raise ArchitectureError(f"architecture.kwargs: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ArchitectureError(f"architecture.name: {spec['name']!r} did not return a torch.nn.Module")
    return model


def default_spec(name: str, input_shape: tuple[int, ...], num_classes: int, **kwargs) -> dict:
    """A complete spec for a built-in from the data's geometry plus user kwargs."""
    base: dict = {"num_classes": int(num_classes)}
    if name == "mlp":
        base["in_features"] = int(math.prod(input_shape))
    elif len(input_shape) == 3:
        base["in_channels"] = int(input_shape[0])
    elif name in _BUILTINS:
        raise ArchitectureError(f"architecture.name: {name!r} needs (C, H, W) inputs, data has {input_shape}")
    base.update(kwargs)
    return {"name": name, "kwargs": base}


def save_weights(model: nn.Module, path: str | Path) -> None:
    """Write the state dict as safetensors (atomically: temp file then rename)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(tmp))
    tmp.replace(path)


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"weights: not a readable safetensors file ({exc})") from exc


def load_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Load a state dict strictly; mismatched keys or shapes and non-finite values raise CheckpointError."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"weights: keys do not match the architecture (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(f"weights: {k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise CheckpointError(f"weights: {k} contains NaN or infinite values")
    model.load_state_dict(state, strict=True)
    return model


def load_model(spec: dict, path: str | Path) -> nn.Module:
    return load_weights(build(spec), read_weights(path))


def fresh_init(model: nn.Module, seed: int) -> nn.Module:
    """A copy of ``model`` with every module re-initialized (``reset_parameters``), seeded.

    Used by ``retrain`` and DEL's reset target (a *fresh* init, not the original one).
    """
    import copy

    clone = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in clone.modules():
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                reset()
            reset_stats = getattr(m, "reset_running_stats", None)
            if callable(reset_stats):
                reset_stats()
    return clone
