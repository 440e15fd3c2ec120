"""Published draft heads, mapped onto this project's head classes (no code from their repos runs here).

EAGLE (yuhuili/EAGLE-Vicuna-7B-v1.3, EAGLE-LLaMA2-Chat-7B, EAGLE-LLaMA3-Instruct-8B, ...; EAGLE-1 and
EAGLE-2 share these checkpoints): `config.json` (a Llama config with num_hidden_layers = 1, optional
`bias` for fc) + `pytorch_model.bin` or `model.safetensors` holding the official cnets.py `Model`:
    embed_tokens.weight                          a copy of the target's embedding (dropped; checked)
    fc.weight [H, 2H], fc.bias [H]               fc.bias absent = bias-free fc (EAGLE sets bias that way)
    layers.{i}.self_attn.{q,k,v,o}_proj.weight   layers.{i}.mlp.{gate,up,down}_proj.weight
    layers.{i}.post_attention_layernorm.weight   layers.{i>0}.input_layernorm.weight (none in layer 0)
Our EagleHead uses the same names, so the mapping is: drop embed_tokens and rotary buffers, keep the rest.

Medusa (FasterDecoding/medusa-vicuna-7b-v1.3, ...): `config.json` {medusa_num_heads, medusa_num_layers,
base_model_name_or_path} + `medusa_lm_head.pt` (or .safetensors) = `medusa_head.state_dict()` of
nn.ModuleList(Sequential(ResBlock * L, Linear(H, V, bias=False)) * K):
    {h}.{l}.linear.weight / .bias                residual block l of head h
    {h}.{L}.weight                               head h's own lm_head
which is baselines/medusa.py MedusaHead(own_lm_head=True) with the `medusa_head.` prefix. K is counted from
the weights, not config.json: medusa-vicuna-7b/13b-v1.3 say `medusa_num_heads: 2` but hold 5 heads (keys `0.*`
.. `4.*`, lmdeploy issue #1180), and the official MedusaModel.from_pretrained forces 5 ("TODO: fix the uploaded
config (only include 2 heads)") and loads non-strictly; Spec-Bench builds 4 (inference_medusa.py num_heads = 4).
We load every head the weights hold, or the first `max_heads` of them (the method's medusa_num_heads), and,
unlike strict=False, refuse a key the layout does not explain or a missing / misshapen tensor.

A foreign `.bin`/`.pt` is read with torch.load(weights_only=True) only: plain tensors, never pickled code.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from harness.errors import HarnessError

log = logging.getLogger(__name__)

EAGLE_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
MEDUSA_WEIGHTS = ("medusa_lm_head.safetensors", "medusa_lm_head.pt")


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not folder.is_dir():
        raise HarnessError(f"official head folder {folder} does not exist; download the published head there "
                           f"(config.json + weights) and point method.head_path at it")
    if not path.is_file():
        raise HarnessError(f"{folder} has no config.json; a published head folder holds config.json + its weights")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise HarnessError(f"{path} is not valid JSON ({exc}); re-download the head") from exc


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """safetensors, or a torch pickle read as plain tensors only (weights_only=True)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch/safetensors raise several types for a bad file
        raise HarnessError(f"{path} cannot be read as plain tensors ({type(exc).__name__}); re-download it or "
                           f"convert it to safetensors") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise HarnessError(f"{path} is not a flat state dict of tensors; is it a published head checkpoint?")
    return dict(state)


def _weights(folder: Path, names: tuple[str, ...], kind: str) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise HarnessError(f"{folder} has none of {', '.join(names)}; download the published {kind} weights there")


def is_official(folder: str | Path) -> str | None:
    """'eagle' / 'medusa' when `folder` looks like a published checkpoint (no head_config.json), else None."""
    folder = Path(folder)
    if not (folder / "config.json").is_file() or (folder / "head_config.json").is_file():
        return None
    if any((folder / name).is_file() for name in MEDUSA_WEIGHTS):
        return "medusa"
    if any((folder / name).is_file() for name in EAGLE_WEIGHTS):
        return "eagle"
    return None


