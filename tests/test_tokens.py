"""PTL on token backbones: ViT, DeiT, DINOv2-style registers, EVA-like patch 14, Mixer, CaiT, ConViT, torchvision's ViT.

The networks are the real timm and torchvision classes, built small (32-64 px, a few blocks of width 32) so
that each test takes a second or two; benchmarks/zoo.py runs the zoo's full-size ones.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
import torchvision
from timm.models.cait import Cait
from timm.models.convit import ConVit
from timm.models.crossvit import CrossVit
from timm.models.mlp_mixer import MlpMixer
from timm.models.pit import PoolingVisionTransformer
from timm.models.vision_transformer import VisionTransformer

import bconv
from bconv import anatomy, ladder_usage, load_ptl, unwrap_ptl, wrap_with_ptl
from bconv.errors import BConvError, NoSpatialStagesError, StageSelectionError

WIDTH = dict(embed_dim=32, num_heads=2)


def vit(**kw):
    """timm's ViT at 32x32 with 8-pixel patches (a 4x4 grid), 6 blocks, a class token."""
    return VisionTransformer(**{"img_size": 32, "patch_size": 8, "depth": 6, "num_classes": 5, **WIDTH, **kw})


NETWORKS = {
    # name: (builder, input size, prefix tokens per block, whether the last block's grid reaches the output)
    "vit_class_token": (lambda: vit(), (3, 32, 32), [1] * 6, False),
    "vit_avg_pool": (lambda: vit(global_pool="avg", class_token=False), (3, 32, 32), [0] * 6, True),
    "deit_distilled": (lambda: _deit_distilled(), (3, 32, 32), [2] * 6, False),
    "registers_patch14": (lambda: vit(img_size=56, patch_size=14, reg_tokens=4), (3, 56, 56), [5] * 6, False),
    "mixer_no_prefix": (
        lambda: MlpMixer(num_classes=5, img_size=32, patch_size=8, num_blocks=4, embed_dim=32),
        (3, 32, 32), [0] * 4, True,
    ),
    "cait_late_class_token": (
        lambda: Cait(img_size=32, patch_size=8, depth=4, depth_token_only=1, num_classes=5, **WIDTH),
        (3, 32, 32), [0] * 4, True,
    ),
    "convit_late_class_token": (
        lambda: ConVit(img_size=32, patch_size=8, depth=4, local_up_to_layer=2, num_classes=5, **WIDTH),
        (3, 32, 32), [0, 0, 1, 1], False,
    ),
    "torchvision_vit": (
        lambda: torchvision.models.VisionTransformer(
            image_size=32, patch_size=8, num_layers=4, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=5
        ),
        (3, 32, 32), [1] * 4, False,
    ),
}  # fmt: skip


def _deit_distilled():
    from timm.models.deit import VisionTransformerDistilled

    return VisionTransformerDistilled(img_size=32, patch_size=8, depth=6, num_classes=5, **WIDTH)


def build(name: str):
    torch.manual_seed(0)
    builder, size, _, _ = NETWORKS[name]
    return builder().eval(), size


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


# ------------------------------------------------------------------------------- the stages, measured


@pytest.mark.parametrize("name", NETWORKS)
def test_blocks_are_stages_with_a_measured_token_layout(name):
    model, size = build(name)
    _, _, prefixes, last_reaches = NETWORKS[name]
    stages = anatomy(model, size).stages
    patch = 14 if "patch14" in name else 8
    grid = (size[1] // patch, size[2] // patch)
    assert [s.tokens.prefix for s in stages] == prefixes
    assert all(s.layout == "NLC" and s.tokens.grid == grid and s.tokens.patch == (patch, patch) for s in stages)
    width = 64 if "convit" in name else 32  # ConViT multiplies embed_dim by num_heads
    assert all(s.reduction == patch and s.shape == (s.tokens.prefix + grid[0] * grid[1], width) for s in stages)
    # Only the last block can lose its grid (a class-token model): every earlier one reaches the output.
    assert [s.tokens.reaches_output for s in stages] == [True] * (len(stages) - 1) + [last_reaches]


def test_the_reachability_probe_reads_the_classifiers_input_not_its_zero_weights():
    """A Mixer's and torchvision's ViT head start at zero: a gradient at the logits would be zero everywhere."""
    model, size = build("torchvision_vit")
    torch.nn.init.zeros_(model.heads.head.weight)
    assert [s.tokens.reaches_output for s in anatomy(model, size).stages] == [True, True, True, False]


# ------------------------------------------------------------------------------- the ladder on the grid


def _train(wrapped, size, steps=3, batch=4, seed=0):
    opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-3)
    _steps(wrapped, opt, size, steps, batch, seed)
    return opt


