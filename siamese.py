"""Siamese (twin) ResNet-50: one shared backbone and a projection head trained with a margin contrastive loss
on every positive and negative pair inside class-balanced batches (P classes x K images), no pair list.

Usage: python siamese.py [--from-scratch --image-size 64] [--output-dir runs/siamese]
The code is fashion_search/cli/siamese.py; installed, the same command is `fashion-siamese`.
"""
from fashion_search.cli.siamese import command

if __name__ == "__main__":
    command()
