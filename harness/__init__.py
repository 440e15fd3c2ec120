"""specdec-harness: compare speculative decoders through one draft->verify loop."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = REPO_ROOT / "conf"
