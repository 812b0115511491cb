"""python -m bconv.inspect: the table a newcomer sees, JSON, the PTL preview, and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bconv.inspect import main


def test_table_of_a_torchvision_model(capsys):
    assert main(["resnet18", "--input-size", "3", "64", "64"]) == 0
    out = capsys.readouterr().out
    assert "resnet18 from torchvision (random weights), input 3x64x64, 5 stages found with fx" in out
    assert "index  module  channels  reduction  output shape  layout" in out
    assert "    4  layer4       512         32  512x2x2       NCHW" in out
    # the PTL preview: a row per stage and the totals
    assert "layer3  v1 16->32 s2  32x4x4       1x1+BN+ReLU 288->32   27,744" in out
    assert "layer4  v1 32->64 s2  64x2x2       x + 1x1 64->512      106,496" in out
    assert "parameters 11,689,512 -> 11,835,080 (+145,568, +1.2%)" in out and "FLOPs      0.297G" in out


def test_timm_prefix_json_and_feature_info_source(capsys):
    assert main(["timm:resnet18", "--input-size", "3", "64", "64", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["zoo"] == "timm" and data["source"] == "feature_info"
    assert [s["name"] for s in data["stages"]] == ["act1", "layer1", "layer2", "layer3", "layer4"]
    assert data["stages"][1]["modules"] == ["maxpool", "layer1"]
    ptl = data["ptl"]
    assert ptl["added_params"] == sum(r["params"] for r in ptl["stages"]) > 0
    assert ptl["added_flops"] == sum(r["flops"] for r in ptl["stages"]) > 0


def test_nhwc_and_cell_v2_preview(capsys):
    assert main(["timm:swin_tiny_patch4_window7_224", "--cell", "v2"]) == 0
    out = capsys.readouterr().out
    assert "56x56x96      NHWC" in out and "v2 3->12 s2xs2" in out


def test_no_plan_and_source_fx(capsys):
    assert main(["timm:resnet18", "--input-size", "3", "64", "64", "--source", "fx", "--no-plan"]) == 0
    out = capsys.readouterr().out
    assert "found with fx" in out and "PTL preview" not in out


def test_unknown_name_exits_2_with_one_line_and_suggestions(capsys):
    assert main(["resnet5O"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no model named 'resnet5O'" in err and "closest: resnet50" in err
    assert main(["keras:resnet50"]) == 2
    assert "use torchvision:NAME, timm:NAME, hf-hub:timm/NAME or a bare NAME" in capsys.readouterr().err


# --------------------------------------------------------------------------- names as users copy them


@pytest.mark.parametrize("name", ["resnet50.a1_in1k", "timm/resnet50.a1_in1k", "hf-hub:timm/resnet50.a1_in1k"])
def test_timm_names_as_model_cards_print_them_resolve_to_the_tagged_timm_model(name):
    from bconv._zoo import resolve

    assert resolve(name) == resolve("timm:resnet50.a1_in1k")
    assert str(resolve(name)) == "timm:resnet50.a1_in1k"


def test_a_tagged_name_is_built_without_weights_with_its_tags_config(monkeypatch):
    import timm.models

    from bconv._zoo import build

    calls = []
    monkeypatch.setattr(timm.models, "load_pretrained", lambda *a, **k: calls.append(a))  # a download would land here
    model = build("hf-hub:timm/resnet50.a1_in1k")
    assert model.pretrained_cfg["tag"] == "a1_in1k" and calls == []


def test_inspect_takes_a_hub_name(capsys):
    assert main(["hf-hub:timm/resnet18.a1_in1k", "--input-size", "3", "64", "64", "--no-plan"]) == 0
    assert "resnet18.a1_in1k from timm (random weights)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "name, first",
    [
        ("resnet50.a1_in1kk", "resnet50.a1_in1k"),  # a misspelt tag: the model's own tags
        ("ResNet50", "resnet50"),  # case
        ("resnet50x", "resnet50"),  # the name it starts with before merely similar ones
        ("timm/resnet5O.a1_in1k", "resnet50"),
    ],
)
def test_close_names_are_suggested_best_first(name, first):
    from bconv._zoo import resolve
    from bconv.errors import UnknownModelError

    with pytest.raises(UnknownModelError, match=r"closest: ") as e:
        resolve(name)
    assert str(e.value).split("closest: ")[1].split(", ")[0] == first


def test_a_hub_repository_outside_timm_is_refused_with_what_to_pass(capsys):
    assert main(["hf-hub:facebook/convnext-tiny-224"]) == 2
    err = capsys.readouterr().err
    assert "outside timm's" in err and "timm:NAME" in err and err.count("\n") == 1


# --------------------------------------------------------------------------- the picture


def test_image_writes_an_svg_of_the_stages_and_the_ladder(tmp_path, capsys):
    import xml.etree.ElementTree as ET

    path = tmp_path / "ladder.svg"
    assert main(["resnet18", "--input-size", "3", "64", "64", "--image", str(path)]) == 0
    root = ET.parse(path).getroot()  # well-formed XML
    texts = [t.text for t in root.iter("{http://www.w3.org/2000/svg}text")]
    for stage in ("relu", "layer1", "layer2", "layer3", "layer4"):
        assert stage in texts
    assert texts.count("fuse") == 4 and texts.count("x + proj(y)") == 1
    assert sum(t.startswith("BConv-Cell v1") for t in texts) == 5
    assert any("+145,568 parameters" in t for t in texts)  # the preview's figure, not another
    # without the plan: the backbone only
    assert main(["resnet18", "--input-size", "3", "64", "64", "--no-plan", "--image", str(path)]) == 0
    texts = [t.text for t in ET.parse(path).getroot().iter("{http://www.w3.org/2000/svg}text")]
    assert "layer4" in texts and not any(t.startswith("BConv-Cell") for t in texts)


def test_model_without_spatial_stages_exits_1_without_traceback(capsys):
    assert main(["timm:crossvit_tiny_240", "--no-plan"]) == 1
    err = capsys.readouterr().err
    assert "has no spatial stages" in err and "CrossViT" in err and "Traceback" not in err


def test_a_vits_blocks_are_listed_with_their_tokens(capsys):
    assert main(["timm:vit_tiny_patch16_224"]) == 0
    out = capsys.readouterr().out
    assert "blocks.11" in out and "blocks.10" in out


def test_bad_input_size_shows_the_models_message(capsys):
    assert main(["timm:swin_tiny_patch4_window7_224", "--input-size", "3", "100", "100"]) == 1
    assert "rejected a dummy input" in capsys.readouterr().err


# Two child processes, each importing torch (about 20 s on two busy cores); the slow zoo test below runs
# `python -m bconv.inspect` too, and main() itself is tested in-process above.
@pytest.mark.slow
def test_module_entry_point_runs_as_a_newcomer_would():
    ok = subprocess.run(
        [sys.executable, "-m", "bconv.inspect", "resnet18", "--input-size", "3", "64", "64", "--no-plan"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ok.returncode == 0 and "layer4" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "bconv.inspect", "nosuchnet"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and bad.stderr.startswith("bconv.inspect: no model")


# --------------------------------------------------------------------------- every model torchvision knows


def test_every_torchvision_model_name_is_known():
    # In the default run although it walks the whole torchvision zoo: it resolves names only, building no model (< 1 s).
    import torchvision

    from bconv._zoo import resolve

    for name in torchvision.models.list_models():  # classifiers, segmentation, detection, video, flow, quantized
        assert resolve(name).zoo == "torchvision", name


def test_a_segmentation_model_shows_its_backbones_stages(capsys):
    assert main(["fcn_resnet50", "--input-size", "3", "64", "64", "--no-plan"]) == 0
    out = capsys.readouterr().out
    assert "backbone.layer4" in out and "dense prediction" in out
    # the head's modules once, and no "classifier none" after a head named classifier
    assert "head    classifier\n" in out and "classifier  none" not in out


def test_a_video_model_is_refused_with_its_reason(capsys):
    assert main(["r3d_18", "--no-plan"]) == 1
    err = capsys.readouterr().err
    assert "video (3-D) network" in err and "Conv3d" in err and "Traceback" not in err


def test_a_quantizable_model_is_inspected_as_the_float_network(capsys):
    # torchvision's quantization models are built unquantized (quantize=False): the float network.
    assert main(["quantized_mobilenet_v2", "--input-size", "3", "64", "64", "--no-plan"]) == 0
    assert "5 stages found" in capsys.readouterr().out


@pytest.mark.slow  # the whole torchvision zoo, a child process each
def test_every_torchvision_model_is_inspected_or_refused_with_a_reason():
    # Each in a child process, as a newcomer runs it: a table (0) or bconv's one-line refusal (1), never a traceback.
    import torchvision

    for name in torchvision.models.list_models():
        run = subprocess.run(
            [sys.executable, "-m", "bconv.inspect", name, "--no-plan"], capture_output=True, text=True, timeout=900
        )
        assert run.returncode in (0, 1) and "Traceback" not in run.stderr, f"{name}: {run.stderr[-2000:]}"
        if run.returncode == 1:
            assert run.stderr.startswith(f"bconv.inspect: torchvision:{name}: "), f"{name}: {run.stderr[-500:]}"
