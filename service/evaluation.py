"""Evaluate a registered ONNX version exactly as it is served: the same ONNX Runtime session, the same
contract preprocessing (`models.preprocess`), on labelled site data."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from federation.sites import Sample
from models.evaluate import Metrics, compute_metrics
from models.preprocess import preprocess
from service.inference import Classifier


def _load(sample: Sample, contract) -> np.ndarray:
    with Image.open(sample.path) as img:
        img.load()
        return preprocess(img, contract)


def evaluate_classifier(
    classifier: Classifier,
    samples: Sequence[Sample],
    *,
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Metrics, np.ndarray, np.ndarray]:
    """Metrics over samples whose label the model knows; returns (metrics, probabilities, targets)."""
    contract = classifier.contract
    index = {name: i for i, name in enumerate(contract.class_names)}
    known = [s for s in samples if s.label in index]
    probs, targets = [], []
    chunks = [known[i : i + batch_size] for i in range(0, len(known), batch_size)]
    done = 0
    with ThreadPoolExecutor(max_workers=2) as pool:  # the next chunk decodes while this one runs
        pending = [pool.submit(_load, s, contract) for s in chunks[0]] if chunks else []
        for k, chunk in enumerate(chunks):
            arrays = [f.result() for f in pending]
            pending = [pool.submit(_load, s, contract) for s in chunks[k + 1]] if k + 1 < len(chunks) else []
            probs.append(classifier.probabilities(np.stack(arrays)))
            targets.extend(index[s.label] for s in chunk)
            done += len(chunk)
            if progress:
                progress(done, len(known))
    p = np.concatenate(probs) if probs else np.zeros((0, contract.num_classes), np.float32)
    t = np.asarray(targets, dtype=np.int64)
    return compute_metrics(contract.class_names, t, p), p, t
