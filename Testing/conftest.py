"""Shared pytest fixtures (the real-data folder, seeded generators) and helpers of tests in several folders: the
repository's root, the phantom command-line case, a DICOM series writer. Test modules import the helpers with
``from conftest import ...`` (pytest puts this folder on ``sys.path``; keep the sub-folders free of ``conftest.py``)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

#: The repository's root (this file is ``Testing/conftest.py``): tests in every folder find the package, its configs
#: and ``Resources/`` from here rather than counting ``parents`` of their own file.
REPO_ROOT = Path(__file__).resolve().parents[1]

#: ``../shared/data`` relative to the repository root (present in the development workspace and in CI only), or the
#: folder named by ``SRR_SHARED_DATA`` (a copy carried to a GPU machine).
SHARED_DATA = Path(os.environ.get("SRR_SHARED_DATA") or REPO_ROOT.parent / "shared" / "data")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real-data folder; the test is skipped when it is absent (a fresh clone has no ``../shared``)."""
    if not (SHARED_DATA / "totalsegmentator-examples").is_dir():
        pytest.skip(f"real data not available: {SHARED_DATA} is absent (it exists only beside the development repo)")
    return SHARED_DATA


@pytest.fixture
def seed() -> int:
    """A fixed seed; also seeds torch's and numpy's global generators for the test."""
    torch.manual_seed(1234)
    np.random.seed(1234)
    return 1234


@pytest.fixture
def rng(seed: int) -> np.random.Generator:
    """A seeded numpy generator."""
    return np.random.default_rng(seed)


@pytest.fixture
def generator(seed: int) -> torch.Generator:
    """A seeded CPU torch generator."""
    return torch.Generator().manual_seed(seed)


def write_phantom_case(root: Path) -> dict[str, Path]:
    """A 3-vertebra phantom CT, its labels, an MR-like image (inverted CT) and a tiny untrained model, as files
    under ``root``: the inputs of the command-line tests."""
    from SpineRigidRegLib.checkpoint import save_checkpoint
    from SpineRigidRegLib.data.phantom import make_phantom
    from SpineRigidRegLib.network import NetworkConfig, RegistrationNet

    phantom = make_phantom(num_vertebrae=3, shape=(48, 40, 40), seed=2)
    mr = sitk.InvertIntensity(sitk.Cast(phantom.ct, sitk.sitkFloat32), maximum=1500.0)
    paths = {"ct": root / "ct.nii.gz", "seg": root / "seg.nii.gz", "mr": root / "mr.nrrd", "model": root / "m.pt"}
    sitk.WriteImage(phantom.ct, str(paths["ct"]))
    sitk.WriteImage(phantom.labels, str(paths["seg"]))
    sitk.WriteImage(mr, str(paths["mr"]))
    torch.manual_seed(0)
    tiny = NetworkConfig(encoder_channels=(4, 4, 4, 4), decoder_channels=(4, 4, 4, 4), final_channels=(4,))
    save_checkpoint(paths["model"], RegistrationNet(tiny))
    return paths


def write_dicom_series(image: sitk.Image, folder: Path, series_uid: str) -> None:
    """A DICOM series folder of ``image`` (the public writer with a fixed series UID): used by the I/O and the
    subject-folder tests."""
    from SpineRigidRegLib import io

    io.write_dicom_series(image, folder, series_uid=series_uid)
