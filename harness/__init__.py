"""specdec-harness: compare speculative decoders through one draft->verify loop."""

from pathlib import Path

from omegaconf import OmegaConf

REPO_ROOT = Path(__file__).resolve().parent.parent
# The configs and the shipped heads: conf/ and heads/ of the source tree (a checkout, an editable install), or
# their copies inside an installed wheel (pyproject.toml maps them to harness/_resources/; Hydra also reads
# them as pkg://harness._resources.conf).
_IN_SOURCE_TREE = (REPO_ROOT / "conf" / "config.yaml").is_file()
RESOURCE_ROOT = REPO_ROOT if _IN_SOURCE_TREE else Path(__file__).resolve().parent / "_resources"
CONF_DIR = RESOURCE_ROOT / "conf"


def model_head(*keys: str, _root_) -> str | None:
    """`${head:<key>[,<fallback>...]}` in a method config: the draft head the composed model config names for
    this method (`model.heads.<key>`; the first key that is set wins, so EAGLE-2 reads `eagle2`, else the EAGLE-1
    head it was published with). A value is a folder (relative to the working directory, else to the repository
    or the installed package's shipped heads, made absolute here) or a Hub id (`owner/name`, fetched when the head loads: harness.heads.checkpoint.locate);
    None when the model names no head for the method: the bench then refuses to run unless `allow_untrained=true`.
    One sweep can give every method its own head: `model.heads.eagle=DIR model.heads.medusa=DIR2`."""
    heads = (_root_.get("model") or {}).get("heads") or {}
    for key in keys:
        value = heads.get(key)
        if value:
            value = str(value)
            for base in (Path.cwd(), RESOURCE_ROOT):
                if (base / value).exists():
                    return str((base / value).resolve())
            return value
    return None


if not OmegaConf.has_resolver("head"):
    OmegaConf.register_new_resolver("head", model_head)


def bench_log_dir(run_dir, stamp: str, name: str) -> str:
    """hydra.run.dir of specdec-bench: the run folder itself (runs/<time>_<model>_<method>_<bench>), or, with
    `run_dir=` set, a `logs/<time>` folder inside it (Hydra's .hydra/ and bench.log of that call), so a
    run_dir call leaves nothing under runs/ and each call's log is its own."""
    return f"runs/{stamp}_{name}" if run_dir in (None, "") else f"{run_dir}/logs/{stamp}"


if not OmegaConf.has_resolver("bench_log_dir"):
    OmegaConf.register_new_resolver("bench_log_dir", bench_log_dir)
