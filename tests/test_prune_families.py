"""COP on the families Torch-Pruning alone cannot carry (bconv.prune.graph): each pruned to its target with its
output shape, trained a step, saved and replayed; index mappings checked by pruning a channel that contributes
nothing (the output must not move); the tolerance judged on what remains."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from bconv.prune import COPImportance, PruneTargetError, cop_prune, format_report, load_pruned, save_pruned

SMALL = (3, 32, 32)
ONLY_REDUNDANCY = COPImportance(1.0, 0.0, 0.0)  # COP's redundancy term alone: the released r_i decides


def prune_train_replay(build, ratio=0.5, input_size=SMALL, **kwargs):
    """Prune a fresh ``build()`` to ``ratio`` of its FLOPs, check the output shape, train one step, save it and
    replay the save on another fresh ``build()``: the replay computes exactly what the trained model computes."""
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(4, *input_size)
    shape = model(x).shape
    result = cop_prune(model, input_size, ratio=ratio, metric="flops", **kwargs)
    assert abs(result.report.achieved - ratio) <= result.report.tolerance, format_report(result.report)
    assert result.report.layers, "nothing was narrowed"
    assert model(x).shape == shape
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    before = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    optimizer.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    return model.eval(), result, x


def replays(model, result, x, build, tmp_path):
    save_pruned(result, tmp_path / "pruned.pt")
    loaded = load_pruned(build(), tmp_path / "pruned.pt").eval()
    return torch.equal(loaded(x), model(x))


def one_cut(model, per_cut=1, **kwargs):
    """Cut one channel of one group (COP's redundancy alone decides which; a depthwise layer coupled to it counts
    its channel too) and return the result and ``(layer, is_out, [index])``."""
    channels = sum(m.out_features if isinstance(m, nn.Linear) else m.out_channels for m in model.modules()
                   if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)))  # fmt: skip
    result = cop_prune(model, SMALL, ratio=per_cut / channels, metric="channels", importance=ONLY_REDUNDANCY,
                       tolerance=0.5 / channels, **kwargs)  # fmt: skip
    assert len(result.history) == 1 and len(result.history[0][2]) == 1
    return result, result.history[0]


def skipped_because(result, words):
    return [name for name, why in result.report.skipped if words in why]


# ---------------------------------------------------------------- channel shuffle (torchvision's ShuffleNetV2)


def shufflenet():
    return torchvision.models.ShuffleNetV2([1, 1, 1], [8, 16, 32, 64, 128], num_classes=10)


def test_shufflenet_prunes_the_branches_and_keeps_the_shuffled_channels(tmp_path):
    # Torch-Pruning 1.6 divided by zero building this graph; it reads the shuffle's transpose as elementwise,
    # so a group crossing it would cut the wrong channels: those groups are not pruned, the branches' insides are.
    model, result, x = prune_train_replay(shufflenet)
    reference = shufflenet()
    assert skipped_because(result, "channel shuffle")
    for stage in ("stage2", "stage3", "stage4"):
        for block, original in zip(getattr(model, stage), getattr(reference, stage)):
            assert block.branch2[5].out_channels == original.branch2[5].out_channels  # crosses the shuffle
    assert any(b.branch2[0].out_channels < 16 for b in model.stage3)
    assert replays(model, result, x, shufflenet, tmp_path)


def test_cops_choice_inside_a_shufflenet_branch_is_the_released_redundancy():
    # branch2[0]'s channels are read through the depthwise branch2[3] by the pointwise branch2[5]: COP correlates
    # them through that kernel. Nearly rank-one columns make this group the most redundant of stage3, and the
    # released formula's most redundant channel of it (an exact duplicate pair) is the one cut.
    from test_cop_released import released_matrix, released_normalized, released_redundancy

    model = shufflenet().eval()
    consumer = model.stage3[0].branch2[5]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        w = torch.outer(torch.randn(16, generator=g), torch.randn(16, generator=g))
        w += 0.05 * torch.randn(16, 16, generator=g)
        w[:, 5] = 2 * w[:, 2] + 0.1
        consumer.weight.copy_(w[:, :, None, None])
    released = released_redundancy(released_normalized(released_matrix(w.T.reshape(1, 1, 16, 16).double().numpy(),
                                                                       "pearson"), "max"), 3)  # fmt: skip
    _, (name, is_out, idxs) = one_cut(model, per_cut=2, protect=["conv1", "stage2", "stage4", "conv5"])
    assert name in ("stage3.0.branch2.0", "stage3.0.branch2.3") and is_out  # the group's pointwise or depthwise
    assert released[idxs[0]] == pytest.approx(released.max())


# ---------------------------------------------------------------- split into fixed widths (Res2Net)


def res2net():
    from timm.models.res2net import Bottle2neck
    from timm.models.resnet import ResNet

    return ResNet(block=Bottle2neck, layers=[1, 1, 1, 1], base_width=26, block_args=dict(scale=4), num_classes=10)


@pytest.mark.slow  # a 4-stage Res2Net: several seconds
def test_res2net_keeps_the_split_widths_and_prunes_the_rest(tmp_path):
    # torch.split(out, self.width): the widths are the forward's numbers, which pruning cannot update.
    model, result, x = prune_train_replay(res2net)
    assert skipped_because(result, "fixed widths")
    assert all(b.conv1.out_channels == 4 * b.width for layer in (model.layer1, model.layer4) for b in layer)
    assert replays(model, result, x, res2net, tmp_path)


# ---------------------------------------------------------------- gated MLPs (SwiGLU: EVA-02, DeepSeek's ViT)


class GatedMLP(nn.Module):
    """timm's GluMlp: ``x1, x2 = fc1(x).chunk(2)``, ``fc2(x1 * silu(x2))``; ``split=24`` splits at a fixed width."""

    def __init__(self, split=None):
        super().__init__()
        self.fc1, self.fc2, self.split = nn.Linear(16, 48), nn.Linear(24, 16), split

    def forward(self, x):
        x = self.fc1(x)
        a, b = torch.split(x, self.split, -1) if self.split else x.chunk(2, dim=-1)
        return self.fc2(a * F.silu(b))


