"""Training pairs (training/pairs.py): the seeded pair pool and its prefetching, GPU synthesis, MR contrast,
augmentation and pre-alignment keeping the true field consistent with the labels."""

from __future__ import annotations

import pytest
import torch
from SpineRigidRegLib.errors import InputError
from SpineRigidRegLib.training.pairs import PairPool, TrainingPair, augment, make_pair, prealigned
from SpineRigidRegLib.warp import warp_labels
from training_helpers import tiny_config


def test_pair_pool_is_a_function_of_seed_and_step():
    config = tiny_config()
    a = PairPool(config.data, config.synthesis, seed=3)
    b = PairPool(config.data, config.synthesis, seed=3)
    a.sync(0)
    b.sync(4)  # a later pool (pairs 1, 2), then back to step 0's pool (pairs 0, 1)
    b.sync(0)
    assert sorted(a.pairs) == sorted(b.pairs) == [0, 1]
    x, y = a.batch(2), b.batch(2)
    assert torch.equal(x.fixed, y.fixed) and torch.equal(x.moving_labels, y.moving_labels)
    assert x.fixed.shape == (1, 1, 32, 32, 32) and 0.0 <= float(x.fixed.min()) and float(x.fixed.max()) <= 1.0
    # The fixed labels are the moving labels after the motion: same vertebrae, a non-trivial misalignment.
    assert set(torch.unique(x.moving_labels).tolist()) >= set(torch.unique(x.fixed_labels).tolist()) - {0}
    assert not torch.equal(x.moving_labels, x.fixed_labels)


def test_a_prefetching_pool_holds_the_same_pairs():
    config = tiny_config(data={"pool_size": 2, "refresh_every": 1})
    plain = PairPool(config.data, config.synthesis, seed=3)
    ahead = PairPool(config.data, config.synthesis, seed=3, prefetch=2)
    try:
        for step in (0, 1, 2, 3, 1):  # the last: a jump back, as a resume makes
            assert plain.sync(step) == ahead.sync(step)
            assert sorted(plain.pairs) == sorted(ahead.pairs)
            for index in plain.pairs:
                assert torch.equal(plain.pairs[index].fixed, ahead.pairs[index].fixed)
        assert {3, 4} <= set(ahead._pending)  # the next two pairs are on their way
    finally:
        ahead.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the GPU training recipe runs it first)")
@pytest.mark.parametrize("source", ["real", "phantom", "label_contrast"])
def test_pairs_synthesised_on_the_gpu_match_the_cpu_pairs_and_stay_there(source, shared_data):
    config = tiny_config(data={"real": 1.0, "label_contrast": 1.0, "real_data_dir": str(shared_data)})
    cpu = make_pair(source, 7, config.data, config.synthesis, PairPool(config.data, config.synthesis).real)
    pool = PairPool(config.data, config.synthesis, seed=7, device="cuda")
    gpu = make_pair(source, 7, config.data, config.synthesis, pool.real, device="cuda")
    assert gpu.fixed.is_cuda and gpu.true_displacement.is_cuda and gpu.fixed_labels.is_cuda
    torch.testing.assert_close(gpu.true_displacement.cpu(), cpu.true_displacement, atol=1e-3, rtol=1e-3)
    assert float((gpu.fixed.cpu() - cpu.fixed).abs().mean()) < 1e-3
    assert float((gpu.fixed_labels.cpu() != cpu.fixed_labels).float().mean()) < 1e-3
    pool.sync(0)
    assert pool.batch(0).fixed.is_cuda


def test_mr_contrast_of_training_pairs_changes_the_image_only():
    config = tiny_config()
    t1 = make_pair("phantom", 4, config.data, config.synthesis)
    t2 = make_pair("phantom", 4, config.override(data={"mr_contrasts": ["t2"]}).data, config.synthesis)
    assert torch.equal(t1.fixed_labels, t2.fixed_labels) and torch.equal(t1.true_displacement, t2.true_displacement)
    assert float((t1.fixed - t2.fixed).abs().mean()) > 0.05
    with pytest.raises(InputError, match="mr_contrasts"):
        config.override(data={"mr_contrasts": ["flair"]})


def test_augmented_pairs_keep_their_true_field_consistent_with_the_labels():
    # No crop (synth size = crop size) and no pre-alignment shift at the edges: exact agreement expected.
    config = tiny_config(data={"augment_gamma": 0.0, "prealign": False})
    pair = make_pair("phantom", 7, config.data, config.synthesis)
    assert pair.true_displacement is not None and float(pair.true_displacement.abs().max()) > 0.5
    for step in range(4):  # different flips and axis orders
        out = augment(pair, config.data, torch.Generator().manual_seed(step))
        again = warp_labels(out.moving_labels, out.true_displacement)
        inside = (out.fixed_labels > 0) | (again > 0)
        agreement = float((again == out.fixed_labels)[inside].float().mean())
        assert agreement > 0.999, (step, agreement)
        # A wrong sign or component order of the field would wreck the agreement.
        wrong = warp_labels(out.moving_labels, -out.true_displacement)
        assert float((wrong == out.fixed_labels)[inside].float().mean()) < agreement


def test_prealigned_pairs_keep_the_motion_and_lose_its_mean_translation():
    config = tiny_config(data={"prealign": False})
    pair = make_pair("phantom", 7, config.data, config.synthesis)
    # A known whole-voxel offset on top of the synthesised motion: the CT moved by (3, -2, 0) voxels.
    shift = torch.tensor([3.0, -2.0, 0.0]).view(1, 3, 1, 1, 1)
    rolled = TrainingPair(
        pair.fixed,
        pair.moving.roll((3, -2), dims=(2, 3)),
        pair.moving_labels.roll((3, -2), dims=(2, 3)),
        pair.fixed_labels,
        pair.source,
        pair.true_displacement + shift,
    )
    out = prealigned(rolled)
    bone = out.fixed_labels[:, 0] > 0
    before = [float(pair.true_displacement[:, a][bone].mean()) for a in range(3)]
    after = [float(out.true_displacement[:, a][bone].mean()) for a in range(3)]
    assert all(abs(a) <= 0.5 for a in after), after
    assert all(abs(a - (b - round(b))) < 1e-4 for a, b in zip(after, before)), (before, after)
    # Still a consistent pair: the shifted labels pulled back by the new field give the fixed labels (away from the
    # edges, where the shift repeats edge voxels in place of the CT beyond the grid).
    again = warp_labels(out.moving_labels, out.true_displacement)
    inside = ((out.fixed_labels > 0) | (again > 0))[..., 4:-4, 4:-4, 4:-4]
    again, fixed = again[..., 4:-4, 4:-4, 4:-4], out.fixed_labels[..., 4:-4, 4:-4, 4:-4]
    assert float((again == fixed)[inside].float().mean()) > 0.999
    assert torch.equal(out.fixed, pair.fixed)