def _steps(wrapped, opt, size, steps=2, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    wrapped.train()
    for _ in range(steps):
        x = torch.randn(batch, *size, generator=g)
        y = torch.randint(0, 5, (batch,), generator=g)
        loss = F.cross_entropy(wrapped(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        wrapped.detach_state()


@pytest.mark.parametrize("name", NETWORKS)
def test_a_fresh_wrap_is_exact_and_every_ladder_parameter_trains(name):
    model, size = build(name)
    x = torch.randn(3, *size)
    with torch.no_grad():
        expected = model(x)
    wrapped = wrap_with_ptl(model, input_size=size)
    with torch.no_grad():
        assert torch.equal(wrapped.eval()(x), expected)
    before = {n: p.detach().clone() for n, p in wrapped.ptl.named_parameters()}
    _train(wrapped, size)
    grads = {n: p.grad for n, p in wrapped.ptl.named_parameters()}
    assert all(g is not None and g.abs().max() > 0 for g in grads.values()), [n for n, g in grads.items() if g is None or not g.any()]
    assert all(not torch.equal(p, before[n]) for n, p in wrapped.ptl.named_parameters())
    usage = ladder_usage(wrapped.eval(), x)
    assert usage.output_share > 0 and usage.stage_share > 0


def test_the_ladder_writes_the_grid_tokens_and_leaves_the_prefix_untouched():
    model, size = build("registers_patch14")
    bare = copy.deepcopy(model)
    wrapped = wrap_with_ptl(model, input_size=size)
    torch.nn.init.normal_(wrapped.ptl.cells[-1][-1].conv.weight, std=0.3)  # a ladder that contributes
    last = wrapped.stages[-1].name
    outputs = []
    for network in (wrapped.model, bare):  # the wrapped block's hook sees the output the ladder replaced
        network.get_submodule(last).register_forward_hook(lambda m, a, out: outputs.append(out))
    x = torch.randn(2, *size)
    with torch.no_grad():
        wrapped.eval()(x)
        bare(x)
    replaced, original = outputs
    assert replaced.shape == original.shape == (2, 5 + 16, 32)  # 1 class token + 4 registers, then 4x4 patches
    assert torch.equal(replaced[:, :5], original[:, :5])
    assert (replaced[:, 5:] - original[:, 5:]).abs().amax(-1).min() > 0  # every grid token changed


def test_default_stages_are_evenly_spaced_blocks_that_reach_the_output():
    model = vit(depth=12)
    wrapped = wrap_with_ptl(model.eval(), input_size=(3, 32, 32))
    assert wrapped.config.stages == ("blocks.2", "blocks.5", "blocks.7", "blocks.10")  # not blocks.11
    mixer, size = build("mixer_no_prefix")
    assert wrap_with_ptl(mixer, input_size=size).config.stages == ("blocks.0", "blocks.1", "blocks.2", "blocks.3")


def test_a_last_stage_whose_grid_never_reaches_the_output_is_refused_with_the_alternatives():
    model, size = build("vit_class_token")
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(StageSelectionError, match=r"blocks\.5.*never reach the output.*blocks\.2, blocks\.3, blocks\.4"):
        wrap_with_ptl(model, stages=["blocks.2", "blocks.5"], input_size=size)
    assert not model._forward_hooks and not any(m._forward_hooks for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert wrap_with_ptl(model, stages=["blocks.2", "blocks.4"], input_size=size).config.stages == ("blocks.2", "blocks.4")


# ------------------------------------------------------------------------------- sizes


def test_dynamic_img_size_at_a_non_square_size_keeps_working():
    torch.manual_seed(0)
    model = vit(dynamic_img_size=True).eval()
    wrapped = wrap_with_ptl(model, input_size=(3, 32, 32))
    x = torch.randn(2, 3, 40, 64)  # a 5x8 grid
    with torch.no_grad():
        assert torch.equal(wrapped(x), model_without_ladder(wrapped)(x))
    _train(wrapped, (3, 40, 64), steps=2)
    with torch.no_grad():
        out = wrapped.eval()(x)
    assert out.shape == (2, 5) and torch.isfinite(out).all()


def test_patch_14_resizes_the_cells_to_the_grid():
    model, size = build("registers_patch14")  # 56 px: a 4x4 grid; 3 stride-2 cells reach 7x7
    wrapped = wrap_with_ptl(model, input_size=size)
    assert len(wrapped.ptl.cells[0]) == 3
    y = wrapped.ptl.cells[0](torch.randn(1, *size))
    assert y.shape[-2:] == (7, 7)  # resized exactly to 4x4 by the ladder


def test_the_first_chain_widens_as_it_downsamples():
    model, size = build("vit_class_token")  # 8-pixel patches: 3 stride-2 cells up to width 8 (32 * 0.125, at least 8)
    wrapped = wrap_with_ptl(model, input_size=size, cell_width=1.0)
    assert [c.out_channels for c in wrapped.ptl.cells[0]] == [8, 16, 32]


def model_without_ladder(wrapped):
    return unwrap_ptl(copy.deepcopy(wrapped))


# ------------------------------------------------------------------------------- refusals


def test_patch_dropout_is_refused_at_wrap_time_and_the_model_is_unchanged():
    model = vit(patch_drop_rate=0.25)
    with pytest.raises(BConvError, match="patch_drop_rate=0"):
        wrap_with_ptl(model, input_size=(3, 32, 32))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_a_token_count_that_no_longer_fits_the_grid_is_named():
    model, size = build("vit_class_token")
    wrapped = wrap_with_ptl(model, input_size=size)
    wrapped.model.patch_drop = _DropLastToken()  # tokens dropped after wrapping
    with pytest.raises(BConvError, match=r"returned 16 tokens for a 32x32 image.*patch dropout"):
        wrapped(torch.randn(1, *size))


class _DropLastToken(torch.nn.Module):
    def forward(self, x):
        return x[:, :-1]


@pytest.mark.parametrize(
    "builder,match",
    [
        (lambda: CrossVit(img_size=[32, 32], patch_size=[8, 16], embed_dim=[16, 32], depth=[[1, 1, 0]], num_heads=[2, 2], mlp_ratio=[2, 2, 1], num_classes=5), "CrossViT"),
        (lambda: PoolingVisionTransformer(img_size=32, patch_size=8, stride=4, base_dims=[16, 16], depth=[1, 1], heads=[2, 2], mlp_ratio=2, num_classes=5), "PiT or MViTv2"),
    ],
)  # fmt: skip
def test_token_backbones_a_ladder_cannot_serve_are_refused_clearly(builder, match):
    torch.manual_seed(0)
    model = builder().eval()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(NoSpatialStagesError, match=match):
        wrap_with_ptl(model, input_size=(3, 32, 32))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


# ------------------------------------------------------------------------------- the contract, as on CNNs


def test_state_reset_detach_and_eval_independent_of_batch_companions():
    model, size = build("deit_distilled")
    wrapped = wrap_with_ptl(model, input_size=size)
    _train(wrapped, size, steps=2)
    cells = [m for m in wrapped.ptl.modules() if isinstance(m, (bconv.BConvCell, bconv.BConvCellV2))]
    assert all(c.c_prev is not None and not c.c_prev.requires_grad for c in cells)
    wrapped.reset_state()
    assert all(c.c_prev is None for c in cells)
    x = torch.randn(4, *size)
    with torch.no_grad():
        alone = wrapped.eval()(x[:1])
        together = wrapped(x)[:1]
    torch.testing.assert_close(alone, together, rtol=1e-5, atol=1e-6)


def test_checkpoint_and_exact_resume():
    model, size = build("registers_patch14")
    wrapped = wrap_with_ptl(model, input_size=size)
    opt = _train(wrapped, size, steps=2)
    buffer = io.BytesIO()
    torch.save({"model": wrapped.state_dict(), "opt": opt.state_dict(), "latent": wrapped.latent_state_dict()}, buffer)
    _steps(wrapped, opt, size, seed=1)  # the run goes on uninterrupted

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fresh, _ = build("registers_patch14")
    resumed = load_ptl(fresh, saved["model"])  # a new process would do this
    assert resumed.config == wrapped.config
    resumed.load_latent_state_dict(saved["latent"])
    resumed_opt = torch.optim.AdamW(resumed.parameters(), lr=1e-3)
    resumed_opt.load_state_dict(saved["opt"])
    _steps(resumed, resumed_opt, size, seed=1)
    continued = wrapped
    for (n, a), b in zip(continued.state_dict().items(), resumed.state_dict().values()):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            assert torch.equal(a, b), n


def test_timm_gradient_checkpointing_gives_the_same_gradients():
    model, size = build("vit_class_token")
    plain = wrap_with_ptl(model, input_size=size)
    checkpointed = copy.deepcopy(plain)
    checkpointed.model.set_grad_checkpointing(True)
    x = torch.randn(2, *size)
    for m in (plain, checkpointed):
        m.train()
        F.cross_entropy(m(x), torch.tensor([0, 1])).backward()
    for (n, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=n)


# ------------------------------------------------------------------------------- the README, frameworks, compile, DDP


def test_the_guides_example_runs_as_written(capsys):
    from conftest import docs_block

    code = docs_block("guides/token-backbones.md", "## Wrap a ViT")
    exec(compile(code, "docs/guides/token-backbones.md", "exec"), {})
    assert "('blocks.2', 'blocks.5', 'blocks.7', 'blocks.10')" in capsys.readouterr().out


def test_the_lightning_callback_resumes_a_vit_run_bitwise_mid_epoch(tmp_path):
    pytest.importorskip("lightning")
    import test_lightning as tl

    class ViTClassifier(tl.Classifier):
        def __init__(self, options=None, **kwargs):
            super().__init__(options, **kwargs)
            self.net = wrap_with_ptl(vit(img_size=16, patch_size=4, depth=3), input_size=tl.SIZE, **(options or {}))

    full = tl._fit(ViTClassifier)
    path = tl._interrupted(tmp_path, 10, ViTClassifier)
    resumed = tl._fit(ViTClassifier, ckpt_path=path, seed=1)
    assert resumed.seen == full.seen[tl.BATCHES + 4 :]
    assert tl._equal(tl._weights(full), tl._weights(resumed))


@pytest.mark.slow  # compiling takes tens of seconds on CPU
def test_torch_compile_matches_eager_on_a_vit():
    model, size = build("registers_patch14")
    eager = wrap_with_ptl(model, input_size=size)
    torch.nn.init.normal_(eager.ptl.cells[-1][-1].conv.weight, std=0.3)
    module = copy.deepcopy(eager)
    compiled = torch.compile(module, fullgraph=True)
    eager.train()
    module.train()
    for x in [torch.randn(2, *size) for _ in range(3)]:
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-5)
        eager.detach_state()
        module.detach_state()


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        wrapped = wrap_with_ptl(vit().eval(), input_size=(3, 32, 32))
        ddp = DDP(wrapped.train())
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        torch.manual_seed(100 + rank)
        for _ in range(2):
            loss = F.cross_entropy(ddp(torch.randn(3 + rank, 3, 32, 32)), torch.zeros(3 + rank, dtype=torch.long))
            opt.zero_grad()
            loss.backward()
            opt.step()
            wrapped.detach_state()
        flat = torch.cat([p.detach().flatten() for p in wrapped.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        torch.save({"in_sync": all(torch.equal(g, gathered[0]) for g in gathered)}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes
def test_ddp_with_two_gloo_processes_on_a_vit(tmp_path):
    import torch.multiprocessing as mp
    from conftest import free_port

    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    assert all(torch.load(tmp_path / f"rank{r}.pt")["in_sync"] for r in range(2))


# ------------------------------------------------------------------------------- STD and rolling back


def test_std_distils_a_ptl_vit_teacher_into_a_plain_vit_student():
    from bconv.distill import STDTrainer

    teacher = wrap_with_ptl(vit().eval(), input_size=(3, 32, 32))
    student = vit()
    trainer = STDTrainer(student, teacher, input_size=(3, 32, 32))
    assert trainer.student_width == trainer.teacher_width == 32 and trainer.projection is None
    before = copy.deepcopy(student.state_dict())
    step = trainer.step(torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,)), torch.optim.SGD(trainer.parameters(), lr=0.01))
    assert step.l1 > 0 and torch.isfinite(step.loss)
    assert any(not torch.equal(v, student.state_dict()[k]) for k, v in before.items())


def test_rolling_back_counts_a_vits_blocks():
    from bconv.rollback import Rollback

    model = vit()
    rollback = Rollback(model, input_size=(3, 32, 32))
    assert [b.name for b in rollback.blocks] == ["stem", *(f"blocks.{i}" for i in range(6))]


def test_layerscale_at_its_random_init_damps_the_ladders_waking_by_its_scale():
    """DeiT III and DINOv2 start their LayerScale at 1e-6/1e-5 (random weights only): the gradient that
    reaches the ladder through the later blocks is that much smaller. At a trained-like scale the ladder
    wakes as on a plain ViT; the guide tells users to judge it on their pre-trained model."""

    def share(init_values: float) -> tuple[float, float]:
        torch.manual_seed(0)
        model = wrap_with_ptl(vit(init_values=init_values), input_size=(3, 32, 32)).train()
        x, y = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.arange(8) % 5
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(5):
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            model.detach_state()
        usage = ladder_usage(model, x, y)
        return usage.stage_share, usage.output_share

    damped, trained_like = share(1e-5), share(0.1)
    assert trained_like[0] > 100 * damped[0], (damped, trained_like)  # the cells' part of the paired block
    assert damped[1] < 1e-8 < 1e-6 < trained_like[1], (damped, trained_like)  # and of the logits
