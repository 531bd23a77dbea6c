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


def test_torch_hub_load_local_gives_the_checkpoints_network(tmp_path):
    """As the module docstring documents it: torch.hub.load(clone, name, source="local")."""
    name = "pspnet_resnet50os8_voc"
    model = torch.hub.load(str(ROOT), name, source="local", pretrained=False)
    assert type(model).__name__ == "PSPNet"
    state = {k: v + 0.01 * torch.rand_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    ckpt = tmp_path / "w.pth"
    torch.save({"model": state}, ckpt)
    loaded = torch.hub.load(str(ROOT), name, source="local", checkpoint=str(ckpt))
    assert not loaded.training
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in loaded.modules())
    assert all(p.requires_grad and p.dtype == torch.float32 and p.is_contiguous() for p in loaded.parameters())
    fresh = segtorch.create_model(name)
    fresh.load_state_dict(loaded.state_dict(), strict=True)
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
    seg = torch.hub.load(str(ROOT), name, source="local", checkpoint=str(ckpt), segmenter=True)
    assert isinstance(seg, segtorch.Segmenter)
    x = torch.randn(1, 3, 33, 41)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), fresh(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(seg.model(x), fresh(x), rtol=1e-5, atol=1e-5)
