"""What every benchmark script's command line shares."""
from __future__ import annotations

import argparse


def describe_only(doc: str | None) -> None:
    """For a benchmark that takes no options: `--help` says what it measures (its docstring) and
    runs nothing; anything else on the command line is a usage error, not silently ignored."""
    argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
