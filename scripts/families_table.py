"""Print the README's table of model families: what snnet stitches, how many networks, what FLOPs.

Each row builds one family from timm's real architectures on the meta device (no weights,
no download) exactly as ``snnet stitches --anchors <anchors> [--img-size N]`` does, and
prints its stitch space, or the one-line reason snnet refuses it; the notes under the table
give each row's command. Markdown on stdout:

    python scripts/families_table.py
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

import snnet
from snnet.report import human


@dataclass(frozen=True)
class Row:
    name: str  # what a reader calls the family
    timm_class: str
    sizes: str  # the anchors, as a reader calls them
    anchors: str  # a named family or comma-separated timm names, as `--anchors` takes them
    img_size: int | None = None  # None: the anchors' own


ROWS = [
    Row("DeiT (paper)", "VisionTransformer", "Ti/S/B", "deit"),
    Row("DeiT distilled", "VisionTransformerDistilled", "Ti/S/B", "deit-distilled"),
    Row("EVA-02", "Eva", "Ti/S, 336", "eva02"),
    Row("Swin (paper)", "SwinTransformer", "T/S/B", "swin"),
    Row("Swin V2", "SwinTransformerV2", "T/S/B, window 8, 256", "swinv2"),
    Row("Swin V2 CR", "SwinTransformerV2Cr", "T/S/B", "swinv2_cr_tiny_224,swinv2_cr_small_224,swinv2_cr_base_224"),
    Row("ConvNeXt", "ConvNeXt", "T/S/B", "convnext"),
    Row("LeViT (paper)", "LevitDistilled", "192/256", "levit"),
    Row("LeViT", "LevitDistilled", "128S/128/192/256/384", "levit_128s,levit_128,levit_192,levit_256,levit_384"),
    Row("ResNet (paper)", "ResNet", "18/50", "resnet"),
    Row("ResNet → Swin (paper)", "ResNet, SwinTransformer", "R-18 → Swin-T", "resnet18-swin_t"),
    Row("RegNetY", "RegNet", "400MF/800MF/1.6GF", "regnety"),
    Row("EfficientNet", "EfficientNet", "B0/B1/B2 at 224", "tf_efficientnet_b0,tf_efficientnet_b1,tf_efficientnet_b2", 224),
    Row("MobileNetV3", "MobileNetV3", "small/large 1.0", "mobilenetv3"),
    Row("CNN → plain ViT", "ResNet, VisionTransformer", "R-18 → DeiT-Ti", "resnet18,deit_tiny_patch16_224"),
    Row("DeiT + distilled DeiT", "VisionTransformer(Distilled)", "Ti, S distilled", "deit_tiny_patch16_224,deit_small_distilled_patch16_224"),
    Row("ViT with learned rope", "Eva (rope_mixed)", "S/B RoPE-Mixed", "vit_small_patch16_rope_mixed_224,vit_base_patch16_rope_mixed_224"),
    Row("MLP-Mixer", "MlpMixer", "S/16, B/16", "mixer_s16_224,mixer_b16_224"),
]


def _cell(row: Row) -> tuple[str, str, str, str]:
    """(input, networks, FLOPs, status) of one row."""
    try:
        net = snnet.create_snnet(row.anchors, img_size=row.img_size, device="meta")
    except snnet.SnnetError as e:
        reason = str(e).split("cannot be stitched: ", 1)[-1]
        if reason.startswith("no adapter"):  # the list of known kinds is the table itself
            reason = reason.split(";")[0]
        return "", "", "", f"refused: {reason}"
    flops = [c.flops for c in net.costs()]
    size = "x".join(str(s) for s in net.input_size[1:])
    nets = f"{len(net.space)} ({len(net.anchors)} anchors)"
    return size, nets, f"{human(min(flops))}–{human(max(flops))}", "supported"


def main() -> int:
    torch.set_num_threads(1)
    print("| family | timm class | anchors | networks | FLOPs | status |")
    print("|---|---|---|---|---|---|")
    notes = []
    for k, row in enumerate(ROWS, 1):
        size, nets, flops, status = _cell(row)
        at = f" at {size}" if size else ""
        print(f"| {row.name} | {row.timm_class} | {row.sizes} [{k}] | {nets} | {flops}{at} | {status} |", flush=True)
        flag = f" --img-size {row.img_size}" if row.img_size else ""
        notes.append(f"[{k}] `snnet stitches --anchors {row.anchors}{flag}`")
    print()
    print("  \n".join(notes))  # markdown line breaks
    return 0


if __name__ == "__main__":
    sys.exit(main())
