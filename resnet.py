"""ResNet-50 fine-tuned as an article-type classifier; the pooled 2048-d feature before the new head (batch-normalised,
BNNeck) is the retrieval embedding.

Usage: python resnet.py [--from-scratch --image-size 64] [--output-dir runs/resnet]
The code is fashion_search/cli/resnet.py; installed, the same command is `fashion-resnet`.
"""
from fashion_search.cli.resnet import command

if __name__ == "__main__":
    command()
