"""Datasets for accuracy checks: a seeded synthetic panoptic dataset in COCO formats (numpy and Pillow only)."""

from m2f_deploy.data.synthetic import (
    CLASSES,
    Dataset,
    Record,
    Sample,
    generate_sample,
    load_dataset,
    write_dataset,
)

__all__ = ["CLASSES", "Dataset", "Record", "Sample", "generate_sample", "load_dataset", "write_dataset"]
