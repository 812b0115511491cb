"""Student-Teacher Distillation (STD, Yu et al., arXiv 1908.02492, §IV).

STD carries the gain of a PTL model (the teacher) back into a plain backbone (the
student), so that the deployed network has no cells. The loss is the paper's Eq. 4::

    L = (1 - lam) * CE(student_logits, labels) + lam * L1(student_feature, teacher_feature)

where a model's *feature* is the pooled vector that enters its final classifier
(the input of ``fc`` in a ResNet) and ``lam = 0.8`` in the paper.

The final classifier is found with the same fx tracing machinery as the stages
(:mod:`bconv.surgery._trace`): from the model's output, walk back through ops that
only reshape or drop out (``flatten``, ``view``, ``nn.Flatten``, ``nn.Dropout``,
``nn.Identity``) to the *innermost* module with parameters that returns the logits,
and require that its input has no spatial extent left (``[B, C]``, or
``[B, C, 1, 1]`` for a 1x1-conv classifier after global pooling). Its input is the
feature. Where the classifier is a block (VGG's and MobileNetV3's ``classifier``
``Sequential``, ConvNeXt's ``classifier``), this is the input of its last layer:
the penultimate vector, exactly what timm's ``forward_head(x, pre_logits=True)``
returns, so torchvision and timm versions of a network agree.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ClassifierNotFoundError
from .surgery import anatomy, check_input_size, dummy_input, eval_mode, original_network

__all__ = [
    "std_loss",
    "pooled_features",
    "forward_with_features",
    "classifier_path",
    "STDTrainer",
    "STDStep",
    "ClassifierNotFoundError",
]


# --------------------------------------------------------------------------- the loss


def std_loss(
    student_logits: Tensor,
    labels: Tensor,
    student_features: Tensor,
    teacher_features: Tensor,
    lam: float = 0.8,
) -> Tensor:
    """The STD loss, the PTL paper's Eq. 4, with mean reductions.

    ``(1 - lam) * cross_entropy(student_logits, labels) + lam * l1_loss(student_features, teacher_features)``

    The teacher is a fixed target: ``teacher_features`` are detached, so no gradient
    reaches the teacher even when they were computed with autograd on.

    Args:
        student_logits: ``[B, num_classes]`` logits of the student.
        labels: ``[B]`` class indices (or anything ``F.cross_entropy`` accepts as target).
        student_features: ``[B, D]`` pooled features of the student, already projected
            to the teacher's width if the widths differ (see :class:`STDTrainer`).
        teacher_features: ``[B, D]`` pooled features of the teacher.
        lam: weight of the feature term, in ``[0, 1]``; 0.8 in the paper.

    Returns:
        The scalar loss.

    Raises:
        ValueError: ``lam`` outside ``[0, 1]``, or feature shapes that differ.

    Example::

        >>> loss = std_loss(logits, labels, pooled_features(student, x), pooled_features(teacher, x))
    """
    return _std_terms(student_logits, labels, student_features, teacher_features, lam)[0]


def _std_terms(
    student_logits: Tensor, labels: Tensor, student_features: Tensor, teacher_features: Tensor, lam: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss, ce, l1)`` of Eq. 4."""
    _check_lam(lam)
    if student_features.shape != teacher_features.shape:
        raise ValueError(
            f"student features {tuple(student_features.shape)} and teacher features "
            f"{tuple(teacher_features.shape)} differ in shape: project the student's to the teacher's width "
            f"(STDTrainer(..., projection='auto') does it with a learnable nn.Linear)"
        )
    ce = F.cross_entropy(student_logits, labels)
    l1 = F.l1_loss(student_features, teacher_features.detach())
    return (1.0 - lam) * ce + lam * l1, ce, l1


def _check_lam(lam: float) -> None:
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be a number in [0, 1] (the paper uses 0.8); got {lam!r}")


# --------------------------------------------------------------------------- wrapped models


# --------------------------------------------------------------------------- finding the classifier


