import pytest
from pydantic import ValidationError

from models.contract import SHARED_CLASSES, UNIDENTIFIED, CellCrop, ModelContract


def make(**changes):
    base = dict(architecture="resnet34", class_names=SHARED_CLASSES, input_size=128,
                mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    return ModelContract(**{**base, **changes})


def test_json_round_trip_is_exact():
    contract = make(cell_crop=CellCrop(scale=2.5), color="gray", temperature=1.7, abstain_threshold=0.6)
    assert ModelContract.from_json(contract.to_json()) == contract


def test_contract_is_frozen():
    contract = make()
    with pytest.raises(ValidationError):
        contract.input_size = 64


def test_with_updates_validates():
    contract = make()
    assert contract.with_updates(version=3).version == 3
    with pytest.raises(ValidationError):
        contract.with_updates(std=(0.0, 1.0, 1.0))


@pytest.mark.parametrize(
    "changes",
    [
        {"class_names": ("a", "a")},
        {"class_names": ("a", UNIDENTIFIED)},
        {"input_size": 8},
        {"abstain_threshold": 0.1},  # at/below chance for 5 classes: would never abstain
        {"unknown_field": 1},
    ],
)
def test_invalid_contracts_are_refused(changes):
    with pytest.raises(ValidationError):
        make(**changes)
