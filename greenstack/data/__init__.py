"""Datasets for the `data` config group; all work offline."""

from greenstack.data.builders import (
    DataModule,
    digits,
    image_folder,
    synthetic_image,
    synthetic_text,
    text_csv,
)
from greenstack.data.hf import hf_local
from greenstack.data.lm import python_stdlib
from greenstack.data.streaming import stream

__all__ = ["DataModule", "digits", "hf_local", "image_folder", "synthetic_image", "python_stdlib", "stream", "synthetic_text", "text_csv"]
