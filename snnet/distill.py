"""Knowledge distillation while training a stitched network: the teacher and the two losses.

* ``soft``: KL divergence between the temperature-softened distributions of the student and
  the teacher, times ``T²`` (Hinton et al.; averaged over the batch).
* ``hard``: cross-entropy on the teacher's top class (DeiT's hard distillation, which the
  SN-Net reference code uses for every family, with weight 0.5 and a RegNetY-160 teacher).

The total loss is ``(1 - alpha) * base + alpha * distillation``. Networks with a distillation head
(LeViT, distilled DeiT) are trained as DeiT and the SN-Net reference's LeViT code train them
(:func:`two_head_loss`): the class head on the labels, the distillation head on the teacher;
:func:`set_two_head_training` makes their heads return both logits in training mode (they are
averaged at inference, as timm does). The teacher is either the
SN-Net's own largest anchor (a frozen copy, ``'largest'``) or a timm model with its *own*
pretrained head: a teacher whose classes are not the network's is refused before training,
since a head replaced to fit the dataset would be random and its targets noise. The teacher
always runs in eval mode without gradients.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import DISTILL_TYPES
from .errors import SnnetError

if TYPE_CHECKING:
    from .model import StitchedNet

__all__ = ["DISTILL_TYPES", "TeacherError", "build_teacher", "check_teacher", "distill_loss", "set_two_head_training",
           "teacher_classes", "teacher_logits", "two_head_loss"]


class TeacherError(SnnetError, ValueError):
    """A distillation teacher that cannot teach this network."""


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str, temperature: float = 1.0) -> torch.Tensor:
    """The distillation term for logits ``student`` and ``teacher`` (both ``batch x classes``)."""
    if kind == "hard":
        return F.cross_entropy(student, teacher.argmax(dim=-1))
    if kind == "soft":
        t = temperature
        return F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), log_target=True,
                        reduction="batchmean") * t * t
    raise TeacherError(f"unknown distillation type {kind!r}; use one of {DISTILL_TYPES}")


def two_head_loss(outputs: tuple[torch.Tensor, torch.Tensor], target: torch.Tensor, base: Callable[..., torch.Tensor],
                  teacher: torch.Tensor | None, kind: str = "hard", alpha: float = 0.5,
                  temperature: float = 1.0) -> torch.Tensor:
    """The loss of a network with a class head and a distillation head, as DeiT's ``DistillationLoss``
    (which the reference's ``stitching_levit`` uses) computes it: ``base(class logits, target)``
    (labels, or mixup's soft targets) on the class head alone, the distillation term (:func:`distill_loss`)
    on the distillation head alone, ``(1 - alpha) * base + alpha * distillation``. Without a teacher
    (``teacher`` None) the base loss alone, on the class head.
    """
    if not isinstance(outputs, (tuple, list)) or len(outputs) != 2:
        raise TeacherError("two_head_loss needs (class logits, distillation logits): call set_two_head_training(net) "
                           "and keep the network in training mode")
    cls, dist = outputs
    loss = base(cls, target)
    if teacher is None:
        return loss
    return (1 - alpha) * loss + alpha * distill_loss(dist, teacher, kind, temperature)


def set_two_head_training(net: "StitchedNet", enabled: bool = True) -> int:
    """Make every head with a distillation head (LeViT, distilled DeiT) return ``(class, distillation)``
    logits in training mode, through timm's own ``set_distilled_training`` on the model each head holds
    (in eval mode they still return the average). Every head a route can end with is set, the reference
    route mode's too. Returns how many anchors have a distillation head (0: nothing to train two ways)."""
    models = {id(m): m for m in (getattr(net.head_of(s), "model", None) for s in net.space)}
    two = [m for m in models.values() if hasattr(m, "set_distilled_training") and hasattr(m, "head_dist")]
    for m in two:
        m.set_distilled_training(enabled)
    return len(two)


def teacher_logits(teacher: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The teacher's output on ``x``: always in eval mode (a teacher that is a submodule of the
    network would otherwise follow ``net.train()``) and without building a graph."""
    teacher.eval()
    with torch.no_grad():
        return teacher(x)


def teacher_classes(teacher: nn.Module, input_size: tuple[int, ...]) -> int:
    """How many classes ``teacher`` predicts: timm's ``num_classes``, else one probe forward."""
    n = getattr(teacher, "num_classes", None)
    if isinstance(n, int) and n > 0:
        return n
    param = next(teacher.parameters(), None)
    x = torch.zeros(1, *input_size, device=param.device if param is not None else "cpu")
    out = teacher_logits(teacher, x)
    return int(out.shape[-1])


def check_teacher(teacher: nn.Module, net: "StitchedNet | nn.Module", name: str = "the teacher",
                  input_size: tuple[int, ...] | None = None) -> None:
    """Refuse a teacher whose classes are not the network's (its targets would mean nothing),
    or one that shares weights with the network (training would move the teacher too). Both are run on
    one image of ``input_size`` (the training data's; else the network's own, else 3x224x224)."""
    if {id(p) for p in teacher.parameters()} & {id(p) for p in net.parameters()}:
        raise TeacherError(f"{name} shares weights with the network being trained: pass a frozen copy "
                           "(distill='largest' makes one of the largest anchor)")
    size = tuple(input_size or getattr(net, "input_size", None)
                 or getattr(net, "pretrained_cfg", {}).get("input_size", (3, 224, 224)))
    # one probe forward on the network's input size, even where the teacher says its classes: a teacher built
    # for other images (a ViT at 224 for a network at 32) would otherwise fail inside the first training step
    param = next(teacher.parameters(), None)
    try:
        out = teacher_logits(teacher, torch.zeros(1, *size, device=param.device if param is not None else "cpu"))
    except Exception as e:  # whatever the teacher's own forward raises on the wrong input
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TeacherError(f"{name} cannot run on the network's images of shape {size} ({why}): distil from a "
                           "teacher built for the images this network takes") from e
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise TeacherError(f"{name} does not return a batch of logits (got {type(out).__name__}"
                           f"{f' of shape {tuple(out.shape)}' if isinstance(out, torch.Tensor) else ''}): "
                           "distil from a classifier")
    classes = int(out.shape[-1])
    predicts = getattr(net, "num_classes", None)
    if not isinstance(predicts, int):  # a plain model that does not say: what it returns (it was an AttributeError)
        predicts = _classes_of(net, size)
    if predicts is not None and classes != predicts:
        raise TeacherError(
            f"{name} predicts {classes} classes but the network predicts {predicts}: its targets would be "
            "noise. Distil from the network's own largest anchor (--distill largest) or from a teacher trained on "
            "these classes")


def _classes_of(net: nn.Module, size: tuple[int, ...]) -> int | None:
    """How many logits ``net`` returns for one image of ``size`` (None: it cannot say; the first step will)."""
    param = next(net.parameters(), None)
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            out = net(torch.zeros(1, *size, device=param.device if param is not None else "cpu"))
    except Exception:  # noqa: BLE001 - the network's own error comes, with its context, in the first step
        return None
    finally:
        net.train(was_training)
    return int(out.shape[-1]) if isinstance(out, torch.Tensor) and out.ndim == 2 else None


def build_teacher(net: "StitchedNet", distill: str | None, pretrained: bool = True,
                  file: str | None = None) -> nn.Module | None:
    """The distillation teacher, frozen and checked: a copy of the largest anchor, or a timm model.

    A timm teacher keeps its own pretrained head (``pretrained=True`` downloads its weights,
    ``file`` loads them from disk); :func:`check_teacher` then insists its classes match.
    """
    if distill is None:
        return None
    if distill == "largest":
        teacher: nn.Module = copy.deepcopy(net.anchors[-1])
    else:
        from .anchors import AnchorSpec, create_anchor

        if not pretrained and file is None:
            raise TeacherError(f"teacher {distill!r} would have random weights: let it load its pretrained weights "
                               "or give a weights file")
        teacher = create_anchor(AnchorSpec(distill, pretrained and file is None, file))
    teacher = teacher.eval().requires_grad_(False)
    check_teacher(teacher, net, "the SN-Net's largest anchor" if distill == "largest" else f"teacher {distill!r}")
    return teacher
