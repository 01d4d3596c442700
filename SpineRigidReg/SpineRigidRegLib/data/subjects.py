"""Subject folders (one CT/MR case per folder) and the real TotalSegmentator example case.

File naming in a subject folder
    Every file (or DICOM folder) is classified by the words of its name, split at anything that is not a letter or
    digit and compared case-insensitively, once the ending is removed:

    - modality: ``ct`` -> CT; ``mr``, ``mri``, ``t1``, ``t1w``, ``t2``, ``t2w`` -> MR. A name with neither (or both)
      is ignored.
    - role: landmarks for ``.mrk.json``, ``.json``, ``.fcsv``, ``.csv`` files; labels when a word is ``seg``,
      ``segmentation``, ``label``, ``labels``, ``labelmap``, ``vertebrae``, ``vert``, ``mask`` (or starts with
      ``seg``/``label``); otherwise the image.

    Images may be ``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd`` or a DICOM series folder. So
    ``ct.nii.gz``, ``ct_vertebrae.nii.gz`` (or ``ct_seg.nrrd``, ``CT-labels.mha``), ``mr.nii.gz`` (or ``T1w.nii.gz``,
    a ``mr/`` DICOM folder), ``mr_vertebrae.nii.gz``, ``ct_landmarks.mrk.json`` and ``mr_landmarks.fcsv`` form a
    subject. The CT, its labels and the MR are required; MR labels and the two landmark files are optional. Two
    candidates for one role is an error (the message lists them).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from ..errors import InputError
from ..geometry import Geometry
from ..io import IMAGE_SUFFIXES, PathLike, read_image, read_landmarks
from ..preprocess import resample_isotropic, resample_to_reference
from .vertebrae import TOTALSEGMENTATOR, TOTALSEGMENTATOR_VERTEBRAE, vertebra_labels_only

logger = logging.getLogger(__name__)

_CT_WORDS = {"ct"}
_MR_WORDS = {"mr", "mri", "t1", "t1w", "t2", "t2w"}
_LABEL_WORDS = {"seg", "segmentation", "label", "labels", "labelmap", "vertebrae", "vert", "mask"}
_LANDMARK_SUFFIXES = (".mrk.json", ".json", ".fcsv", ".csv")
_ROLES = ("ct", "ct_labels", "mr", "mr_labels", "ct_landmarks", "mr_landmarks")
_REQUIRED = {
    "ct": "a CT image (e.g. ct.nii.gz)",
    "ct_labels": "a CT vertebra label map (e.g. ct_vertebrae.nii.gz or ct_seg.nii.gz)",
    "mr": "an MR image (e.g. mr.nii.gz)",
}

#: The TotalSegmentator example files under the shared data folder.
TOTALSEGMENTATOR_EXAMPLE = "totalsegmentator-examples"
#: TotalSegmentator v2 "total" id of the spinal cord.
TOTALSEGMENTATOR_SPINAL_CORD = 79


@dataclass(frozen=True)
class Subject:
    """The files of one case.

    Attributes:
        name: The folder's name.
        ct: CT image (file or DICOM folder).
        ct_labels: CT vertebra label map.
        mr: MR image.
        mr_labels: Optional MR vertebra labels (evaluation).
        ct_landmarks: Optional CT vertebra centres.
        mr_landmarks: Optional MR vertebra centres.
    """

    name: str
    ct: Path
    ct_labels: Path
    mr: Path
    mr_labels: Path | None = None
    ct_landmarks: Path | None = None
    mr_landmarks: Path | None = None

    @property
    def folder(self) -> Path:
        """The subject folder (where the CT lies)."""
        return self.ct.parent

    def read(self) -> dict[str, object]:
        """Read and check every file present: ``{role: sitk.Image or landmark dict}`` for the dataclass's roles.

        Label maps must hold whole numbers; a floating-point label map with whole values is returned as int32.

        Raises:
            InputError: A file cannot be read (damaged, truncated, not 3D, unknown format) or a label map holds
                non-integer values; the message names the subject folder and the file.
        """
        out: dict[str, object] = {}
        for role in _ROLES:
            path = getattr(self, role)
            if path is None:
                continue
            try:
                if role.endswith("landmarks"):
                    out[role] = read_landmarks(path)
                else:
                    image = read_image(path)
                    out[role] = _integer_labels(image) if role.endswith("labels") else image
            except InputError as error:
                raise InputError(f"subject folder {self.folder}: {_ROLE_NAMES[role]} {path.name}: {error}") from None
        return out


_ROLE_NAMES = {
    "ct": "CT image",
    "ct_labels": "CT label map",
    "mr": "MR image",
    "mr_labels": "MR label map",
    "ct_landmarks": "CT landmarks",
    "mr_landmarks": "MR landmarks",
}


def _integer_labels(image: sitk.Image) -> sitk.Image:
    """The label map itself if its pixel type is integer; int32 if it is floating point with whole values."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError("a label map needs one value per voxel")
    array = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(array.dtype, np.integer):
        return image
    if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
        raise InputError("the label map holds non-integer values (a label map needs one integer per vertebra)")
    return sitk.Cast(image, sitk.sitkInt32)


