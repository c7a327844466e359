"""Shared setup for the integration tests.

The examples are a script directory, imported the way ``python
examples/integrations/lightning_example.py`` sees them: with that directory on ``sys.path``.
Nothing may reach the Hugging Face Hub.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

_EXAMPLE_DIR = Path(__file__).resolve().parents[2] / "examples" / "integrations"
if str(_EXAMPLE_DIR) not in sys.path:
    sys.path.insert(0, str(_EXAMPLE_DIR))

# The toy datasets live in memory; Lightning's advice to add loader workers is noise here.
warnings.filterwarnings("ignore", ".*does not have many workers.*")
