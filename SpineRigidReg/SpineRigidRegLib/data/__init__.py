"""Data: vertebra naming (:mod:`.vertebrae`), a procedural spine phantom (:mod:`.phantom`), ground-truth CT/MR pair
and label-only contrast synthesis (:mod:`.synthesis`), and subject-folder loaders (:mod:`.subjects`)."""
