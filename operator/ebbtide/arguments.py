"""Command-line plumbing every `ebbtide` command shares: bad input is refused in one line on
stderr with exit status 2, never with a traceback or a screenful of usage."""

from __future__ import annotations

import argparse
import math
import os
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

USAGE_ERROR = 2


def refuse(prog: str, problem: object) -> int:
    """Say what is wrong in one line (messages quoting a file can hold newlines) and return 2."""
    print(f"{prog}: {' '.join(str(problem).split())}", file=sys.stderr)
    return USAGE_ERROR


class HelpFormatter(argparse.HelpFormatter):
    def _split_lines(self, text: str, width: int) -> list[str]:
        # Between words only: names such as ebbtide-prewarm or --spot-outage stay whole.
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line that points at --help instead of the whole usage."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **{"formatter_class": HelpFormatter, **kwargs})

    def error(self, message: str):
        refuse(self.prog, f"{message} (see {self.prog} --help)")
        sys.exit(USAGE_ERROR)


def number(kind: type = float, *, minimum: float | None = None, above: float | None = None,
           maximum: float | None = None) -> Callable[[str], float]:
    """An argparse type: a finite number of `kind` within the bounds, refused with the bounds named."""
    bounds = [f"{word} {bound:g}" for word, bound in (("at least", minimum), ("greater than", above),
                                                      ("at most", maximum)) if bound is not None]

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a {'whole number' if kind is int else 'number'}") from None
        if not (math.isfinite(value) and (minimum is None or value >= minimum)
                and (above is None or value > above) and (maximum is None or value <= maximum)):
            raise argparse.ArgumentTypeError(f"must be {' and '.join(bounds) or 'finite'}, not {text}")
        return value

    return parse


# 0 is a valid choice where it means "off" (--metrics-port 0) or "any free port".
port = number(int, minimum=0, maximum=65535)


def writable_file(text: str) -> str:
    """An argparse type for an output file: its directory must exist and be writable now, so that
    a typo in --json is refused before a replay of minutes, not after it."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory")
    folder = path.parent
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {text}: {folder} is not a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text}: no permission to write in {folder}")
    return text


def option(parse: Callable[[str], object]) -> Callable[[str], object]:
    """An argparse type from a parser whose ValueError says what is wrong: argparse would print
    its own "invalid value" instead."""
    def parse_option(text: str) -> object:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse_option
