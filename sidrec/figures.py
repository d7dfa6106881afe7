"""Writing a matplotlib figure to a PNG atomically: one helper for every plot sidrec draws, in the
package root so that training, benchmarks and load tests may all use it (learning curves,
codebook usage, the service sweep, load-test latency over time). Imports only the standard library;
matplotlib belongs to the caller."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path


def save_figure(fig, path: str | Path, dpi: int = 100) -> Path:
    """Save `fig` as a PNG at `path` (parents created) through a temporary file and a rename, so a
    reader never sees half a file; close it in pyplot if pyplot manages it. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=dpi)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        if "matplotlib.pyplot" in sys.modules:  # a Figure made without pyplot is left alone
            sys.modules["matplotlib.pyplot"].close(fig)
    return path