def _strip_suffix(name: str) -> tuple[str, str]:
    lowered = name.lower()
    for suffix in sorted(IMAGE_SUFFIXES + _LANDMARK_SUFFIXES, key=len, reverse=True):
        if lowered.endswith(suffix):
            return name[: -len(suffix)], suffix
    return name, ""


def classify(path: Path) -> str | None:
    """The role of a file or folder in a subject folder (one of the :class:`Subject` fields), or ``None``."""
    stem, suffix = _strip_suffix(path.name)
    if path.is_dir():
        suffix = "dicom"
    elif suffix not in IMAGE_SUFFIXES and suffix not in _LANDMARK_SUFFIXES:
        return None
    words = [w for w in re.split(r"[^a-z0-9]+", stem.lower()) if w]
    is_ct, is_mr = bool(_CT_WORDS & set(words)), bool(_MR_WORDS & set(words))
    if is_ct == is_mr:
        return None
    modality = "ct" if is_ct else "mr"
    if suffix in _LANDMARK_SUFFIXES:
        return f"{modality}_landmarks"
    if any(w in _LABEL_WORDS or w.startswith(("seg", "label")) for w in words):
        return f"{modality}_labels"
    return modality


def _candidates(folder: Path) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {role: [] for role in _ROLES}
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        role = classify(path)
        if role is None:
            logger.debug("ignoring %s (its name names no role)", path)
            continue
        found[role].append(path)
    return found


def load_subject(folder: PathLike, check: bool = False) -> Subject:
    """Find the files of one case in ``folder`` by their names (see the module docstring).

    Args:
        folder: The subject folder.
        check: Also read every file (:meth:`Subject.read`) so that damaged files and non-integer label maps are
            found now rather than later.

    Raises:
        InputError: The folder is missing, lacks the CT, its labels or the MR, holds two candidates for a role, or
            (with ``check``) holds a file that cannot be read or a label map that is not integer.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"subject folder not found: {folder}")
    found = _candidates(folder)
    for role, paths in found.items():
        if len(paths) > 1:
            names = ", ".join(p.name for p in paths)
            raise InputError(f"subject folder {folder} is ambiguous: several files could be the {role} ({names})")
    missing = [description for role, description in _REQUIRED.items() if not found[role]]
    if missing:
        raise InputError(f"subject folder {folder} lacks {'; '.join(missing)}")
    subject = Subject(name=folder.name, **{role: (paths[0] if paths else None) for role, paths in found.items()})
    if check:
        subject.read()
    return subject


def find_subjects(root: PathLike, skip_invalid: bool = False, check: bool = False) -> list[Subject]:
    """All subjects under ``root``: each sub-folder holding CT or MR files, in name order (or ``root`` itself).

    A sub-folder is a subject when some file or folder in it is named for a role (``ct.nii.gz``, ``mr/``...),
    whatever the sub-folder's own name; DICOM folders and unrelated folders hold no such names and are passed over.

    Args:
        root: A folder of subject folders, or a single subject folder.
        skip_invalid: Log and skip broken subject folders instead of raising.
        check: Read every file of every subject (see :func:`load_subject`).

    Raises:
        InputError: ``root`` is missing or holds no subject, or (without ``skip_invalid``) a subject folder is
            broken.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"subjects folder not found: {root}")
    subjects = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not any(_candidates(folder).values()):
            continue  # a DICOM folder of a single subject at the root, or an unrelated folder
        try:
            subjects.append(load_subject(folder, check=check))
        except InputError as error:
            if not skip_invalid:
                raise
            logger.warning("skipping %s: %s", folder, error)
    if not subjects and any(_candidates(root).values()):
        subjects.append(load_subject(root, check=check))
    if not subjects:
        raise InputError(f"no subject found under {root} (expected folders holding ct.*, ct_vertebrae.*, mr.*)")
    return subjects


