"""Data: image files and bundled photographs (:mod:`.images`, RGB or grayscale), the paper's
degradations (:mod:`.degradations`, any channel count, scale 1 included) and degraded-image datasets
(:mod:`.datasets`)."""
from faig_fast.data.images import IMAGE_EXTENSIONS, demo_images, list_images, modcrop, read_image, to_channels
from faig_fast.data.datasets import DegradedImageDataset, SizeGroupedBatchSampler, collate_same_size, loader

__all__ = [
    "IMAGE_EXTENSIONS", "DegradedImageDataset", "SizeGroupedBatchSampler", "collate_same_size", "demo_images",
    "list_images", "loader", "modcrop", "read_image", "to_channels",
]