class GatedTokens(nn.Module):
    def __init__(self, split=None):
        super().__init__()
        self.embed, self.mlp, self.head = nn.Conv2d(3, 16, 4, stride=4), GatedMLP(split), nn.Linear(16, 10)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        return self.head((t + self.mlp(t)).mean(1))


def test_gated_mlp_halves_are_pruned_together(tmp_path):
    # The chunk was a split into fixed widths, never followed: EVA-02 and DeepSeek's ViT had no prunable channel.
    model, result, x = prune_train_replay(GatedTokens)
    hidden = model.mlp.fc2.in_features
    assert hidden < 24 and model.mlp.fc1.out_features == 2 * hidden
    assert replays(model, result, x, GatedTokens, tmp_path)


def test_gated_mlp_cut_removes_the_same_unit_from_both_halves():
    # Units 3 and 10 contribute nothing (fc2 never reads them): COP cuts them first, and only fc1's rows 3, 10, 27
    # and 34 may go with them; any other pairing would gate one unit by another's value.
    torch.manual_seed(0)
    model, x = GatedTokens().eval(), torch.randn(2, *SMALL)
    with torch.no_grad():
        model.mlp.fc2.weight[:, [3, 10]] = 0.0
    rows, before = model.mlp.fc1.weight.detach().clone(), model(x)
    cop_prune(model, SMALL, ratio=4 / 90, metric="channels", importance=ONLY_REDUNDANCY,
              tolerance=0.1 / 90)  # 16 + 48 + 16 + 10 output channels  # fmt: skip
    keep = [i for i in range(48) if i not in (3, 10, 27, 34)]
    assert torch.equal(model.mlp.fc1.weight, rows[keep])
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)


def test_cops_choice_of_a_gated_unit_is_the_released_redundancy_of_its_column():
    # A unit's channels (one in each half) are read through one column of fc2: its redundancy is the released
    # formula's on fc2's columns, unit by unit. Unit 7 duplicates unit 2's column (scaled): the most redundant.
    from test_cop_released import released_matrix, released_normalized, released_redundancy

    model = GatedTokens().eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        w = torch.randn(16, 24, generator=g)
        w[:, 7] = 2 * w[:, 2] + 0.1
        model.mlp.fc2.weight.copy_(w)
    released = released_redundancy(released_normalized(released_matrix(w.T.reshape(1, 1, 24, 16).double().numpy(),
                                                                       "pearson"), "max"), 3)  # fmt: skip
    result = cop_prune(model, SMALL, ratio=2 / 90, metric="channels", importance=ONLY_REDUNDANCY,
                       tolerance=0.1 / 90, protect=["embed"])  # fmt: skip
    [(name, is_out, idxs)] = result.history
    assert name == "mlp.fc1" and is_out and len(idxs) == 2 and idxs[1] == idxs[0] + 24
    assert released[idxs[0]] == pytest.approx(released.max())