def _check_dims(config: dict, loaded, folder: Path, kind: str) -> None:
    target = loaded.model.config
    for key in ("hidden_size", "vocab_size"):
        theirs, ours = config.get(key), getattr(target, key, None)
        if theirs is not None and theirs != ours:
            raise HarnessError(f"{kind} head {folder} has {key}={theirs} but the target has {ours}; pick the head "
                               f"published for this model (or the model it was trained for)")


# ---------------------------------------------------------------------------------------------
# EAGLE


def eagle_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official EAGLE keys -> EagleHead keys (the same names, less the embedding copy and rotary buffers)."""
    return {key: value for key, value in tensors.items()
            if key != "embed_tokens.weight" and not key.endswith("rotary_emb.inv_freq")}


def load_official_eagle(folder: str | Path, loaded):
    """A published EAGLE(-2) head folder -> EagleHead on loaded's device and dtype, eval, frozen."""
    from baselines.eagle import EagleHead, arch_from_config
    from harness.heads import build_head

    folder = Path(folder)
    config = _read_config(folder)
    _check_dims(config, loaded, folder, "EAGLE")
    tensors = read_tensors(_weights(folder, EAGLE_WEIGHTS, "EAGLE"))
    if "fc.weight" not in tensors:
        raise HarnessError(f"{folder} has no fc.weight: not an EAGLE-1/2 head (EAGLE-3 heads are not supported)")
    embedding = tensors.get("embed_tokens.weight")
    target_embedding = loaded.model.get_input_embeddings().weight
    if embedding is not None and embedding.shape == target_embedding.shape:
        rows = torch.linspace(0, embedding.shape[0] - 1, 16).long()
        ours = target_embedding.detach()[rows.to(target_embedding.device)].float().cpu()
        if not torch.allclose(embedding[rows].float(), ours, rtol=2e-2, atol=1e-3):
            raise HarnessError(f"EAGLE head {folder} carries another model's embedding; pick the head published "
                               f"for this target model")
    layers = 1 + max(int(key.split(".")[1]) for key in tensors if key.startswith("layers."))
    kwargs = arch_from_config(config)
    kwargs.update(hidden_size=int(config.get("hidden_size", loaded.model.config.hidden_size)),
                  vocab_size=int(config.get("vocab_size", loaded.model.config.vocab_size)),
                  num_layers=layers, fc_bias="fc.bias" in tensors)
    head: EagleHead = build_head("eagle", loaded.model.config, **kwargs)
    state = eagle_state_dict(tensors)
    expected = head.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise HarnessError(f"{folder} does not have the EAGLE layout (missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]}); is it an EAGLE-1/2 head?")
    for key, value in expected.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise HarnessError(f"{folder}: {key} has shape {tuple(state[key].shape)}, its config.json needs "
                               f"{tuple(value.shape)}; re-download the head")
    head.load_state_dict(state)
    log.info("loaded the published EAGLE head %s (%d layer(s), fc bias %s)", folder, layers, "fc.bias" in tensors)
    return head.to(device=loaded.device, dtype=loaded.dtype).eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# Medusa


def medusa_heads_in(tensors: dict[str, torch.Tensor]) -> int:
    """How many heads the weights hold: the distinct `{h}.` indices (the config.json count can be wrong)."""
    return len({key.split(".", 1)[0] for key in tensors if key.split(".", 1)[0].isdigit()})


