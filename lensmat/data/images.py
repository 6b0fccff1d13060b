"""Images that ship offline, for the vision models (:mod:`lensmat.models.vision`), with a fixed split.

``"digits"``: scikit-learn's bundled copy of the UCI "Optical Recognition of Handwritten Digits"
test set (E. Alpaydin, C. Kaynak, 1998; CC BY 4.0): 1,797 grey 8×8 images of the digits 0–9, pixel
counts 0..16 scaled to ``[0, 1]``. The split is fixed: a permutation of the images drawn with
``numpy.random.default_rng(seed)`` (seed 0), its first 70% ``train`` and the rest ``heldout``
(:data:`~lensmat.data.corpora.TRAIN_FRACTION`, as for text). Every image is its own document (the
bootstrap's unit) and keeps its index in the whole set.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int

from lensmat.data.corpora import SPLITS, TRAIN_FRACTION

IMAGE_DATASETS = ("digits",)
DEFAULT_IMAGES = "digits"
SPLIT_SEED = 0


@dataclass
class ImageSet:
    """One split of an image dataset: ``images`` ``[n, channels, h, w]`` in ``[0, 1]`` (float32), their
    ``labels``, and ``index``, each image's position in the whole dataset."""

    name: str
    split: str
    images: Float[torch.Tensor, "n c h w"]
    labels: Int[torch.Tensor, "n"]
    index: Int[torch.Tensor, "n"]
    n_classes: int
    seed: int = SPLIT_SEED

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def head(self, n: int | None) -> "ImageSet":
        """The first ``n`` images (all with ``None``)."""
        if n is None or n >= len(self):
            return self
        return ImageSet(self.name, self.split, self.images[:n], self.labels[:n], self.index[:n], self.n_classes,
                        self.seed)

    def provenance(self) -> dict:
        """What the reports record: the dataset, split, image count and shape, and how the split was drawn."""
        return {"name": self.name, "split": self.split, "n_images": len(self), "image_shape": list(self.images.shape[1:]),
                "n_classes": self.n_classes, "split_seed": self.seed, "train_fraction": TRAIN_FRACTION,
                "source": SOURCES[self.name]}


SOURCES = {"digits": "sklearn.datasets.load_digits: UCI Optical Recognition of Handwritten Digits (Alpaydin & Kaynak "
                     "1998), CC BY 4.0"}


def load_images(name: str | None = None, split: str = "heldout", *, seed: int = SPLIT_SEED) -> ImageSet:
    """The ``split`` (``"train"``, ``"heldout"`` or ``"all"``) of the image dataset ``name`` (default ``"digits"``)."""
    name = DEFAULT_IMAGES if name is None else str(name)
    if name not in IMAGE_DATASETS:
        raise ValueError(f"Unknown image dataset {name!r} for a vision model; valid: {', '.join(IMAGE_DATASETS)} "
                         "(images that ship with an installed package, read offline).")
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; valid: {', '.join(SPLITS)}.")
    if split == "all":
        train, heldout = load_images(name, "train", seed=seed), load_images(name, "heldout", seed=seed)
        return ImageSet(name, "all", torch.cat([train.images, heldout.images]), torch.cat([train.labels, heldout.labels]),
                        torch.cat([train.index, heldout.index]), train.n_classes, seed)
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images / 16.0, dtype=torch.float32)[:, None]  # [1797, 1, 8, 8]
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = np.random.default_rng(seed).permutation(len(labels))
    cut = int(np.floor(TRAIN_FRACTION * len(labels)))
    index = torch.tensor(order[:cut] if split == "train" else order[cut:], dtype=torch.long)
    return ImageSet(name, split, images[index], labels[index], index, 10, seed)