def test_a_fixed_width_split_that_looks_gated_is_kept_whole():
    # torch.split(x, 24) into equal halves is followed like a chunk and fails once pruned (24 no longer halves it):
    # its module is kept whole. Here that leaves nothing (the stream crosses it), so the call is refused unchanged.
    model, x = GatedTokens(split=24).eval(), torch.randn(2, *SMALL)
    before = model(x)
    with pytest.raises(PruneTargetError, match="inside a GatedMLP, whose forward failed once pruned"):
        cop_prune(model, SMALL, ratio=0.2, metric="flops")
    assert model.mlp.fc1.out_features == 48 and torch.equal(model(x), before)


class Ghosted(nn.Module):
    """GhostNet's pattern: a ghost module (a layer and its depthwise copy, concatenated), a depthwise layer and a
    squeeze-excite gate over the concatenation: one channel of the gate drags channel c and c + 32 along."""

    def __init__(self):
        super().__init__()
        from timm.models.ghostnet import GhostModule

        self.ghost, self.dw = GhostModule(3, 64), nn.Conv2d(64, 64, 3, padding=1, groups=64)
        self.gate, self.head = nn.Conv2d(64, 64, 1), nn.Linear(64, 10)

    def forward(self, x):
        y = self.dw(self.ghost(x))
        y = y * torch.sigmoid(self.gate(y.mean((2, 3), keepdim=True)))
        return self.head(y.mean((2, 3)))


@pytest.mark.parametrize("seed", range(4))
def test_channels_that_drag_their_twin_along_move_in_units(seed, tmp_path):
    # The planner counted the gate's 64 channels as 64 units; Torch-Pruning cut each with its twin, so later
    # positions were off by the twins already gone (ghostnet_050 failed on some random weights).
    torch.manual_seed(seed)
    model, result, x = prune_train_replay(Ghosted, ratio=0.3)
    half = model.ghost.primary_conv[0].out_channels
    assert half < 32 and model.gate.out_channels == model.dw.out_channels == 2 * half
    assert replays(model, result, x, Ghosted, tmp_path)


# ---------------------------------------------------------------- concatenations Torch-Pruning could not size


class PatchMerging(nn.Module):
    """Swin's patch merging on NHWC tokens: four strided slices concatenated on the channels (dim -1)."""

    def __init__(self, c=12):
        super().__init__()
        self.embed = nn.Conv2d(3, c, 4, stride=4)
        self.mix = nn.Linear(c, c)
        self.reduce = nn.Linear(4 * c, 2 * c)
        self.head = nn.Linear(2 * c, 10)

    def forward(self, x):
        x = F.gelu(self.mix(self.embed(x).permute(0, 2, 3, 1)))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.head(self.reduce(x).mean((1, 2)))


class ScaledPatchMerging(PatchMerging):
    """The same after a 3-D parameter (Swin V2's logit scales are [heads, 1, 1]): Torch-Pruning turns off the index
    mapping of every concatenation downstream of one (its guard for a ViT's class token)."""

    def __init__(self, c=12):
        super().__init__(c)
        self.scale = nn.Parameter(torch.ones(1, 1, c))

    def forward(self, x):
        x = F.gelu(self.mix(self.embed(x).permute(0, 2, 3, 1)) * self.scale)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.head(self.reduce(x).mean((1, 2)))


