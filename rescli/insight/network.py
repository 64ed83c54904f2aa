"""A classifier split at its last residual stage: ``trunk`` (image -> the stage's activation maps) and ``head``
(maps -> logits, through the global pool and the fc layer). Explanations need both halves (a CAM is built from
the maps and the gradient of a logit with respect to them) and embeddings are the pooled maps.

Every rescli architecture follows torchvision's ResNet naming (conv1, bn1, relu, [maxpool], layer1..N, avgpool,
fc), CIFAR-style nets included, so the split is made by calling those children in order, not with forward hooks:
hooks cannot be registered on a TorchScript module, but its children can be called one by one, so a TorchScript
export works as well as a checkpoint. The split is checked on load: the two halves must give the file's own
logits on a probe image, or the file is refused. ONNX exports are one fused graph with no layers to reach.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rescli.core.errors import RescliError, UsageError
from rescli.core.runtime import Runtime, select_runtime
from rescli.data.tasks import MULTI, SINGLE, Task, task_named
from rescli.data.transforms import to_model_input
from rescli.inference.lookup import model_kind, run_folder_to_file
from rescli.inference.torchscript_export import open_torchscript
from rescli.models.checkpoint import load_checkpoint, model_from_checkpoint

STEM = ("conv1", "bn1", "relu", "maxpool")

#: The largest |logit difference| between the file's forward and the two halves that still counts as the same net.
SPLIT_TOLERANCE = 1e-3

NO_LAYERS = ("{path}: an ONNX export is one fused graph with no layers to reach; {what} needs the checkpoint it was "
             "exported from (.pt, or a run folder) or a TorchScript export (.ts)")


@dataclass
class StagedNet:
    """A network and what is needed to feed it, split at its last residual stage."""

    module: Any  # nn.Module or TorchScript module
    stages: list[str]  # the children called in order up to the last residual stage
    classes: list[str]
    img_size: int
    mean: list[float]
    std: list[float]
    temperature: float
    runtime: Runtime
    kind: str  # checkpoint | torchscript | imagenet
    source: str
    fingerprint: str  # identifies the weights: embeddings made by one net are compared only with its own
    meta: dict[str, Any] = field(default_factory=dict)
    task: Task = SINGLE  # what the logits mean: one class (softmax), or any labels (a sigmoid each)
    thresholds: list[float] | None = None  # multi-label: each class's decision threshold (None: 0.5 each)

    def probabilities(self, logits: torch.Tensor, *, temperature: float) -> torch.Tensor:
        """Calibrated scores of ``logits`` [B, C] as predict gives them: softmax, or a sigmoid per label."""
        scaled = logits.float() / temperature
        return torch.sigmoid(scaled) if self.task is MULTI else torch.softmax(scaled, dim=1)

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B,3,H,W] -> the normalised float batch on the net's device."""
        return to_model_input(images, device=self.runtime.device, mean=self.mean, std=self.std,
                              channels_last=self.runtime.channels_last)

    cam_stage: str = ""  # the stage whose maps explanations weigh (choose_cam_stage); "" = the last

    def trunk(self, x: torch.Tensor, *, upto: str | None = None) -> torch.Tensor:
        """Normalised input -> the activation maps [B, C, h, w] of stage ``upto`` (default: the last)."""
        for name in self.stages:
            x = getattr(self.module, name)(x)
            if name == upto:
                break
        return x

    def head(self, maps: torch.Tensor, *, after: str | None = None) -> torch.Tensor:
        """Activation maps of stage ``after`` (default: the last) -> logits: the stages after it, the pool, fc."""
        if after is not None and after != self.stages[-1]:
            for name in self.stages[self.stages.index(after) + 1:]:
                maps = getattr(self.module, name)(maps)
        return self.module.fc(self.pool(maps))

    def explained_maps(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x, upto=self.cam_stage or None)

    def explained_head(self, maps: torch.Tensor) -> torch.Tensor:
        return self.head(maps, after=self.cam_stage or None)

    def pool(self, maps: torch.Tensor) -> torch.Tensor:
        """Activation maps -> the pooled penultimate features [B, C] (what fc reads)."""
        return torch.flatten(self.module.avgpool(maps), 1)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> pooled penultimate features, float32 on the CPU."""
        with self.runtime.autocast():
            return self.pool(self.trunk(self.inputs(images))).float().cpu()


def residual_stages(module: Any, *, source: str) -> list[str]:
    """The names of the children to call in order, up to the last residual stage; RescliError if not a ResNet."""
    children = {name for name, _ in module.named_children()}
    layers = sorted((n for n in children if re.fullmatch(r"layer\d+", n)), key=lambda n: int(n[5:]))
    missing = [n for n in ("conv1", "avgpool", "fc") if n not in children]
    if missing or not layers:
        raise RescliError(f"{source}: no ResNet layers to explain (needs conv1, layer1..N, avgpool and fc; "
                          f"lacks {', '.join(missing) or 'layer1..N'})")
    return [n for n in STEM if n in children] + layers


def open_network(
    model: str | os.PathLike, *, device: str = "auto", precision: str = "fp32", what: str = "this command"
) -> StagedNet:
    """A checkpoint (.pt, run folder) or TorchScript export (.ts) as a StagedNet, checked against its own forward.

    ``what`` names the command in the error an ONNX export gets. Nothing in a checkpoint runs: it is read with
    ``weights_only``; a TorchScript file is a program, loaded only from a file named .ts/.torchscript.
    """
    path = run_folder_to_file(Path(model).expanduser())
    if not path.exists():
        raise RescliError(f"{path}: no such model file")
    kind = model_kind(path)
    if kind == "onnx":
        raise UsageError(NO_LAYERS.format(path=path, what=what))
    runtime = select_runtime(device=device, precision=precision)
    module: Any
    if kind == "torchscript":
        module, meta = open_torchscript(path, device=runtime.device)
    else:
        meta = load_checkpoint(path)
        module = model_from_checkpoint(meta, source=path).to(runtime.device)
    net = StagedNet(
        module=module.eval(), stages=residual_stages(module, source=str(path)), classes=list(meta["classes"]),
        img_size=int(meta["img_size"]), mean=list(meta["mean"]), std=list(meta["std"]),
        temperature=float(meta.get("temperature", 1.0)), runtime=runtime, kind=kind, source=str(path),
        fingerprint=file_fingerprint(path), meta={"arch": meta.get("arch"), "data": meta.get("data")},
        task=task_named(meta.get("task")),
        thresholds=[float(t) for t in meta["thresholds"]] if meta.get("thresholds") is not None else None,
    )
    check_split(net)
    net.cam_stage = choose_cam_stage(net)
    return net


def imagenet_network(*, arch: str = "resnet50", device: str = "auto", precision: str = "fp32") -> StagedNet:
    """torchvision's ImageNet weights for ``arch`` as a StagedNet: a backbone that never saw the user's images."""
    from rescli.models.registry import IMAGENET_MEAN, IMAGENET_STD, create_model
    from rescli.models.weights import load_pretrained

    module = create_model(arch, 1000)
    info = load_pretrained(module, arch=arch, weights="imagenet")
    runtime = select_runtime(device=device, precision=precision)
    return StagedNet(
        module=module.to(runtime.device).eval(), stages=residual_stages(module, source=arch),
        classes=[str(i) for i in range(1000)], img_size=224, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD),
        temperature=1.0, runtime=runtime, kind="imagenet", source=info.source, fingerprint=info.source,
    )


def check_split(net: StagedNet) -> None:
    """The two halves must give the file's own logits: a file whose forward is not conv1 .. layerN, avgpool, fc
    (a renamed layer, a wrapper) would otherwise be explained with maps it never uses."""
    generator = torch.Generator().manual_seed(0)
    probe = torch.randint(0, 256, (1, 3, net.img_size, net.img_size), dtype=torch.uint8, generator=generator)
    with torch.no_grad():
        x = net.inputs(probe)
        whole = net.module(x).float()
        halves = net.head(net.trunk(x)).float()
    diff = float((whole - halves).abs().max()) if whole.shape == halves.shape else float("inf")
    if not diff <= SPLIT_TOLERANCE * max(1.0, float(whole.abs().max())):
        raise RescliError(f"{net.source}: its layers conv1 .. {net.stages[-1]}, avgpool, fc do not reproduce its "
                          f"output (|difference| {diff:.3g}); it cannot be explained layer by layer")


#: An explanation weighs maps at least this many cells wide: at 32 px a ResNet-18's layer4 is 1x1, one number
#: that cannot say where anything is.
MIN_MAP_SIDE = 4


def choose_cam_stage(net: StagedNet, layer: str | None = None) -> str:
    """The stage explanations weigh: ``layer`` if given (layer1..N), else the last residual stage, or, where its
    maps are narrower than MIN_MAP_SIDE at this image size, the deepest stage whose maps are not."""
    layers = [n for n in net.stages if n.startswith("layer")]
    if layer is not None:
        if layer not in layers:
            raise UsageError(f"--layer {layer}: this net's residual stages are {', '.join(layers)}")
        return layer
    probe = torch.zeros(1, 3, net.img_size, net.img_size, dtype=torch.uint8)
    sides: dict[str, int] = {}
    with torch.no_grad():
        x = net.inputs(probe)
        for name in net.stages:
            x = getattr(net.module, name)(x)
            if name in layers:
                sides[name] = min(x.shape[-2:])
    wide = [n for n in layers if sides[n] >= MIN_MAP_SIDE]
    return wide[-1] if wide and sides[layers[-1]] < MIN_MAP_SIDE else layers[-1]


def file_fingerprint(path: Path, *, chunk: int = 1 << 20) -> str:
    """A short SHA-1 of the model file's bytes."""
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()[:16]
