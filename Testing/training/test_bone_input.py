"""The degraded bone input of a label-guided network's training (training/bone_input.py)."""

from __future__ import annotations

import torch
from SpineRigidRegLib.training.bone_input import BoneInputNoise, degraded_bone


def _labels() -> torch.Tensor:
    labels = torch.zeros((2, 1, 32, 32, 32), dtype=torch.int64)
    labels[:, :, 4:12, 8:24, 8:24] = 21
    labels[:, :, 16:26, 8:24, 8:24] = 22
    return labels


def test_the_same_seed_gives_the_same_input_and_another_seed_another():
    labels = _labels()
    assert torch.equal(degraded_bone(labels, 5), degraded_bone(labels, 5))
    assert not all(torch.equal(degraded_bone(labels, 5), degraded_bone(labels, s)) for s in range(6, 12))


def test_the_input_is_a_probability_that_marks_the_bone_more_than_its_surroundings():
    labels = _labels()
    bone = labels > 0
    far = ~torch.nn.functional.max_pool3d(bone.float(), 9, stride=1, padding=4).bool()
    inside, outside = [], []
    for seed in range(40):
        p = degraded_bone(labels, seed)
        assert p.shape == labels.shape and p.dtype == torch.float32
        assert float(p.min()) >= 0.0 and float(p.max()) <= 1.0
        if p.max() > 0:
            inside.append(float(p[bone].mean()))
            outside.append(float(p[far].mean()))
    assert min(inside) > 0.02 and max(outside) == 0.0  # false positives only next to the bone, as a net's are


def test_some_inputs_are_empty_as_when_no_segmentation_model_is_installed():
    labels = _labels()[:1]
    empty = sum(float(degraded_bone(labels, seed).max()) == 0.0 for seed in range(200))
    assert 5 <= empty <= 40  # BoneInputNoise.empty = 0.1
    none = BoneInputNoise(empty=0.0, weak=0.0, holes=0.0, false_positive=0.0, dilate=0.0, erode=0.0)
    clean = degraded_bone(labels, 3, none)
    assert float(clean[labels > 0].min()) > 0.2 and torch.equal(clean > 0.5, (labels > 0) & (clean > 0.5))
