"""Tests for the model registry, the torchvision zoo and BloodNet (CPU, random init)."""

from __future__ import annotations

import io
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bloodray.classes import NUM_CLASSES
from bloodray.models import (
    BloodNet,
    PretrainedWeightsError,
    UnknownModelError,
    count_parameters,
    create_model,
    get_model_info,
    list_models,
    model_table,
    replace_head,
)

torch.set_num_threads(2)

# bloodnet_paper at its real 100 px has ~283 M parameters (~1.1 GB, plus as much
# again for gradients); its forward/backward runs at 32 px, which exercises the
# same layers with a small dense layer. Its full-size parameter count is
# checked on the meta device below.
SMALL_INPUT = {"bloodnet_paper": 32}


def _head_params(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    prefixes = tuple(f"{p}." for p in get_model_info(name).head_paths)
    return {n: p for n, p in model.named_parameters() if n.startswith(prefixes)}


@pytest.mark.parametrize("name", list_models())
def test_forward_backward(name):
    torch.manual_seed(0)
    kw = {"input_size": SMALL_INPUT[name]} if name in SMALL_INPUT else {}
    size = kw.get("input_size", get_model_info(name).input_size)
    model = create_model(name, **kw).train()
    x = torch.randn(2, 3, size, size)
    y = torch.tensor([0, NUM_CLASSES - 1])

    out = model(x)
    if isinstance(out, tuple):  # Inception in train mode: (logits, aux_logits)
        logits, aux = out
        assert aux.shape == (2, NUM_CLASSES)
        loss = F.cross_entropy(logits, y) + 0.4 * F.cross_entropy(aux, y)
    else:
        logits = out
        loss = F.cross_entropy(logits, y)
    assert logits.shape == (2, NUM_CLASSES)
    assert torch.isfinite(loss)
    loss.backward()

    head = _head_params(model, name)
    assert head, f"no parameters under head {get_model_info(name).head!r}"
    for pname, p in head.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.shape[0] == NUM_CLASSES, pname


def test_inception_eval_returns_plain_logits():
    model = create_model("inception_v3").eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 299, 299))
    assert isinstance(out, torch.Tensor)
    assert out.shape == (1, NUM_CLASSES)


def test_num_classes_is_honoured():
    model = create_model("bloodnet", num_classes=3)
    assert model(torch.randn(2, 3, 100, 100)).shape == (2, 3)


# --- registry -------------------------------------------------------------


def test_unknown_model_lists_available():
    with pytest.raises(UnknownModelError) as err:
        create_model("foo")
    message = str(err.value)
    assert message.startswith("unknown model 'foo'; available: ")
    assert "bloodnet" in message and "resnet50" in message
    assert isinstance(err.value, KeyError)


def test_expected_models_registered():
    expected = {"bloodnet", "bloodnet_paper", "vgg16", "vgg19", "resnet50", "resnet101", "resnet152",
                "inception_v3", "mobilenet_v2", "densenet201"}
    assert expected <= set(list_models())
    assert list_models() == sorted(list_models())


@pytest.mark.parametrize("name", list_models())
def test_model_info_is_sane(name):
    info = get_model_info(name)
    assert info.name == name
    assert info.input_size > 0
    assert len(info.mean) == 3 and len(info.std) == 3
    assert all(s > 0 for s in info.std)
    assert info.head_paths


def test_model_info_settings():
    assert get_model_info("inception_v3").input_size == 299
    assert get_model_info("inception_v3").head_paths == ("fc", "AuxLogits.fc")
    assert get_model_info("vgg16").head == "classifier.6"
    assert get_model_info("resnet50").imagenet_weights == "ResNet50_Weights.IMAGENET1K_V2"
    bloodnet = get_model_info("bloodnet")
    assert (bloodnet.input_size, bloodnet.mean, bloodnet.std) == (100, (0.5,) * 3, (0.5,) * 3)
    assert bloodnet.imagenet_weights is None


def test_model_table():
    rows = model_table()
    assert [r["name"] for r in rows] == list_models()
    for row in rows:
        assert row["params"] > 0 and row["input_size"] > 0
        assert set(row) == {"name", "input_size", "params", "imagenet_weights", "description"}
    by_name = {r["name"]: r for r in rows}
    # Reference counts: torchvision's ImageNet model minus its 1000-way head plus an 8-way one.
    assert by_name["resnet50"]["params"] == 25_557_032 - 2048 * 1000 - 1000 + 2048 * 8 + 8


def test_weights_uri_without_pretrained_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="pretrained=True"):
        create_model("bloodnet", weights_uri=str(tmp_path / "w.pth"))


