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
    assert "use torchvision:NAME or timm:NAME" in capsys.readouterr().err


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
    assert "backbone.layer4" in out and "pooling     none" in out


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