def classifier_path(
    model: nn.Module, input_size: Sequence[int] | None = None, *, leaf_modules: Iterable[type] = ()
) -> str:
    """Module path of the model's final classifier: the module whose input :func:`pooled_features` returns.

    Read from the network's anatomy (:func:`bconv.surgery.anatomy.anatomy`: traced once, cached per model
    and recomputed when its module structure changes), the same description PTL and rolling back read.
    For a PTL wrapper the path points into the original, e.g. ``model.fc``.

    Args:
        model: a timm, torchvision or user classifier, or a PTL-wrapped one.
        input_size: ``(C, H, W)`` of the measurement; defaults to the model's own (timm's
            ``pretrained_cfg``) or ``(3, 224, 224)``.
        leaf_modules: module classes that fx should call whole (see :func:`bconv.anatomy`).

    Returns:
        A path for ``model.get_submodule`` (``"fc"``, ``"classifier.6"``, ``"head.fc"``).

    Raises:
        ClassifierNotFoundError: the output is not computed by a module with parameters from a
            pooled vector (SqueezeNet classifies before pooling; a timm model built with
            ``num_classes=0`` has no classifier).
        bconv.errors.TraceError: fx could not trace the model and it has no timm ``get_classifier()``.

    Example::

        >>> classifier_path(torchvision.models.vgg11())
        'classifier.6'
    """
    head = anatomy(model, input_size, leaf_modules=leaf_modules, need_stages=False).head
    if head.classifier is None:
        raise ClassifierNotFoundError(head.reason or f"{type(model).__name__} has no final classifier")
    return head.classifier


def _is_vector(shape: Sequence[int]) -> bool:
    """``[B, C]``, or ``[B, C, 1, 1]`` (any layout): at most one non-batch dim is not 1."""
    return sum(d != 1 for d in shape[1:]) <= 1


# --------------------------------------------------------------------------- features


def forward_with_features(
    model: nn.Module, x: Tensor, *, leaf_modules: Iterable[type] = ()
) -> tuple[Any, Tensor]:
    """Run ``model(x)`` once and return its output together with its pooled features.

    The features are captured by a forward pre-hook on the classifier (see
    :func:`classifier_path`), so this is one ordinary forward pass, in the model's current
    train/eval mode and under the caller's grad mode (the features carry gradients when
    the output does). In train mode they are exactly what the classifier receives, so a
    dropout applied just before it is included (ResNets and DenseNets have none).

    Args:
        model: a classifier, or a PTL-wrapped one.
        x: an input batch ``[B, C, H, W]``.
        leaf_modules: module classes that fx should call whole, used the first time only.

    Returns:
        ``(output, features)``: what ``model(x)`` returns, and ``[B, D]`` features.

    Raises:
        ClassifierNotFoundError: see :func:`classifier_path`; also when the classifier is not
            called exactly once by this forward pass.

    Example::

        >>> logits, feats = forward_with_features(model, x)
        >>> torch.testing.assert_close(model.fc(feats), logits)  # a ResNet
    """
    path = classifier_path(model, tuple(x.shape[1:]), leaf_modules=leaf_modules)
    captured: list[Any] = []
    handle = model.get_submodule(path).register_forward_pre_hook(lambda m, args: captured.append(args))
    try:
        output = model(x)
    finally:
        handle.remove()
    if len(captured) != 1 or not captured[0] or not isinstance(captured[0][0], Tensor):
        raise ClassifierNotFoundError(
            f"the classifier `{path}` of {type(model).__name__} was called {len(captured)} times with "
            f"{'a tensor' if captured and captured[0] else 'no positional input'} during this forward pass; "
            f"expected once with the feature vector"
        )
    features = captured[0][0]
    if features.dim() > 2:
        if not _is_vector(features.shape):
            raise ClassifierNotFoundError(
                f"the classifier `{path}` of {type(model).__name__} receives a {list(features.shape[1:])} map at "
                f"input size {tuple(x.shape[1:])}, not a pooled vector"
            )
        features = features.flatten(1)
    return output, features


def pooled_features(model: nn.Module, x: Tensor) -> Tensor:
    """The feature vector that enters the model's final classifier, from one forward pass.

    For a ResNet this is ``flatten(avgpool(layer4(...)))``, the input of ``fc``; for a
    classifier block (VGG, MobileNetV3) the input of its last layer, as timm's
    ``forward_head(x, pre_logits=True)``; for a PTL-wrapped model the input of the
    original's classifier. Runs in the model's current mode and the caller's grad mode.

    Args:
        model: a timm, torchvision or user classifier, or a PTL-wrapped one.
        x: an input batch ``[B, C, H, W]``.

    Returns:
        ``[B, D]`` features.

    Raises:
        ClassifierNotFoundError: the model has no final classifier reading a pooled vector.

    Example::

        >>> feats = pooled_features(torchvision.models.resnet50().eval(), torch.randn(2, 3, 224, 224))
        >>> feats.shape
        torch.Size([2, 2048])
    """
    return forward_with_features(model, x)[1]


# --------------------------------------------------------------------------- one distillation step


@dataclass(frozen=True)
class STDStep:
    """What one :meth:`STDTrainer.step` computed: detached scalars (no GPU sync until you read them)."""

    loss: Tensor
    ce: Tensor
    l1: Tensor


