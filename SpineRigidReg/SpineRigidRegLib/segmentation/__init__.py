"""MR vertebra segmentation: a small UNet that finds vertebral bone in an MR image of any contrast.

Trained only on synthetic images (SynthSeg-style: random intensities per anatomical label, random texture, bias,
resolution, slice thickness and noise, drawn from label maps of a real CT and of procedural phantoms), so it needs
no annotated MR. Modules: :mod:`.grid` (the canonical grid the network works on), :mod:`.labelmaps` (the label maps
images are drawn from), :mod:`.synth` (the image generator), :mod:`.net` (the network), :mod:`.train` (its
training loop) and :mod:`.predict` (inference on an MR image, the bundled model).
"""