class DualPath(nn.Module):
    """DPN's and CSPNet's pattern: a concatenation of a sum and of another layer's output."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(3, 6, 3)
        self.out = nn.Conv2d(14, 16, 1)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        a = torch.relu(self.a(x))
        joined = torch.cat([a + self.b(a), F.interpolate(self.c(x), size=a.shape[2:])], 1)
        return self.head(self.out(torch.relu(joined)).mean((2, 3)))


@pytest.mark.parametrize("build, producer, consumer, offsets", [
    (PatchMerging, "mix", "reduce", (0, 12, 24, 36)),  # each of the 4 slices holds all 12 channels
    (ScaledPatchMerging, "mix", "reduce", (0, 12, 24, 36)),
    (DualPath, "c", "out", (8,)),  # c's channels come after the sum's 8
])  # fmt: skip
def test_concatenation_offsets_are_exact(build, producer, consumer, offsets, tmp_path):
    # Torch-Pruning summed None widths here (TypeError). A channel whose every consumer column is zero contributes
    # nothing: COP cuts it first, and the output does not move only if the concatenation maps it to those columns.
    model = build().eval()
    x = torch.randn(2, *SMALL)
    with torch.no_grad():
        for o in offsets:
            model.get_submodule(consumer).weight[:, o + 3] = 0.0
    before = model(x)
    result, (name, is_out, idxs) = one_cut(model)
    assert (name, is_out, idxs) == (producer, True, [3])
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)
    assert replays(model, result, x, build, tmp_path)


class ThreeBranches(nn.Module):
    """Three convolutions concatenated on the channels (MobileViT's fusion, DenseNet, Inception): each is its own
    group, and each cut moves the offsets of the inputs after it."""

    def __init__(self):
        super().__init__()
        self.branches = nn.ModuleList(nn.Conv2d(3, 8, 3, padding=1) for _ in range(3))
        self.out, self.head = nn.Conv2d(24, 16, 1), nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.out(torch.relu(torch.cat([b(x) for b in self.branches], 1))).mean((2, 3)))


def test_offsets_follow_the_cuts_already_made_in_the_same_concatenation(tmp_path):
    # Offsets read from the trace are the unpruned ones: once one branch lost a channel, a later branch's cut was
    # mapped one column too far (the wrong weights went, or a shape failed). Two dead channels in each branch, every
    # one of the six cut (COP cuts a channel that contributes nothing first): the output must not move.
    model = ThreeBranches().eval()
    x = torch.randn(2, *SMALL)
    dead = [1, 6, 8 + 2, 8 + 5, 16 + 0, 16 + 7]
    with torch.no_grad():
        model.out.weight[:, dead] = 0.0
    before = model(x)
    result = cop_prune(model, SMALL, ratio=6 / 50, metric="channels", importance=ONLY_REDUNDANCY,
                       tolerance=0.1 / 50)  # 24 + 16 + 10 output channels  # fmt: skip
    assert sorted(int(i) for _, _, idxs in result.history for i in idxs) == [0, 1, 2, 5, 6, 7]
    assert [b.out_channels for b in model.branches] == [6, 6, 6] and model.out.in_channels == 18
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)
    assert replays(model, result, x, ThreeBranches, tmp_path)


# ---------------------------------------------------------------- timm layers with per-channel tensors of their own


def nfnet():
    import timm

    return timm.create_model("test_nfnet", num_classes=10)


def test_nfnet_gains_follow_their_channels(tmp_path):
    model, result, x = prune_train_replay(nfnet)
    from timm.layers import ScaledStdConv2d

    convs = [m for m in model.modules() if isinstance(m, ScaledStdConv2d)]
    assert any(m.out_channels < nfnet().get_submodule(n).out_channels for n, m in model.named_modules() if m in convs)
    assert all(m.gain.shape[0] == m.out_channels for m in convs)
    assert replays(model, result, x, nfnet, tmp_path)


class SameScaledStd(nn.Module):
    """DM-NFNet's ScaledStdConv2dSame: the same gain per output channel, in a class of its own (not a subclass)."""

    def __init__(self):
        super().__init__()
        from timm.layers import ScaledStdConv2dSame

        self.conv1, self.conv2 = ScaledStdConv2dSame(3, 16, 3, stride=2), ScaledStdConv2dSame(16, 16, 3)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.conv2(torch.relu(self.conv1(x))).mean((2, 3)))


def test_same_padded_scaled_std_conv_gains_follow_their_channels(tmp_path):
    model, result, x = prune_train_replay(SameScaledStd)
    assert model.conv1.out_channels < 16 and model.conv1.gain.shape[0] == model.conv1.out_channels
    assert replays(model, result, x, SameScaledStd, tmp_path)


class Blurred(nn.Module):
    """TResNet's anti-aliased downsampling: a fixed depthwise blur (timm's BlurPool2d) between convolutions."""

    def __init__(self):
        super().__init__()
        from timm.layers import BlurPool2d

        self.conv1, self.blur = nn.Conv2d(3, 16, 3, padding=1), BlurPool2d(16, stride=2)
        self.conv2, self.head = nn.Conv2d(16, 32, 3, padding=1), nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.conv2(self.blur(torch.relu(self.conv1(x)))).mean((2, 3)))


