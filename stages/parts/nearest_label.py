"""The nearest-label baseline: what a dense label costs with no image at all.

Every pixel takes the class of the nearest weakly labelled pixel (Euclidean distance,
ties resolved by scipy's distance transform). A pseudo-labeller that does not beat this
has learnt nothing from the image.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import distance_transform_edt


def nearest_label(weak: np.ndarray, ignore_id: int) -> np.ndarray:
    """weak: HxW class ids, ``ignore_id`` where unlabelled -> HxW, same dtype, every pixel
    the class of its nearest labelled pixel; all ``ignore_id`` when no pixel is labelled."""
    unlabelled = weak == ignore_id
    if unlabelled.all():
        return weak.copy()
    rows, cols = distance_transform_edt(unlabelled, return_distances=False, return_indices=True)
    return weak[rows, cols]
