"""Test-wide setup: offline model loading, Triton's CPU interpreter, the repo on sys.path."""
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede any triton import
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
