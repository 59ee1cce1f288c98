"""Data in: in-memory uint8 datasets from local files or the embedded benchmark, and augmentation."""

from selfmask.data.base import ImageTensorDataset, normalize_batch
from selfmask.data.cache import cached_images, load_tensor_dataset, save_tensor_dataset
from selfmask.data.cifar import load_cifar
from selfmask.data.folders import load_image_folder
from selfmask.data.multicrop import MultiCrop, MultiCropConfig
from selfmask.data.sources import load_data
from selfmask.data.splits import load_split

__all__ = [
    "ImageTensorDataset",
    "MultiCrop",
    "MultiCropConfig",
    "cached_images",
    "load_cifar",
    "load_data",
    "load_image_folder",
    "load_split",
    "load_tensor_dataset",
    "normalize_batch",
    "save_tensor_dataset",
]
