"""What `--help` prints for our console scripts.

absl's `--help` prints the main module's docstring and the flags key to the main module (`sys.argv[0]`). A
console script's main module is a generated stub, with no docstring and no flags of its own, so `distprompt
--help` printed only "USAGE: distprompt [flags]" and our flags were found under `--helpfull`, among a hundred
of absl's and orbax's. `show_in_help` gives the stub a usage text and declares our flags key to it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

from absl import flags


def show_in_help(usage: str, flag_names: Iterable[str]) -> None:
    """Make `--help` print `usage` (unless the main module has a docstring of its own, as `python -m` gives)
    and the flags `flag_names` with their one-line help."""
    main = sys.modules["__main__"]
    if not main.__doc__:
        main.__doc__ = usage
    for name in flag_names:
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])
