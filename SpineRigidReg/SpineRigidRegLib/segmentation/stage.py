"""The MR segmentation as a stage of the registration pipeline (:func:`..pipeline.register`).

It finds the vertebrae in the MR (an output, ``mr_vertebrae_predicted.nii.gz``) and gives each registered CT
vertebra a check that needs no MR labels: the share of it that lands on bone the network sees in the MR
(``mr_bone_percent``). A low value flags a vertebra to look at: misregistered, or bone the network missed (its
accuracy on real MR is in docs/BENCHMARKS.md).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from functools import lru_cache

import SimpleITK as sitk
import torch

from ..errors import InputError
from ..inference import uses_bfloat16, with_fast_layout
from ..inputs import image_digest
from ..metrics import share_on_mask_percent
from .predict import bundled_card, load_bundled_segmentation, predict_bone

logger = logging.getLogger(__name__)


@lru_cache(maxsize=2)
def _bundled(device: str):
    return with_fast_layout(load_bundled_segmentation(device))


def predict_mr_bone(
    fixed: sitk.Image, device: torch.device | str = "cpu", precision: str = "float32"
) -> sitk.Image | None:
    """float32 vertebral-bone probability on ``fixed``'s grid from the bundled network (bone where it exceeds
    :data:`BONE_THRESHOLD`), or ``None`` when this installation has no segmentation model (logged).
    ``precision``: the network's arithmetic (:data:`..inference.PRECISIONS`)."""
    if bundled_card() is None:
        logger.info("no bundled MR segmentation model: the MR vertebrae are not predicted")
        return None
    try:
        network = _bundled(str(device))
    except InputError as error:
        logger.warning("MR segmentation skipped: %s", error)
        return None
    key = (image_digest(fixed), str(device), uses_bfloat16(device, precision))
    cached = _PREDICTIONS.get(key)
    if cached is None or cached[0] is not network:
        cached = _PREDICTIONS[key] = (network, predict_bone(fixed, network, device, precision=precision))
        while len(_PREDICTIONS) > _CACHED_PREDICTIONS:
            _PREDICTIONS.popitem(last=False)
    return sitk.Image(cached[1])  # a copy: the caller may change its own


#: Predictions kept for MRs seen again (a manual-correction re-run, the benchmark's rows on one case): the MR
#: segmentation cost about 1 s of each re-run on the sample case (docs/SPEED_PROFILE.md).
_CACHED_PREDICTIONS = 2
_PREDICTIONS: OrderedDict[tuple[str, str], tuple[object, sitk.Image]] = OrderedDict()


def forget_predictions() -> None:
    """Empty the cache of :func:`predict_mr_bone`, so that the next registration segments its MR again (a benchmark
    timing a first registration)."""
    _PREDICTIONS.clear()


def add_mr_bone_agreement(rows: list[dict], warped_labels: torch.Tensor, mr_bone: torch.Tensor) -> None:
    """Add ``mr_bone_percent`` to each vertebra row: the share of the registered vertebra's voxels on which the
    network sees vertebral bone in the MR.

    Args:
        rows: Per-vertebra rows with ``label``.
        warped_labels: ``(1, 1, D, H, W)`` registered CT labels on the processing grid.
        mr_bone: ``(1, 1, D, H, W)`` bool predicted MR bone on the same grid.
    """
    on_bone = share_on_mask_percent(warped_labels, mr_bone)
    for row in rows:
        row["mr_bone_percent"] = on_bone.get(int(row["label"]), 0.0)


#: Below this ratio of predicted MR bone to registered CT bone (inside the MR's view), the network found too little
#: of the spine for its per-vertebra check to mean much, and the user is told so.
MIN_FOUND_RATIO = 0.3


def mr_bone_summary(warped_labels: torch.Tensor, mr_bone: torch.Tensor, inside_mr: torch.Tensor) -> dict:
    """How much bone the network found against how much CT bone the registration put in the MR's view.

    Returns:
        ``{"mr_bone_found_ratio": float}``; a warning is logged when it is below :data:`MIN_FOUND_RATIO`.
    """
    ct_bone = float(((warped_labels > 0) & inside_mr).sum())
    ratio = float((mr_bone & inside_mr).sum()) / ct_bone if ct_bone else 0.0
    if ratio < MIN_FOUND_RATIO:
        logger.warning(
            "the segmentation network found little vertebral bone in this MR (%.0f %% of the registered CT "
            "vertebrae's volume): its 'on MR bone' check says little here, judge the alignment by eye",
            100 * ratio,
        )
    return {"mr_bone_found_ratio": ratio}