# ---------------------------------------------------------------------------------------------- real example


@dataclass
class RealCase:
    """A real CT with its vertebra labels on the CT grid.

    Attributes:
        ct: float32 CT in HU.
        labels: uint16 vertebra labels (TotalSegmentator numbering), same grid as ``ct``.
        scheme: The label numbering.
        source: Where the files came from.
        tissues: uint8 :class:`~.phantom.Tissue` classes on the same grid for the MR synthesiser
            (:func:`spine_tissue_map`), or ``None``.
    """

    ct: sitk.Image
    labels: sitk.Image
    scheme: str
    source: str
    tissues: sitk.Image | None = None


def labels_on_image_grid(labels: sitk.Image, image: sitk.Image) -> sitk.Image:
    """A label map placed on an image's grid by physical position (nearest neighbour; 0 outside the label map)."""
    return resample_to_reference(labels, image, is_label=True, default_value=0)


def bone_aligned_slices(labels: sitk.Image, ct: sitk.Image, vertebra_ids: set[int]) -> sitk.Image:
    """A label map with fewer slices than its CT (same in-plane grid and direction), moved along ``k`` to the slice
    offset where the CT is brightest inside the vertebrae.

    The TotalSegmentator example's 30-slice label map carries the CT's origin, but its anatomy (vertebrae, liver,
    body outline) matches the CT's *last* 30 slices: placed by its header it puts T11-L2 on the pelvis. Bone is the
    brightest tissue, so the offset that maximises the mean CT number inside the vertebra labels is the right one.
    """
    n_ct, n_labels = ct.GetSize()[2], labels.GetSize()[2]
    if labels.GetSize()[:2] != ct.GetSize()[:2] or n_labels >= n_ct:
        return labels
    ct_array = sitk.GetArrayViewFromImage(ct)
    inside = np.isin(sitk.GetArrayViewFromImage(labels), sorted(vertebra_ids))
    if not inside.any():
        return labels
    means = [float(ct_array[k : k + n_labels][inside].mean()) for k in range(n_ct - n_labels + 1)]
    offset = int(np.argmax(means))
    moved = sitk.Image(labels)
    moved.SetOrigin(ct.TransformIndexToPhysicalPoint((0, 0, offset)))
    if offset != int(round(ct.TransformPhysicalPointToContinuousIndex(labels.GetOrigin())[2])):
        logger.warning(
            "label map moved to CT slices %d-%d, where its vertebrae lie on bone", offset, offset + n_labels - 1
        )
    return moved


def _drop_fragments(labels: sitk.Image, fraction: float = 0.25) -> sitk.Image:
    """Remove vertebrae smaller than ``fraction`` of the median vertebra: slivers cut by the scan's field of view
    (the example's T11) can be neither registered nor scored meaningfully."""
    array = sitk.GetArrayFromImage(labels)
    values, counts = np.unique(array[array > 0], return_counts=True)
    small = values[counts < fraction * np.median(counts)] if len(values) > 2 else []
    if len(small) == 0:
        return labels
    logger.info("dropped vertebra fragments %s (cut by the field of view)", [int(v) for v in small])
    array[np.isin(array, small)] = 0
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(labels)
    return out