class STDTrainer:
    """Runs STD steps: the teacher (a PTL model) in eval mode under ``no_grad``, a plain student in train mode.

    When the student's feature width differs from the teacher's (ResNet-18 student,
    ResNet-50 teacher: 512 vs 2048), the student's features go through a learnable
    ``nn.Linear(student_width, teacher_width)`` projection (a FitNets-style regressor)
    before the L1 term, which is computed in the teacher's feature space. The projection
    is trained with the student: build the optimizer from :meth:`parameters` (student and
    projection), or add ``trainer.projection.parameters()`` as a group of its own. It is
    only a training aid; the deployed student does not use it.

    Widths are measured at construction with one dummy forward pass of each model in eval
    mode, without gradients (no BN statistics or cell states change).

    Args:
        student: the plain network being trained.
        teacher: the trained PTL model (or any classifier); never updated.
        lam: weight of the feature term of Eq. 4; 0.8 in the paper.
        projection: ``"auto"`` (a Linear only when the widths differ), ``"linear"`` (always a
            Linear), ``None`` (widths must match), or your own ``nn.Module`` mapping
            ``[B, student_width]`` to ``[B, teacher_width]``.
        input_size: ``(C, H, W)`` of the dummy input used to measure the widths; defaults to
            the student's own (timm's ``pretrained_cfg``) or ``(3, 224, 224)``.

    Attributes:
        projection: the projection module, or None.
        student_width, teacher_width: the feature widths measured (None with ``projection=None``).

    Example::

        >>> trainer = STDTrainer(torchvision.models.resnet18(num_classes=100), ptl_resnet50, lam=0.8)
        >>> optimizer = torch.optim.SGD(trainer.parameters(), lr=0.01, momentum=0.9)
        >>> for x, y in loader:
        ...     step = trainer.step(x, y, optimizer)
        >>> print(step.loss.item(), step.ce.item(), step.l1.item())
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        *,
        lam: float = 0.8,
        projection: Literal["auto", "linear"] | nn.Module | None = "auto",
        input_size: Sequence[int] | None = None,
    ) -> None:
        _check_lam(lam)
        if not (projection is None or isinstance(projection, nn.Module) or projection in ("auto", "linear")):
            raise ValueError(f"projection must be 'auto', 'linear', None or an nn.Module; got {projection!r}")
        self.student, self.teacher, self.lam = student, teacher, lam
        self.student_width: int | None = None
        self.teacher_width: int | None = None
        self.projection: nn.Module | None = projection if isinstance(projection, nn.Module) else None
        if projection in ("auto", "linear"):
            size = check_input_size(input_size, original_network(student)[0])
            self.student_width, self.teacher_width = self._width(student, size), self._width(teacher, size)
            if projection == "linear" or self.student_width != self.teacher_width:
                param = next(student.parameters())
                self.projection = nn.Linear(self.student_width, self.teacher_width).to(param.device, param.dtype)

    @staticmethod
    def _width(model: nn.Module, input_size: tuple[int, ...]) -> int:
        """The pooled feature width, from the model's anatomy (no forward pass)."""
        classifier_path(model, input_size)  # a model without a classifier gets its clear error here
        width = anatomy(model, input_size, need_stages=False).head.features
        if width is None:
            with eval_mode(model), torch.no_grad():
                return pooled_features(model, dummy_input(model, input_size)).shape[1]
        return width

    def parameters(self) -> Iterator[nn.Parameter]:
        """The trainable parameters: the student's, then the projection's (never the teacher's)."""
        yield from self.student.parameters()
        if self.projection is not None:
            yield from self.projection.parameters()

    def step(self, x: Tensor, labels: Tensor, optimizer: torch.optim.Optimizer) -> STDStep:
        """One optimisation step of Eq. 4 on a batch.

        The teacher runs in eval mode under ``torch.no_grad()`` and every one of its modules
        gets its own train/eval flag back afterwards. The student is put in train mode if
        its root is not (submodules a user froze in eval stay frozen while the root trains).

        Args:
            x: the input batch, on the models' device.
            labels: ``[B]`` class indices.
            optimizer: an optimizer over :meth:`parameters`.

        Returns:
            The detached ``loss``, ``ce`` and ``l1`` of this step (before the update).
        """
        with eval_mode(self.teacher), torch.no_grad():
            teacher_features = pooled_features(self.teacher, x)
        if not self.student.training:
            self.student.train()
        output, student_features = forward_with_features(self.student, x)
        logits = getattr(output, "logits", output)  # torchvision Inception/GoogLeNet return a namedtuple in train mode
        if self.projection is not None:
            student_features = self.projection(student_features)
        loss, ce, l1 = _std_terms(logits, labels, student_features, teacher_features, self.lam)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return STDStep(loss.detach(), ce.detach(), l1.detach())
