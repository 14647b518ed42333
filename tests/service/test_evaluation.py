"""`evaluate_classifier` (what `wbc evaluate` and the demo report): batched with the next chunk decoding
while the current one runs, it must give each cell exactly the probabilities the service gives it alone,
in sample order, and leave out cells whose label the model does not know."""

from __future__ import annotations

import numpy as np

from federation.sites import DataRoot
from models.registry import Registry
from service.evaluation import _load, evaluate_classifier
from service.inference import Classifier


def test_batched_evaluation_matches_one_cell_at_a_time(registry_root, settings, data_root: DataRoot):
    classifier = Classifier(Registry(registry_root, settings.model_name).resolve("latest").onnx_path)
    known = classifier.contract.class_names
    samples = [s for site in ("tehran-lisc", "bccd") for s in data_root.select([site], ["test"])[:6]]
    samples = [s for s in samples if s.label in known][:7]
    unknown = [s for s in data_root.select(["barcelona-pbc"], ["test"]) if s.label not in known][:2]
    assert len(samples) == 7 and len(unknown) == 2, "the bundled sites no longer hold these test cells"
    mixed = samples[:3] + unknown[:1] + samples[3:] + unknown[1:]

    seen = []
    metrics, probs, targets = evaluate_classifier(classifier, mixed, batch_size=3,
                                                  progress=lambda done, total: seen.append((done, total)))

    alone = np.concatenate([classifier.probabilities(_load(s, classifier.contract)[0][None]) for s in samples])
    np.testing.assert_allclose(probs, alone, rtol=1e-5, atol=1e-6)
    assert targets.tolist() == [known.index(s.label) for s in samples]
    assert metrics.n == 7
    assert seen == [(3, 7), (6, 7), (7, 7)]


def test_evaluating_nothing_gives_empty_results(registry_root, settings):
    classifier = Classifier(Registry(registry_root, settings.model_name).resolve("latest").onnx_path)
    _, probs, targets = evaluate_classifier(classifier, [])
    assert probs.shape == (0, classifier.contract.num_classes) and targets.shape == (0,)