def label_bounding_box(labels: sitk.Image, margin_mm: float = 0.0) -> tuple[list[int], list[int]] | None:
    """ITK-order voxel box ``[start, stop)`` of the non-zero labels grown by ``margin_mm`` and clipped to the grid;
    ``None`` for an empty map."""
    array = sitk.GetArrayViewFromImage(labels)
    nonzero = np.nonzero(array)
    if nonzero[0].size == 0:
        return None
    size = labels.GetSize()
    start, stop = [], []
    for axis_itk in range(3):
        axis_array = 2 - axis_itk
        grow = int(np.ceil(margin_mm / labels.GetSpacing()[axis_itk]))
        start.append(max(int(nonzero[axis_array].min()) - grow, 0))
        stop.append(min(int(nonzero[axis_array].max()) + grow + 1, size[axis_itk]))
    return start, stop


def crop_to_labels(
    image: sitk.Image, labels: sitk.Image, margin_mm: float = 20.0, max_in_plane_mm: float = 0.0
) -> tuple[sitk.Image, sitk.Image]:
    """Crop an image and its labels (same grid) to the labelled region grown by ``margin_mm``.

    Args:
        image: The image.
        labels: Labels on the same grid.
        margin_mm: Margin around the labels.
        max_in_plane_mm: Keep the whole in-plane (``i``, ``j``) field of view when it is no larger than this in both
            directions (a small body stays whole); 0 always crops in-plane too.

    Returns:
        The cropped image and labels (same physical positions, smaller grid).
    """
    if not Geometry.of(image).same_grid(Geometry.of(labels)):
        raise InputError("image and labels must share a grid before cropping")
    box = label_bounding_box(labels, margin_mm)
    if box is None:
        raise InputError("the label map is empty; nothing to crop around")
    start, stop = box
    size, spacing = image.GetSize(), image.GetSpacing()
    if all((size[a] - 1) * spacing[a] <= max_in_plane_mm for a in (0, 1)):
        start[0], start[1], stop[0], stop[1] = 0, 0, size[0], size[1]
    region = tuple(slice(a, b) for a, b in zip(start, stop, strict=True))
    return image[region], labels[region]


def load_real_case(
    shared_data_dir: PathLike,
    spacing: float | None = 1.0,
    margin_mm: float = 20.0,
    max_in_plane_mm: float = 160.0,
) -> RealCase:
    """The TotalSegmentator example CT with its vertebrae (L2, L1, T12; T11 is a sliver cut by the field of view and
    is dropped), ready for synthesis or registration.

    The example label map covers only 30 of the CT's 112 slices; its header gives the CT's origin, but its anatomy
    is that of the CT's last 30 slices, so it is first moved to the slices where its vertebrae lie on bone
    (:func:`bone_aligned_slices`), then placed on the CT grid (nearest neighbour, 0 where it has no slice); only
    vertebra labels are kept; the CT and labels are cropped around the vertebrae with ``margin_mm`` (the whole
    in-plane field of view is kept when no larger than ``max_in_plane_mm``), then resampled to ``spacing`` mm cubes
    (linear for the CT, nearest for the labels).

    Args:
        shared_data_dir: The shared data folder (holding ``totalsegmentator-examples/``) or that sub-folder itself.
        spacing: Output voxel size (mm); ``None`` keeps the native 3 mm grid.
        margin_mm: Crop margin around the vertebrae.
        max_in_plane_mm: See above.

    Raises:
        InputError: The files are missing or hold no vertebra.
    """
    folder = Path(shared_data_dir)
    if (folder / TOTALSEGMENTATOR_EXAMPLE).is_dir():
        folder = folder / TOTALSEGMENTATOR_EXAMPLE
    ct_path, seg_path = folder / "example_ct.nii.gz", folder / "example_seg.nii.gz"
    for path in (ct_path, seg_path):
        if not path.is_file():
            raise InputError(f"TotalSegmentator example file not found: {path}")
    ct = sitk.Cast(read_image(ct_path), sitk.sitkFloat32)
    seg = labels_on_image_grid(bone_aligned_slices(read_image(seg_path), ct, set(TOTALSEGMENTATOR_VERTEBRAE)), ct)
    labels = vertebra_labels_only(seg, TOTALSEGMENTATOR)
    labels = sitk.Cast(_drop_fragments(labels), sitk.sitkUInt16)
    cord = sitk.Cast(seg == TOTALSEGMENTATOR_SPINAL_CORD, sitk.sitkUInt8)
    cord, _ = crop_to_labels(cord, labels, margin_mm, max_in_plane_mm)
    ct, labels = crop_to_labels(ct, labels, margin_mm, max_in_plane_mm)
    if spacing is not None:
        ct = resample_isotropic(ct, spacing)
        labels = resample_isotropic(labels, spacing, is_label=True)
        cord = resample_isotropic(cord, spacing, is_label=True)
    tissues = spine_tissue_map(ct, labels, cord)
    return RealCase(ct=ct, labels=labels, scheme=TOTALSEGMENTATOR, source=str(folder), tissues=tissues)


