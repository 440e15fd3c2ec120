"""The converted-model cache: a conversion killed half way leaves a temp folder that the next conversion
removes; two processes converting at once convert once (the second waits for the first's lock)."""

from __future__ import annotations

import threading
import time

from harness.infra.locks import hold
from harness.model import loading
from tests.conftest import compose_config


def fake_convert(calls):
    def convert(cfg, out):
        calls.append(out)
        time.sleep(0.3)
        tmp = out.parent / f".{out.name}-fake"
        tmp.mkdir()
        (tmp / "config.json").write_text("{}")
        tmp.rename(out)
    return convert


def test_a_killed_conversions_temp_folder_is_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    cfg = compose_config().model
    out = loading.gguf_cache_dir(cfg)
    stale = out.parent / f".{out.name}-k1ll3d"
    (stale / "half").mkdir(parents=True)                       # what a kill -9 during save_pretrained leaves
    calls = []
    monkeypatch.setattr(loading, "_convert", fake_convert(calls))
    assert loading.convert_gguf(cfg) == out and (out / "config.json").is_file()
    assert not stale.exists() and calls == [out]
    assert loading.convert_gguf(cfg) == out and calls == [out]  # cached: no second conversion


def test_a_second_converter_waits_for_the_first(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    cfg = compose_config().model
    out = loading.gguf_cache_dir(cfg)
    calls = []
    monkeypatch.setattr(loading, "_convert", fake_convert(calls))
    release = threading.Event()

    def first_holder():                                         # another process mid-conversion
        with hold(out.parent, "model cache", out.name):
            release.wait(5)
            fake_convert(calls)(cfg, out)

    holder = threading.Thread(target=first_holder)
    holder.start()
    time.sleep(0.2)
    threading.Timer(1.0, release.set).start()
    started = time.monotonic()
    assert loading.convert_gguf(cfg) == out
    holder.join()
    assert time.monotonic() - started >= 0.9 and calls == [out]   # waited, and did not convert again
