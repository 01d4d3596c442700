"""What every command line shares: logging, a progress bar, and one-line errors instead of tracebacks."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import CancelledError, InputError

EXIT_BAD_INPUT = 2
EXIT_CANCELLED = 130


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    parser.add_argument("--verbose", action="store_true", help="debug logging")


class _TqdmHandler(logging.StreamHandler):
    """Writes log records through ``tqdm.write``: each on its own line, the progress bar redrawn below it (a plain
    stream handler glued records onto the end of the bar's line, where warnings went unnoticed)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def configure_logging(args: argparse.Namespace) -> None:
    """Root logging at the level ``--quiet``/``--verbose`` ask for, one record per line, routed around the progress
    bar; matplotlib's own INFO chatter (its font cache) is kept out."""
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _TqdmHandler)]:
        root.removeHandler(old)
    if root.handlers:  # configured by the host already (pytest, an application embedding the command)
        return
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("matplotlib").setLevel(max(level, logging.WARNING))


def check_output_folder(path: Path, flag: str = "--out") -> None:
    """Raise :class:`InputError` unless ``path`` is a folder this process can write into, or can be created as one.

    Called before any computation so that a long run does not fail at its end. It writes and removes an empty probe
    folder (in ``path``, or in its nearest existing parent when ``path`` does not exist yet), which catches read-only
    mounts, immutable folders and missing permissions alike; nothing it creates stays.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag} {path} is an existing file; give a folder (it is created if missing)")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{flag} {path} cannot be created: {existing} is a file")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".srr-write-test-", dir=existing))
    except OSError as error:
        where = "it" if existing == path else f"its parent {existing}"
        reason = (error.strerror or type(error).__name__).lower()
        raise InputError(f"{flag} {path} is not writable ({where}: {reason}); choose another output folder") from error


@contextmanager
def progress_bar(enabled: bool = True) -> Iterator[Callable[[float, str], None]]:
    """A ``progress(fraction, message)`` callable drawing a tqdm bar on stderr (log records print above it)."""
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
