import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import onnxruntime as ort
import pytest

from models.contract import ONNX_METADATA_KEY, ModelContract
from models.registry import IntegrityError, Registry, RegistryError
from onnx_builders import build_tiny_classifier


@pytest.fixture()
def onnx_file(tmp_path, tiny_contract):
    return build_tiny_classifier(tiny_contract, tmp_path / "src" / "model.onnx")


def test_register_assigns_versions_and_writes_triton_layout(tmp_path, onnx_file, tiny_contract):
    registry = Registry(tmp_path / "reg", "wbc-test")
    first = registry.register(onnx_file, tiny_contract, {"round": 1, "strategy": "fedavg"})
    second = registry.register(onnx_file, tiny_contract, {"round": 2, "strategy": "fedavg"})
    assert [v.version for v in registry.versions()] == [1, 2]
    assert registry.latest().version == 2
    model_dir = tmp_path / "reg" / "wbc-test"
    assert (model_dir / "1" / "model.onnx").is_file() and (model_dir / "2" / "metadata.json").is_file()
    config = (model_dir / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in config and "dims: [ 3, 32, 32 ]" in config
    assert (model_dir / "labels.txt").read_text().split() == list(tiny_contract.class_names)
    meta = json.loads((model_dir / "2" / "metadata.json").read_text())
    assert meta["round"] == 2 and meta["version"] == 2 and len(meta["sha256"]) == 64
    assert first.metadata["round"] == 1 and second.contract.version == 2


def test_registered_file_names_its_own_version(tmp_path, onnx_file, tiny_contract):
    info = Registry(tmp_path, "m").register(onnx_file, tiny_contract, {})
    session = ort.InferenceSession(str(info.onnx_path), providers=["CPUExecutionProvider"])
    stamped = ModelContract.from_json(session.get_modelmeta().custom_metadata_map[ONNX_METADATA_KEY])
    assert (stamped.model_name, stamped.version) == ("m", 1)
    assert stamped.with_updates(model_name=None, version=None) == tiny_contract


def test_tampered_file_fails_verification(tmp_path, onnx_file, tiny_contract):
    info = Registry(tmp_path, "m").register(onnx_file, tiny_contract, {})
    info.verify()
    with info.onnx_path.open("r+b") as fh:
        fh.seek(-4, os.SEEK_END)
        fh.write(b"\x00\x01\x02\x03")
    with pytest.raises(IntegrityError):
        info.verify()


@pytest.mark.parametrize("name", ["model.onnx", "metadata.json", "../weights.safetensors", ".hidden"])
def test_extra_files_cannot_replace_or_escape_the_version(tmp_path, onnx_file, tiny_contract, name):
    registry = Registry(tmp_path / "reg", "wbc")
    with pytest.raises(RegistryError, match="extra files"):
        registry.register(onnx_file, tiny_contract, {}, {name: b"x"})
    assert registry.versions() == []


def test_versions_without_weights_say_so(tmp_path, onnx_file, tiny_contract):
    registry = Registry(tmp_path / "reg", "wbc")
    bare = registry.register(onnx_file, tiny_contract, {})
    kept = registry.register(onnx_file, tiny_contract, {}, {"weights.safetensors": b"w"})
    assert bare.weights_path is None and kept.weights_path == kept.path / "weights.safetensors"
    with pytest.raises(RegistryError, match="without its network weights"):
        bare.verify_weights()
    assert kept.verify_weights().read_bytes() == b"w"


def test_incomplete_folders_are_not_versions(tmp_path, onnx_file, tiny_contract):
    registry = Registry(tmp_path, "m")
    registry.register(onnx_file, tiny_contract, {})
    (registry.model_dir / "2").mkdir()
    (registry.model_dir / "2" / "model.onnx").write_bytes(b"half")
    (registry.model_dir / "3").mkdir()
    (registry.model_dir / "3" / "metadata.json").write_text("{not json")
    assert [v.version for v in registry.versions()] == [1]


def test_aliases_resolve_and_keep_history(tmp_path, onnx_file, tiny_contract):
    registry = Registry(tmp_path, "m")
    for _ in range(3):
        registry.register(onnx_file, tiny_contract, {})
    assert registry.resolve().version == 3  # no production alias yet: latest
    registry.set_alias("production", 2, reason="manual", actor="admin")
    registry.set_alias("production", 1, reason="rollback", actor="admin")
    assert registry.resolve().version == 1 and registry.resolve("latest").version == 3
    history = registry.aliases()["history"]
    assert [(h["from"], h["to"]) for h in history] == [(None, 2), (2, 1)]
    with pytest.raises(RegistryError):
        registry.set_alias("production", 9)
    with pytest.raises(RegistryError):
        registry.resolve("../../etc")


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".hidden", "x" * 65])
def test_model_names_cannot_escape_the_root(tmp_path, name):
    with pytest.raises(RegistryError):
        Registry(tmp_path, name)


def test_kill_during_registration_leaves_only_whole_versions(tmp_path, onnx_file, tiny_contract):
    """A writer killed with SIGKILL at random moments never leaves a half version behind."""
    root = tmp_path / "reg"
    script = textwrap.dedent(
        f"""
        import sys
        from models.contract import ModelContract
        from models.registry import Registry
        contract = ModelContract.from_json({tiny_contract.to_json()!r})
        registry = Registry({str(root)!r}, "m")
        print("ready", flush=True)
        while True:
            registry.register({str(onnx_file)!r}, contract, {{"padding": "x" * 200000}})
        """
    )
    for delay in (0.35, 0.6, 0.9):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                cwd=Path(__file__).resolve().parents[2])
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    registry = Registry(root, "m")
    versions = registry.versions()
    assert versions, "the writer should have registered something before being killed"
    for info in versions:
        info.verify()
    numbers = [v.version for v in versions]
    assert numbers == list(range(1, len(numbers) + 1))
    registry.clean_staging()
    assert not any((root / ".staging").iterdir())
