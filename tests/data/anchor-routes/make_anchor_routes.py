"""Written with snnet at commit 150a7dd (before anchors held their timm model, issue 22 item 4): for each kind
of family in snnet.tiny, built at seed 0, the stitched network's state-dict keys and shapes, and the logits of every
anchor route and of the first stitch of every stitching layer on fixed images (weights are not stored: 6 MB).

tests/test_anchors.py builds each family the same way now and compares: the same keys, and (under the timm version
recorded, whose initialisation made the weights) the same logits. Run from the repository root:
    PYTHONPATH=$PWD python tests/data/anchor-routes/make_anchor_routes.py tests/data/anchor-routes
"""
import sys
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

import snnet

torch.set_num_threads(1)
FAMILIES = {  # one per kind snnet.tiny registers: name -> (anchors, image size, route mode)
    "vit": (["snnet_tiny_vit_ti", "snnet_tiny_vit_s", "snnet_tiny_vit_b"], 32, "snnet"),
    "vit-reference": (["snnet_tiny_vit_ti", "snnet_tiny_vit_s"], 32, "reference"),
    "deit3": (["snnet_tiny_deit3_s", "snnet_tiny_deit3_l"], 32, "snnet"),
    "swin": (["snnet_tiny_swin_t", "snnet_tiny_swin_s"], 32, "snnet"),
    "resnet": (["snnet_tiny_resnet18", "snnet_tiny_resnet50"], 32, "snnet"),
    "convnext": (["snnet_tiny_convnext_t", "snnet_tiny_convnext_s"], 32, "snnet"),
    "levit": (["snnet_tiny_levit_a", "snnet_tiny_levit_b"], 32, "snnet"),
    "resnet-swin": (["snnet_tiny_resnet18", "snnet_tiny_swin_t"], 32, "snnet"),
}


def build(name: str) -> snnet.StitchedNet:
    anchors, size, mode = FAMILIES[name]
    torch.manual_seed(0)
    return snnet.create_snnet(anchors, img_size=size, route_mode=mode).eval()


def routes(net: snnet.StitchedNet) -> list:
    return net.space.anchor_stitches() + [net.space.layer_stitches(k)[0] for k in range(len(net.space.layers))]


def images(name: str) -> torch.Tensor:
    size = FAMILIES[name][1]
    return torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))


if __name__ == "__main__":
    out = Path(sys.argv[1])
    for name in FAMILIES:
        net = build(name)
        x = images(name)
        net.init_stitching([x])
        tensors = {f"shape/{k}": torch.tensor(v.shape, dtype=torch.int64) for k, v in net.state_dict().items()}
        with torch.no_grad():
            for s in routes(net):
                net.select(s)
                tensors[f"logits/{s.name}"] = net(x).contiguous()
        save_file(tensors, str(out / f"{name}.safetensors"), metadata={"timm": timm.__version__, "torch": torch.__version__})
        print(name, len(tensors), sum(v.numel() for v in tensors.values()))