# --- freeze_backbone ------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet50", "inception_v3", "bloodnet"])
def test_freeze_backbone_leaves_only_head_trainable(name):
    model = create_model(name, freeze_backbone=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(_head_params(model, name))
    if name == "inception_v3":
        assert trainable == {"fc.weight", "fc.bias", "AuxLogits.fc.weight", "AuxLogits.fc.bias"}
    assert 0 < count_parameters(model, trainable_only=True) < count_parameters(model)


# --- pretrained weights ---------------------------------------------------


@pytest.fixture(scope="module")
def imagenet_resnet50_state():
    import torchvision

    torch.manual_seed(1)
    return torchvision.models.resnet50(weights=None).state_dict()  # 1000 classes, random


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_uri_loads_backbone_and_replaces_head(tmp_path, imagenet_resnet50_state, suffix):
    path = tmp_path / f"resnet50{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(imagenet_resnet50_state, str(path))
    else:
        torch.save(imagenet_resnet50_state, path)

    model = create_model("resnet50", pretrained=True, weights_uri=str(path))
    state = model.state_dict()
    for key in ("conv1.weight", "layer4.2.conv3.weight", "bn1.running_mean"):
        assert torch.equal(state[key], imagenet_resnet50_state[key]), key
    assert model.fc.out_features == NUM_CLASSES
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, NUM_CLASSES)


def test_weights_uri_with_checkpoint_wrapper_and_ddp_prefix(tmp_path, imagenet_resnet50_state):
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in imagenet_resnet50_state.items()}}, path)
    model = create_model("resnet50", pretrained=True, weights_uri=str(path), freeze_backbone=True)
    assert torch.equal(model.conv1.weight, imagenet_resnet50_state["conv1.weight"])
    assert not model.conv1.weight.requires_grad and model.fc.weight.requires_grad


def test_replace_head_replaces_every_head_path():
    import torchvision

    info = get_model_info("inception_v3")
    with torch.device("meta"):
        model = torchvision.models.inception_v3(weights=None, init_weights=True)
        replace_head(model, info.head, NUM_CLASSES)
    assert model.fc.out_features == model.AuxLogits.fc.out_features == NUM_CLASSES


class NotAStateDict:
    """Stands in for arbitrary pickled code, which must never be unpickled."""


def test_weights_uri_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"x": NotAStateDict()}, path)
    with pytest.raises(PretrainedWeightsError, match="refusing"):
        create_model("resnet50", pretrained=True, weights_uri=str(path))


def test_weights_uri_for_wrong_architecture(tmp_path):
    path = tmp_path / "bloodnet.pth"
    torch.save(BloodNet(1000).state_dict(), path)
    with pytest.raises(PretrainedWeightsError, match="does not fit"):
        create_model("resnet50", pretrained=True, weights_uri=str(path))


def test_weights_uri_missing_file(tmp_path):
    from bloodray.storage import StorageError

    with pytest.raises(StorageError, match="not found"):
        create_model("resnet50", pretrained=True, weights_uri=str(tmp_path / "missing.pth"))


def test_weights_uri_from_s3(s3_bucket):
    from bloodray.storage import filesystem

    bucket_uri, storage_options = s3_bucket  # moto S3 on loopback (tests/conftest.py)
    uri = f"{bucket_uri}/weights/bloodnet.pth"
    source = BloodNet()
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    fs, path = filesystem(uri, storage_options)
    fs.pipe_file(path, buffer.getvalue())

    model = create_model("bloodnet", pretrained=True, weights_uri=uri, storage_options=storage_options)
    assert torch.equal(model.features[0].weight, source.features[0].weight)


def test_pretrained_without_weights_uri_points_to_weights_uri():
    import torchvision

    weights = torchvision.models.get_weight(get_model_info("mobilenet_v2").imagenet_weights)
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    if os.path.exists(cached):
        pytest.skip(f"ImageNet weights are cached at {cached}; nothing to fail")
    with pytest.raises(RuntimeError, match="weights_uri") as err:
        create_model("mobilenet_v2", pretrained=True)
    assert "could not be downloaded" in str(err.value)


def test_bloodnet_pretrained_needs_weights_uri(tmp_path):
    with pytest.raises(PretrainedWeightsError, match="weights_uri"):
        create_model("bloodnet", pretrained=True)

    # A BloodNet trained on another label set: backbone kept, head re-sized.
    source = BloodNet(5)
    path = tmp_path / "bloodnet.safetensors"
    from safetensors.torch import save_file

    save_file(source.state_dict(), str(path))
    model = create_model("bloodnet", pretrained=True, weights_uri=str(path))
    assert torch.equal(model.features[0].weight, source.features[0].weight)
    assert model.classifier[3].out_features == NUM_CLASSES


# --- BloodNet sizes -------------------------------------------------------


def test_bloodnet_is_small_and_pools_to_one_pixel():
    model = create_model("bloodnet")
    assert count_parameters(model) < 2_000_000
    assert model.features(torch.zeros(1, 3, 100, 100)).shape == (1, 256, 1, 1)
    bn = create_model("bloodnet", batch_norm=True)
    assert any(isinstance(m, nn.BatchNorm2d) for m in bn.modules())
    assert bn(torch.randn(2, 3, 100, 100)).shape == (2, NUM_CLASSES)


def test_bloodnet_paper_dense_layer_is_huge():
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = create_model("bloodnet_paper")
        assert model.features(torch.zeros(1, 3, 100, 100)).shape == (1, 256, 93, 93)
    dense = model.classifier[1]
    assert dense.in_features == 93 * 93 * 256
    assert 280e6 < count_parameters(dense) < 290e6
    assert 280e6 < count_parameters(model) < 290e6
