"""Datasets for accuracy checks (numpy and Pillow only): a seeded synthetic shapes dataset (``shapes``) and the
reader of dataset folders in COCO formats that ``m2f-validate`` uses for any data (``coco_folder``)."""

from m2f_deploy.data.coco_folder import Dataset, Record, load_dataset
from m2f_deploy.data.shapes import CLASSES, Sample, generate_sample, write_dataset

__all__ = ["CLASSES", "Dataset", "Record", "Sample", "generate_sample", "load_dataset", "write_dataset"]