def test_blurpool_filter_follows_its_channels(tmp_path):
    model, result, x = prune_train_replay(Blurred)
    assert model.conv1.out_channels < 16 and model.blur.channels == model.conv1.out_channels
    assert model.blur.filt.shape[0] == model.blur.channels
    assert replays(model, result, x, Blurred, tmp_path)


class MetaFormerScaled(nn.Module):
    """timm's MetaFormer ``Scale`` (CAFormer's res_scale, layer_scale): it views its scale as a stored shape."""

    def __init__(self):
        super().__init__()
        from timm.models.metaformer import Scale

        self.conv1, self.scale = nn.Conv2d(3, 16, 3, stride=2, padding=1), Scale(16, init_value=0.5)
        self.conv2, self.head = nn.Conv2d(16, 16, 3, padding=1), nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.conv2(torch.relu(self.scale(self.conv1(x)))).mean((2, 3)))


def test_metaformer_scale_and_its_shape_follow_their_channels(tmp_path):
    # Torch-Pruning pruned the parameter and left the shape it is viewed as: CAFormer's pruned forward failed.
    model, result, x = prune_train_replay(MetaFormerScaled)
    c = model.conv1.out_channels
    assert c < 16 and model.scale.scale.shape == (c,) and model.scale.shape == (c, 1, 1)
    assert replays(model, result, x, MetaFormerScaled, tmp_path)


class PositionedGroupNorm(nn.Module):
    """Visformer's NCHW position embedding [1, C, H, W], and a GroupNorm (the hybrid ViT's ResNetV2 stem)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.norm = nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.GroupNorm(2, 32)
        self.pos = nn.Parameter(torch.randn(1, 32, 16, 16))
        self.conv2, self.head = nn.Conv2d(32, 32, 3, padding=1), nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.conv2(torch.relu(self.norm(self.conv1(x)) + self.pos)).mean((2, 3)))


def test_nchw_position_embedding_and_groupnorm_keep_their_layout(tmp_path):
    model, result, x = prune_train_replay(PositionedGroupNorm)
    c = model.conv1.out_channels
    assert c < 32 and model.pos.shape == (1, c, 16, 16)  # pruned along its channels, not its width
    assert model.norm.num_channels == c and c % 2 == 0  # each of the 2 groups keeps as many channels
    assert replays(model, result, x, PositionedGroupNorm, tmp_path)


class BlockedPosition(nn.Module):
    """Nest's position embedding [1, blocks, tokens, C], added to a convolution's map cut into blocks of tokens."""

    def __init__(self, c=12):
        super().__init__()
        self.embed, self.pos = nn.Conv2d(3, c, 4, stride=4), nn.Parameter(torch.randn(1, 4, 16, c))
        self.mix, self.head = nn.Linear(c, c), nn.Linear(c, 10)

    def forward(self, x):
        x = self.embed(x).permute(0, 2, 3, 1)  # [B, 8, 8, C] -> 4 blocks of 4x4 tokens
        x = x.reshape(-1, 2, 4, 2, 4, x.shape[-1]).transpose(2, 3).reshape(x.shape[0], 4, 16, x.shape[-1])
        return self.head(torch.relu(self.mix(x + self.pos)).mean((1, 2)))


def test_channels_last_position_embedding_is_pruned_along_its_channels(tmp_path):
    # Read as NCHW (the nearest layer is a convolution), Nest's embedding lost tokens instead of channels: every
    # pruned forward failed, and no channel of nest_tiny could be pruned.
    model, result, x = prune_train_replay(BlockedPosition)
    c = model.embed.out_channels
    assert c < 12 and model.pos.shape == (1, 4, 16, c)
    assert replays(model, result, x, BlockedPosition, tmp_path)


# ---------------------------------------------------------------- attention and constants


class PositionBias(nn.Module):
    """Swin V2's continuous position bias: an MLP over a fixed table, added to the features."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.Linear(16, 10)
        self.register_buffer("table", torch.randn(16 * 16, 2))
        self.cpb = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, x):
        bias = self.cpb(self.table).view(1, 1, 16, 16).detach()  # Torch-Pruning's graph cannot reach it
        return self.head(torch.relu(self.conv(x) + bias).mean((2, 3)))


