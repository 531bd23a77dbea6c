from __future__ import annotations

from pathlib import Path

import torch

import segtorch

ROOT = Path(__file__).resolve().parents[1]


def test_every_model_is_an_entry_point():
    import importlib.util

    spec = importlib.util.spec_from_file_location("hubconf", ROOT / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    for name in segtorch.list_models() + ["upernet_swinlarge_ade20k"]:
        assert callable(getattr(hubconf, name)), name


def test_torch_hub_load_local(tmp_path):
    name = "pspnet_resnet50os8_voc"
    model = torch.hub.load(str(ROOT), name, source="local", pretrained=False)
    assert type(model).__name__ == "PSPNet"
    ckpt = tmp_path / "w.pth"
    torch.save({"model": model.state_dict()}, ckpt)
    loaded = torch.hub.load(str(ROOT), name, source="local", checkpoint=str(ckpt))
    assert not loaded.training
    seg = torch.hub.load(str(ROOT), name, source="local", checkpoint=str(ckpt), segmenter=True)
    assert isinstance(seg, segtorch.Segmenter)
    x = torch.randn(1, 3, 33, 41)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model.eval()(x), rtol=1e-5, atol=1e-5)
