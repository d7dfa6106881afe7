"""The `sidrec` command: one entry point that the offline and online halves plug into.

    sidrec serve [--bundle DIR ...]            # the HTTP service          (extra: serve)
    sidrec index load|list|activate|drop ...   # Redis inverse index       (extra: serve)
    sidrec train --data DIR --out RUN ...      # the offline pipeline      (extra: train)
    sidrec synth | demo-bundle | assign-sids   # synthetic data, demo bundle, new items' SIDs (extra: train)

This module knows only which half owns each command. It imports that half when its command runs,
so `sidrec serve` works in the serving image, where the training extras are absent, and a command
whose extras are missing says which extra to install instead of a traceback. Each half keeps its
own `main(argv)` (`sidrec.service.cli`, `sidrec.training.cli`); neither imports the other.
"""
from __future__ import annotations

import importlib
import sys
from typing import NamedTuple, Sequence


class Command(NamedTuple):
    module: str
    extra: str
    help: str


COMMANDS: dict[str, Command] = {
    "serve": Command("sidrec.service.cli", "serve", "run the HTTP service (uvicorn)"),
    "index": Command("sidrec.service.cli", "serve", "manage inverse-index versions in Redis"),
    "items": Command("sidrec.service.items_cli", "serve", "bulk-add items (CSV/NDJSON/Parquet) to a running service"),
    "train": Command("sidrec.training.cli", "train", "run the offline pipeline (all stages, or one)"),
    "synth": Command("sidrec.training.cli", "train", "write the built-in synthetic dataset (P5 format)"),
    "demo-bundle": Command("sidrec.training.cli", "train", "train a small model on synthetic data, export a bundle"),
    "assign-sids": Command("sidrec.training.cli", "train", "SIDs for new items' text from a bundle's codebooks"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: sidrec COMMAND [options]   (sidrec COMMAND --help for a command's options)", "",
             "semantic-ID generative recommendation", "", "commands:"]
    lines += [f"  {name:<{width}}  {c.help}" for name, c in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from sidrec import __version__

        print(f"sidrec {__version__}")
        return 0
    cmd = COMMANDS.get(argv[0])
    if cmd is None:
        print(f"sidrec: unknown command {argv[0]!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        # A half imports some of its extras only when a command needs them: a missing one can
        # surface at import or at run time, and gets the same answer either way.
        return int(importlib.import_module(cmd.module).main(argv) or 0)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] == "sidrec":
            raise  # our own module is missing: a broken install, not a missing extra
        print(f"sidrec {argv[0]}: needs the '{cmd.extra}' extra (missing module {e.name!r}); "
              f"install it with: pip install 'sidrec[{cmd.extra}]'", file=sys.stderr)
        return 2

if __name__ == "__main__":
    sys.exit(main())
