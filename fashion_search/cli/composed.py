"""Composed retrieval measured on a clip.py run (fashion_search.composed has the protocol): prints its figures on val
and test, trains the combiner beside the run, and fits the text and composed calibrations into RUN/calibration.json.

Usage: python -m fashion_search.cli.composed RUN [--no-combiner] [--combiner-epochs 12]   (installed: fashion-composed)
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

from fashion_search.composed import MIN_TARGETS, run_protocol
from fashion_search.errors import cli
from fashion_search.runtime import add_device_arg, positive_int


@dataclass(frozen=True)
class ComposedConfig:
    """The flags, parsed once (their defaults and meaning: parse_config)."""
    run: str
    device: str
    combiner: bool
    combiner_epochs: int
    min_targets: int


def parse_config(argv=None) -> ComposedConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a clip.py run with a usable text tower")
    add_device_arg(parser)
    parser.add_argument("--combiner", action=argparse.BooleanOptionalAction, default=True,
                        help="also train the combiner and use it for composed queries")
    parser.add_argument("--combiner-epochs", type=positive_int, default=12)
    parser.add_argument("--min-targets", type=positive_int, default=MIN_TARGETS, help="a colour is asked of a type "
                        "only where the gallery holds at least this many items of that type in that colour")
    return ComposedConfig(**vars(parser.parse_args(argv)))


def main(argv=None) -> dict:
    from fashion_search.serving.encoder import run_encoder

    config = parse_config(argv)
    encoder = run_encoder(config.run, config.device, text=True)
    report = run_protocol(config.run, encoder.embed_text, config.combiner, config.combiner_epochs,
                          config.min_targets)
    print(json.dumps(report, indent=1))
    return report


def command():  # fashion-composed, python -m fashion_search.cli.composed
    cli(main)


if __name__ == "__main__":
    command()
