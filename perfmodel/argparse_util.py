"""argparse that reports bad flags as one line and exit 2 through SpecError (no usage dump)."""

from __future__ import annotations

import argparse

from perfmodel.specs import SpecError


class ArgParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise SpecError(f"{self.prog}: {message}")

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        return super().parse_args(args, namespace)


def parser(prog: str, description: str) -> ArgParser:
    return ArgParser(prog=f"moeperf {prog}", description=description)