def spine_tissue_map(
    ct: sitk.Image, labels: sitk.Image, cord: sitk.Image | None = None, csf_mm: float = 2.5, disc_gap_mm: float = 12.0
) -> sitk.Image:
    """:class:`~.phantom.Tissue` classes of a real spine CT, for an MR synthesised from it.

    CT numbers and the vertebra labels give air, fat, muscle and bone (:func:`.synthesis.tissue_classes_from_ct`);
    what they cannot tell from muscle, and what makes a T2 image of the spine, is added from anatomy: the
    intervertebral discs (soft tissue closing the gaps between consecutive vertebrae along the image's ``k`` axis,
    up to ``disc_gap_mm``, so the scan must be axial), the spinal cord (``cord``, a segmentation on the same grid)
    and the CSF around it (the cord grown by ``csf_mm``, outside bone).

    Returns:
        uint8 classes on the CT's grid.
    """
    from .phantom import Tissue
    from .synthesis import tissue_classes_from_ct

    ct_array = sitk.GetArrayFromImage(ct).astype(np.float32)
    label_array = sitk.GetArrayFromImage(labels).astype(np.int64)
    classes = tissue_classes_from_ct(torch.from_numpy(ct_array)[None, None], torch.from_numpy(label_array)[None, None])
    classes = classes[0, 0].numpy().astype(np.uint8)
    soft = classes == int(Tissue.MUSCLE)
    spacing_k = ct.GetSpacing()[2]
    reach = max(int(round(disc_gap_mm / 2.0 / spacing_k)), 1)
    vertebrae = sitk.Cast(labels > 0, sitk.sitkUInt8)
    closed = sitk.GetArrayFromImage(sitk.BinaryMorphologicalClosing(vertebrae, [0, 0, reach], sitk.sitkBox))
    classes[(closed > 0) & soft] = int(Tissue.DISC)
    if cord is not None:
        cord_array = sitk.GetArrayFromImage(cord) > 0
        if cord_array.any():
            grow = [max(int(round(csf_mm / s)), 1) for s in ct.GetSpacing()]
            around = sitk.GetArrayFromImage(sitk.BinaryDilate(sitk.Cast(cord, sitk.sitkUInt8), grow, sitk.sitkBall))
            bone = (classes == int(Tissue.MARROW)) | (classes == int(Tissue.CORTICAL))
            classes[(around > 0) & ~bone & ~cord_array] = int(Tissue.CSF)
            classes[cord_array & ~bone] = int(Tissue.CORD)
    out = sitk.GetImageFromArray(classes)
    out.CopyInformation(ct)
    return out
