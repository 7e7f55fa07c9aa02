"""Prepare the product photos for training: drop undecodable images and classes too small to learn, map the
label column to ids, split train/val/test stratified by label, and save with ``save_to_disk``.

Usage: python data_preparation.py [--dataset ashraq/fashion-product-images-small | PATH] [--output-dir data/processed]
The code is fashion_search/cli/data_preparation.py; installed, the same command is `fashion-prepare`.
"""
from fashion_search.cli.data_preparation import command

if __name__ == "__main__":
    command()
