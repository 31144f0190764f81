"""docs/activator.md says what the activator does: the series it names are the ones it exports,
and the options it shows are ones `ebbtide activator` accepts."""

from __future__ import annotations

import re
from pathlib import Path

DOC = (Path(__file__).resolve().parents[1] / "docs" / "activator.md").read_text()


def test_the_documented_series_are_the_exported_ones():
    from ebbtide.activator.proxy import Activator

    suffixes = {"counter": ("_total",), "histogram": ("",)}  # the doc names a histogram by its base name
    exported = {m.name + suffix for m in Activator("models", "chat").registry.collect()
                for suffix in suffixes.get(m.type, ("",))}
    documented = set(re.findall(r"\bebbtide_activator_\w+", DOC))
    assert documented == exported, (documented - exported, exported - documented)


def test_the_documented_command_line_is_accepted():
    from ebbtide.cli import build_parser

    (command,) = re.findall(r"^\s+(ebbtide activator .*)$", DOC, re.MULTILINE)
    args = build_parser().parse_args(command.split()[1:])
    assert (args.service, args.namespace, args.hold_seconds) == ("chat", "models", 600)
    for option in set(re.findall(r"`(--[a-z-]+)", DOC)):
        assert option in build_parser()._subparsers._group_actions[0].choices["activator"]._option_string_actions
