"""What every command line shares: logging, a progress bar, and one-line errors instead of tracebacks."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ..errors import CancelledError, InputError

EXIT_BAD_INPUT = 2
EXIT_CANCELLED = 130


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    parser.add_argument("--verbose", action="store_true", help="debug logging")


def configure_logging(args: argparse.Namespace) -> None:
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s")


@contextmanager
def progress_bar(enabled: bool = True) -> Iterator[Callable[[float, str], None]]:
    """A ``progress(fraction, message)`` callable drawing a tqdm bar on stderr."""
    if not enabled:
        yield lambda fraction, message: None
        return
    from tqdm import tqdm

    bar = tqdm(total=100, unit="%", bar_format="{l_bar}{bar}| {elapsed}", file=sys.stderr, leave=False)

    def update(fraction: float, message: str) -> None:
        bar.n = round(100 * min(max(fraction, 0.0), 1.0))
        bar.set_description_str(message[:40].ljust(40))
        bar.refresh()

    try:
        yield update
    finally:
        bar.close()


def run_command(
    parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], int], argv: list[str] | None
) -> int:
    """Every ``srr-*`` entry point: parse ``argv``, set up logging, then :func:`run_main` the command's ``run``."""
    args = parser.parse_args(argv)
    configure_logging(args)
    return run_main(lambda: run(args), verbose=args.verbose)


def run_main(body: Callable[[], int], verbose: bool = False) -> int:
    """Run a command body; bad input -> one line on stderr and exit code 2 (a traceback only with --verbose)."""
    try:
        return body()
    except InputError as error:
        if verbose:
            raise
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except CancelledError:
        print("cancelled", file=sys.stderr)
        return EXIT_CANCELLED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_CANCELLED
