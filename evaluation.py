"""Retrieval metrics and the comparison of runs.

Usage: python evaluation.py runs/resnet runs/clip [--baseline pixels]
The code is fashion_search/cli/evaluation.py; installed, the same command is `fashion-evaluate`.
"""
from fashion_search.cli.evaluation import command

if __name__ == "__main__":
    command()
