"""The order in which the page shows a folder's images: the one place that decides it.

With a model, least sure first: the images whose reading the model doubts most are the ones
a label teaches it most, and the ones a human must correct. The doubt is the model's plain
confidence in the whole text today; a calibrated confidence replaces it here alone.
"""

from __future__ import annotations

from collections.abc import Sequence


def order_images(relpaths: Sequence[str], confidences: Sequence[float | None] | None) -> list[int]:
    """Indices of ``relpaths`` in page order. Without a model (``confidences`` None): the file order.
    With one: ascending confidence, ties by path; images it could not read (None) last."""
    if confidences is None:
        return sorted(range(len(relpaths)), key=lambda i: relpaths[i])
    return sorted(range(len(relpaths)),
                  key=lambda i: (confidences[i] is None, confidences[i] or 0.0, relpaths[i]))
