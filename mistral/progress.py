"""Progress bars for the steps that take seconds to minutes: on a terminal only, so that logs and
pipes get no carriage-return noise."""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress(iterable=None, *, total: int | None = None, desc: str, unit: str, quiet: bool = False) -> tqdm:
    """A tqdm bar on stderr (as huggingface-hub's downloads show theirs), disabled when `quiet`
    or when stderr is not a terminal. It stays on screen when done, with the time it took."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=quiet or not sys.stderr.isatty(),
                file=sys.stderr, dynamic_ncols=True)
