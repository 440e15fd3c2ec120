"""specdec-harness: compare speculative decoders through one draft->verify loop."""

from pathlib import Path

from omegaconf import OmegaConf

REPO_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = REPO_ROOT / "conf"


def shipped_head(name: str, *, _root_) -> str | None:
    """`${shipped_head:<name>}` in a method config: the trained head the repository ships for the composed
    model (`model.shipped_heads.<name>`, a folder under the repo), or None (an untrained head). Only for the
    model's own weights: a `model.path` override (another checkpoint, a test's tiny model) gets None."""
    model = _root_.get("model")
    if model is None or model.get("path") or not model.get("shipped_heads"):
        return None
    folder = model.shipped_heads.get(name)
    if not folder:
        return None
    folder = Path(str(folder))
    folder = folder if folder.is_absolute() else REPO_ROOT / folder
    return str(folder) if (folder / "head_config.json").is_file() else None


if not OmegaConf.has_resolver("shipped_head"):
    OmegaConf.register_new_resolver("shipped_head", shipped_head)