def test_layers_computing_from_constants_keep_their_widths(tmp_path):
    model, result, x = prune_train_replay(PositionBias)
    assert model.cpb[0].out_features == 32 and model.conv.out_channels < 16
    assert replays(model, result, x, PositionBias, tmp_path)


def vit():
    import timm

    return timm.create_model("test_vit", num_classes=10)


@pytest.mark.slow  # timm's test_vit at 64x64: several seconds
def test_vit_stream_is_pruned_and_attention_keeps_its_heads(tmp_path):
    model, result, x = prune_train_replay(vit, input_size=(3, 64, 64))
    reference = vit()
    for block, original in zip(model.blocks, reference.blocks):
        assert block.attn.qkv.out_features == original.attn.qkv.out_features
        assert block.attn.proj.in_features == original.attn.proj.in_features
    assert model.blocks[0].attn.qkv.in_features < reference.blocks[0].attn.qkv.in_features  # the stream
    assert replays(model, result, x, vit, tmp_path)


class InputWidthAttention(nn.Module):
    """An attention that reads its width from its input (torchvision's Swin: C // num_heads)."""

    def __init__(self, dim=16, num_heads=2):
        super().__init__()
        self.num_heads = num_heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.attn = nn.Conv2d(3, 16, 4, stride=4), InputWidthAttention()
        self.fc1, self.fc2, self.head = nn.Linear(16, 64), nn.Linear(64, 16), nn.Linear(16, 10)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = x + self.attn(x)
        return self.head((x + self.fc2(F.gelu(self.fc1(x)))).mean(1))


def reference_attention(attn, x):
    """What InputWidthAttention computes with its heads' width read from its weights: no padding involved."""
    B, N, _ = x.shape
    inner = attn.qkv.out_features // 3
    q, k, v = attn.qkv(x).reshape(B, N, 3, attn.num_heads, inner // attn.num_heads).permute(2, 0, 3, 1, 4)
    return attn.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, inner))


def test_attention_that_reads_its_width_from_its_input_gets_its_stream_padded(tmp_path):
    # Its reshapes read C from its input: pruning the stream broke them, and the attention was kept whole. Padded
    # back with zeros (and the layers inside taking the stream's channels back), it computes what it should.
    model, result, x = prune_train_replay(Tokens, ratio=0.3)
    assert model.attn.qkv.in_features < 16 and model.attn.qkv.out_features == 48  # the stream, the heads
    assert result.report.padded == [f"{__name__}.InputWidthAttention"]
    assert not skipped_because(result, "whose forward failed")
    tokens = model.embed(x).flatten(2).transpose(1, 2)
    with torch.no_grad():
        torch.testing.assert_close(model.attn(tokens), reference_attention(model.attn, tokens), rtol=0, atol=0)
    assert replays(model, result, x, Tokens, tmp_path)
    assert "stream padded back" in format_report(result.report)


def test_a_refused_prune_leaves_no_padding_hooks_and_the_same_weights():
    # The stream is cut and the attention padded (checked with the padded forward); the target is then missed by
    # a step (a tolerance no single cut meets), and the refusal must take the hooks off with the cuts.
    torch.manual_seed(0)
    model = Tokens().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PruneTargetError, match="cannot be met"):
        cop_prune(model, SMALL, ratio=0.3, metric="flops", tolerance=1e-5)
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class MixingAttention(InputWidthAttention):
    """One that normalises across its input's channels before its projections: padding would change it."""

    def forward(self, x):
        return super().forward(F.layer_norm(x, x.shape[-1:]))


class MixingTokens(Tokens):
    def __init__(self):
        super().__init__()
        self.attn = MixingAttention()


def test_attention_that_mixes_the_padding_into_its_stream_is_kept_whole(tmp_path):
    model, result, x = prune_train_replay(MixingTokens, ratio=0.3)
    assert model.attn.qkv.in_features == 16 and model.fc1.out_features < 64
    assert result.report.padded == []
    assert skipped_because(result, "whose forward failed once its widths changed")
    assert replays(model, result, x, MixingTokens, tmp_path)


