"""SpineRigidReg core: rigidity-preserving CT-to-MR registration of the spine (no Slicer imports)."""

__version__ = "0.1.0"