def medusa_state_dict(tensors: dict[str, torch.Tensor], num_heads: int, num_layers: int) -> dict[str, torch.Tensor]:
    """Official `medusa_lm_head` keys ({h}.{l}.linear.weight/bias, {h}.{L}.weight) -> MedusaHead keys
    (`medusa_head.` + the same), checking that every head has its blocks and its own lm_head and that no key
    is left unexplained (the official loader's strict=False would skip both silently)."""
    names = {h: [f"{h}.{l}.linear.{part}" for l in range(num_layers) for part in ("weight", "bias")]
             + [f"{h}.{num_layers}.weight"] for h in range(num_heads)}
    for head_names in names.values():
        for name in head_names:
            if name not in tensors:
                raise HarnessError(f"the Medusa checkpoint lacks {name} (its weights hold {num_heads} heads, its "
                                   f"config.json says {num_layers} layer(s) each); re-download it or fix config.json")
    extra = sorted(set(tensors) - {name for head_names in names.values() for name in head_names})
    if extra:
        raise HarnessError(f"the Medusa checkpoint has keys its layout does not explain ({extra[:3]}); is it a "
                           f"Medusa-1 head with medusa_num_layers={num_layers} as its config.json says?")
    return {f"medusa_head.{name}": tensors[name] for head_names in names.values() for name in head_names}


def load_official_medusa(folder: str | Path, loaded, max_heads: int | None = None):
    """A published Medusa-1 head folder -> MedusaHead(own_lm_head=True) on loaded's device and dtype, with every
    head the weights hold (as the official loader), or the first `max_heads` (method.medusa_num_heads)."""
    from harness.heads import build_head

    folder = Path(folder)
    config = _read_config(folder)
    tensors = read_tensors(_weights(folder, MEDUSA_WEIGHTS, "Medusa"))
    tensors = {key.removeprefix("medusa_head."): value for key, value in tensors.items()}
    try:
        num_layers = int(config["medusa_num_layers"])
    except (KeyError, TypeError, ValueError) as exc:
        raise HarnessError(f"{folder}/config.json lacks medusa_num_layers (a Medusa config.json has "
                           f"medusa_num_heads and medusa_num_layers); is it a Medusa head?") from exc
    stored = medusa_heads_in(tensors)
    if stored == 0:
        raise HarnessError(f"{folder} holds no Medusa head weights ({{h}}.{{l}}.linear.weight ...); is it a "
                           f"Medusa-1 head?")
    said = config.get("medusa_num_heads")
    if said is not None and said != stored:
        log.info("%s: config.json says %s heads, the weights hold %d: using %d, as the official loader does",
                 folder, said, stored, stored)
    used = stored if max_heads is None else min(stored, int(max_heads))
    if used < 1:
        raise HarnessError(f"method.medusa_num_heads={max_heads}: use at least 1 of the {stored} heads in {folder}")
    if used < stored:
        log.info("%s: using the first %d of its %d heads (method.medusa_num_heads=%s)", folder, used, stored, max_heads)
    lm_head = tensors.get(f"0.{num_layers}.weight")
    if lm_head is not None and lm_head.dim() == 2:
        _check_dims({"vocab_size": lm_head.shape[0], "hidden_size": lm_head.shape[1]}, loaded, folder, "Medusa")
    base = config.get("base_model_name_or_path")
    if base:
        log.info("published Medusa head %s was trained for %s", folder, base)
    state = medusa_state_dict(tensors, stored, num_layers)
    head = build_head("medusa", loaded.model.config, medusa_num_heads=used, medusa_num_layers=num_layers,
                      own_lm_head=True)
    expected = head.state_dict()
    for key, value in state.items():       # every stored head, used or not, has head 0's shapes in our class
        need = tuple(expected["medusa_head.0." + key.split(".", 2)[2]].shape)
        if tuple(value.shape) != need:
            raise HarnessError(f"{folder}: {key} has shape {tuple(value.shape)}, this target needs {need}; pick "
                               f"the head published for this model")
    head.load_state_dict({key: value for key, value in state.items() if int(key.split(".")[1]) < used})
    return head.to(device=loaded.device, dtype=loaded.dtype).eval().requires_grad_(False)


def load_official(folder: str | Path, loaded, head_type: str):
    """The published head in `folder` as our `head_type` head (for a decoder's `official: true`)."""
    loaders = {"eagle": load_official_eagle, "medusa": load_official_medusa}
    if head_type not in loaders:
        raise HarnessError(f"no published-checkpoint mapping for {head_type} heads (only eagle and medusa)")
    return loaders[head_type](folder, loaded)