@pytest.mark.parametrize("name, cls", [
    ("test_vit_relpos", "RelPosAttention"),  # reshape(B, N, C) with C from its input
])  # fmt: skip
def test_timm_attentions_that_read_their_width_from_their_input_are_padded(name, cls, tmp_path):
    import timm

    build = lambda: timm.create_model(name, num_classes=10)  # noqa: E731
    model, result, x = prune_train_replay(build, input_size=(3, 160, 160))
    assert [p.rpartition(".")[2] for p in result.report.padded] == [cls]
    assert replays(model, result, x, build, tmp_path)


def swin(v2=False):
    """A small torchvision Swin (V1 or V2): shifted windows of 4 on an 8x8 token map, two stages."""
    from torchvision.models import swin_transformer as sw

    extra = dict(block=sw.SwinTransformerBlockV2, downsample_layer=sw.PatchMergingV2) if v2 else {}
    return sw.SwinTransformer([4, 4], 32, [2, 2], [2, 4], [4, 4], num_classes=10, **extra)


@pytest.mark.parametrize("v2", [False, True], ids=["swin", "swin_v2"])
def test_swin_attention_reads_its_width_from_its_weights_and_the_stream_is_pruned(v2, tmp_path):
    # torchvision's Swin computes C // num_heads from its input and calls F.linear on its projections' weights:
    # kept whole, it left 0.26 of swin_t's FLOPs reachable. bconv's subclass reads the heads' width from qkv.
    from torchvision.models import swin_transformer as sw

    from bconv.prune.attention import SUBCLASSES, decouple_widths

    torch.manual_seed(0)
    model, x = swin(v2).eval(), torch.randn(2, *SMALL)
    before = model(x)
    changed = decouple_widths(model)
    assert len(changed) == 4 and all(type(m) in SUBCLASSES.values() for m in changed)
    assert all(isinstance(m, sw.ShiftedWindowAttention) or isinstance(m, sw.ShiftedWindowAttentionV2) for m in changed)
    assert torch.equal(model(x), before)  # the same computation at the unpruned widths

    model, result, x = prune_train_replay(lambda: swin(v2))
    reference = swin(v2)
    attn, original = model.features[1][0].attn, reference.features[1][0].attn
    assert attn.qkv.in_features < original.qkv.in_features  # the stream
    assert (attn.qkv.out_features, attn.proj.in_features) == (original.qkv.out_features, original.proj.in_features)
    assert not skipped_because(result, "whose forward failed")
    assert replays(model, result, x, lambda: swin(v2), tmp_path)


def test_a_failed_prune_gives_the_attention_its_own_class_back():
    from torchvision.models import swin_transformer as sw

    model = swin()
    with pytest.raises(PruneTargetError):
        cop_prune(model, SMALL, ratio=0.99, metric="flops", tolerance=0.001)
    assert {type(m) for m in model.modules() if isinstance(m, sw.ShiftedWindowAttention)} == {sw.ShiftedWindowAttention}


# ---------------------------------------------------------------- the tolerance, judged on what remains


def test_a_near_total_cut_is_met_or_refused_with_the_reachable_figure():
    # Every layer keeps 10% of its channels, so about 1.7% of ResNet-18's FLOPs remain at best: ratio=0.999
    # asks 0.1%. The old 2-point tolerance of the removed fraction returned a 17x miss.
    model = torchvision.models.resnet18(num_classes=10)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PruneTargetError, match=r"keep 0\.001 .* \(keep 0\.01\d*\)") as refusal:
        cop_prune(model, SMALL, ratio=0.999)
    assert "ratio<=0.98" in str(refusal.value)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    # Stated by the user, the same figure is met, and the report says the asked and the achieved side by side.
    report = cop_prune(model, SMALL, ratio=0.999, tolerance=0.02).report
    assert 0.979 <= report.achieved < 0.999 and report.tolerance == 0.02
    text = format_report(report)
    assert "keep 0.1% +-2)" in text and f"keeps {100 * (1 - report.achieved):.4g}%" in text


def test_default_tolerance_is_two_points_or_four_percent_of_what_remains():
    report = cop_prune(torchvision.models.resnet18(num_classes=10), SMALL, ratio=0.9).report
    assert report.tolerance == pytest.approx(0.004) and abs(report.achieved - 0.9) <= 0.004
    with pytest.raises(ValueError, match="tolerance=1.5"):
        cop_prune(torchvision.models.resnet18(num_classes=10), SMALL, ratio=0.5, tolerance=1.5)
