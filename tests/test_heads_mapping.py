"""Each method with its own head in one sweep: the model config's `heads` mapping (folder or Hub id) that every
head method reads through `${head:<key>}`, the published ids filled in for the team's GPU targets, a head method
with no head refused before anything loads (unless allow_untrained=true), and Hub ids fetched through
huggingface_hub's cache (mocked here: no test reaches the Hub)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import get_class

from harness import CONF_DIR, REPO_ROOT
from harness.bench import build_method, check_head, run_bench
from harness.heads.checkpoint import locate
from harness.infra.errors import HarnessError
from tests.conftest import compose_config, make_tiny_llama
from tests.helpers import as_loaded, greedy, single_thread
from tests.test_official import medusa_checkpoint, write_medusa

MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
HEAD_METHODS = sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml")
                      if getattr(get_class(compose_config(f"method={p.stem}").method._target_), "head_type", None))


def head_of(*overrides: str):
    return compose_config(*overrides).method.head_path


def test_the_head_methods_are_the_ones_with_a_head_path():
    assert {"eagle", "eagle2", "eagle2_cpu", "medusa", "medusa_typical", "medusa_cpu", "ours",
            "ours_no_trigram"} <= set(HEAD_METHODS)
    for method in HEAD_METHODS:
        assert "head_path" in compose_config(f"method={method}").method


def test_every_model_config_lists_every_key_the_methods_read():
    import re

    read = {key.strip() for p in (CONF_DIR / "method").glob("*.yaml")
            for found in re.findall(r"\$\{head:([^}]*)\}", p.read_text()) for key in found.split(",")}
    assert read == {"eagle", "eagle2", "medusa", "medusa1", "ours", "ours_no_trigram"}
    for model in MODELS:   # every key present (null or not), so `model.heads.<key>=` overrides without a `+`
        assert set(compose_config(f"model={model}").model.heads) == read, model


def test_the_published_heads_are_filled_in_for_the_gpu_targets():
    vicuna7b = ("experiment=gpu_vicuna7b",)
    assert head_of(*vicuna7b, "method=eagle") == "yuhuili/EAGLE-Vicuna-7B-v1.3"
    assert head_of(*vicuna7b, "method=eagle2") == "yuhuili/EAGLE-Vicuna-7B-v1.3"    # EAGLE-2 runs EAGLE-1's weights
    assert head_of(*vicuna7b, "method=medusa") == "FasterDecoding/medusa-vicuna-7b-v1.3"
    assert head_of(*vicuna7b, "method=medusa_typical") == "FasterDecoding/medusa-vicuna-7b-v1.3"
    assert head_of(*vicuna7b, "method=ours") is None             # the team's own: they point it at their training run
    assert head_of("model=vicuna-13b-v1.3", "method=medusa") == "FasterDecoding/medusa-vicuna-13b-v1.3"
    for size in ("7B", "13B", "70B"):
        model = f"model=llama2-{size.lower()}-chat"
        assert head_of(model, "method=eagle2") == f"yuhuili/EAGLE-llama2-chat-{size}"
        assert head_of(model, "method=medusa") is None           # none published for Llama-2-chat
    # the default model: the heads this repository ships, as absolute folders (any working directory)
    assert head_of("method=eagle") == str(REPO_ROOT / "heads" / "smollm2-135m" / "eagle")
    assert head_of("method=ours_no_trigram") == str(REPO_ROOT / "heads" / "smollm2-135m" / "ours_no_trigram")


def test_one_sweep_gives_each_method_its_own_head(tmp_path):
    mine = tmp_path / "ours-head"
    mine.mkdir()
    overrides = ("experiment=gpu_vicuna7b", f"model.heads.ours={mine}", "model.heads.eagle2=someone/eagle2-head")
    assert head_of(*overrides, "method=ours") == str(mine)
    assert head_of(*overrides, "method=eagle2") == "someone/eagle2-head"
    assert head_of(*overrides, "method=eagle") == "yuhuili/EAGLE-Vicuna-7B-v1.3"   # untouched by eagle2's entry
    assert head_of(*overrides, "method=medusa") == "FasterDecoding/medusa-vicuna-7b-v1.3"
    # a method-level head_path still wins for the one method it is given to
    assert head_of(*overrides, "method=eagle", "method.head_path=x/y") == "x/y"


@pytest.mark.parametrize("model", MODELS)
def test_every_head_method_on_every_model_has_a_head_or_is_refused_before_loading(model, tmp_path):
    for method in HEAD_METHODS:
        cfg = compose_config(f"model={model}", f"method={method}", "model.path=/nowhere/model", "logger=none",
                             f"run_dir={tmp_path / method}")
        if cfg.method.head_path:
            continue
        with pytest.raises(HarnessError) as caught:
            run_bench(cfg, tmp_path / method)
        message = str(caught.value)
        assert "\n" not in message and "allow_untrained=true" in message and "model.heads." in message
        assert not (tmp_path / method).exists()            # refused before the run folder or the model


def test_the_refusal_names_the_key_the_method_reads(tmp_path):
    cfg = compose_config("model=llama2-7b-chat", "method=medusa", "logger=none")
    with pytest.raises(HarnessError, match=r"model\.heads\.medusa is empty.*allow_untrained=true"):
        check_head(cfg.method, cfg.model.name, allow_untrained=False)
    cfg = compose_config("model=vicuna-7b-v1.5", "method=eagle2_cpu", "logger=none")
    with pytest.raises(HarnessError, match=r"model\.heads\.eagle2 is empty"):
        check_head(cfg.method, cfg.model.name, allow_untrained=False)
    check_head(cfg.method, cfg.model.name, allow_untrained=True)
    assert build_method(cfg.method).head_path is None


def test_a_hub_id_is_fetched_through_the_hub_cache_and_loads_as_published(tmp_path, monkeypatch):
    import huggingface_hub

    tiny = make_tiny_llama()
    folder = write_medusa(tmp_path / "cache" / "medusa-vicuna-tiny", medusa_checkpoint(5, 1), heads=2, layers=1)
    asked = []

    def fake_download(repo_id, allow_patterns=None, **kwargs):
        asked.append((repo_id, allow_patterns))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    cfg = compose_config("experiment=gpu_vicuna7b", "method=medusa")
    check_head(cfg.method, cfg.model.name, allow_untrained=False)      # the Hub id counts as a head
    proposer = build_method(cfg.method)
    with single_thread():
        proposer.setup(as_loaded(tiny))
        assert asked == [("FasterDecoding/medusa-vicuna-7b-v1.3", ["*.json", "*.safetensors", "*.bin", "*.pt"])]
        assert proposer.head.num_positions == 4      # the published 5 heads, capped at Spec-Bench's 4 (medusa.yaml)
        prompt = [1, 5, 9, 14, 3]
        from tests.helpers import decode

        assert decode(tiny, proposer, prompt, 24).token_ids == greedy(tiny, prompt, 24)


def test_a_head_that_is_neither_a_folder_nor_reachable_is_one_line(tmp_path, monkeypatch):
    import huggingface_hub

    def offline(repo_id, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files\nand more")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(HarnessError) as caught:
        locate("yuhuili/EAGLE-Vicuna-7B-v1.3")
    message = str(caught.value)
    assert "\n" not in message and "huggingface-cli download yuhuili/EAGLE-Vicuna-7B-v1.3" in message
    assert "model.heads.<method>=DIR" in message
    with pytest.raises(HarnessError, match="does not exist"):
        locate(str(tmp_path / "missing" / "head"))
    assert locate(str(tmp_path)) == Path(tmp_path)
