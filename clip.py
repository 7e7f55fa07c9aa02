"""CLIP ViT-B/32 fine-tuned on product photos: a classifier head on the image embeddings (as in the original),
plus an optional image-text contrastive term pairing each photo with its productDisplayName through CLIP's
text tower, which keeps the text tower aligned so that the app can answer text queries.

Usage: python clip.py [--from-scratch --image-size 64] [--output-dir runs/clip]
The code is fashion_search/cli/clip.py; installed, the same command is `fashion-clip`.
"""
from fashion_search.cli.clip import command

if __name__ == "__main__":
    command()
