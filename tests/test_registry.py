from __future__ import annotations

import pytest

import segtorch


def test_list_models_patterns_and_filters():
    assert len(segtorch.list_models("*")) == len(segtorch.list_models())
    isnet = segtorch.list_models("isnet_*")
    assert len(isnet) == 12 and isnet == sorted(isnet)
    assert segtorch.list_models("upernet_swin*") == ["idrnet_upernet_swinlarge_ade20k"]  # through the alias
    assert all(segtorch.model_card(n).dataset == "lip" for n in segtorch.list_models(dataset="lip"))
    assert len(segtorch.list_models(family="pspnet")) == 12
    assert segtorch.list_models("pspnet_*", backbone="R-101-D16") == [
        "pspnet_resnet101os16_ade20k", "pspnet_resnet101os16_cityscapes", "pspnet_resnet101os16_voc"]
    assert segtorch.list_models("nothing_like_this*") == []


def test_unknown_name_suggests_close_matches():
    with pytest.raises(segtorch.UnknownModelError, match="did you mean isnet_resnet101os8_ade20k"):
        segtorch.model_card("isnet_resnet101_ade20k")
    with pytest.raises(KeyError):  # also a KeyError, as a mapping lookup would be
        segtorch.model_card("nope")


@pytest.mark.parametrize("name", ["../etc/passwd", "/tmp/x", "pspnet_resnet50os8_ade20k/..", "a\\b", "", "PSPNET"])
def test_path_like_names_never_reach_the_file_system(name, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the file system was touched")

    import segtorch.registry as registry

    registry._registry()  # cards already read
    monkeypatch.setattr(registry.Path, "open", forbidden)
    with pytest.raises(segtorch.UnknownModelError, match="not a model name|unknown model"):
        segtorch.model_card(name)


def test_hf_org_override(monkeypatch):
    monkeypatch.setenv("SEGTORCH_HF_ORG", "my-org")
    assert segtorch.model_card("pspnet_resnet50os8_ade20k").hub["repo"] == "my-org/pspnet_resnet50os8_ade20k"


def test_import_is_light():
    import subprocess
    import sys

    code = ("import sys, segtorch; segtorch.list_models(); segtorch.model_card('isnet_resnet101os8_ade20k'); "
            "print(','.join(m for m in ('torch', 'numpy', 'cv2', 'requests', 'huggingface_hub') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"import segtorch pulled in {out}"
