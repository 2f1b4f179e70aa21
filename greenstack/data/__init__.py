"""Datasets for the `data` config group; all work offline."""

from greenstack.data.builders import (
    DataModule,
    digits,
    image_folder,
    synthetic_image,
    synthetic_text,
    text_csv,
)

__all__ = ["DataModule", "digits", "image_folder", "synthetic_image", "synthetic_text", "text_csv"]
