"""Check snnet's FLOPs against fvcore's, the counter the SN-Net paper reports, on timm models.

For each model (random weights, batch 1, its default input size unless ``name@size``), fvcore
traces the whole timm model and snnet counts the parts its adapter split the model into;
the two totals are printed side by side with fvcore's count per operator. Exits 1 if any
differ. fvcore is not a dependency of snnet: ``pip install fvcore`` to run this.

    python scripts/fvcore_check.py                   # one model of every supported family
    python scripts/fvcore_check.py resnet50 levit_256@224
"""

from __future__ import annotations

import logging
import sys
import warnings

import timm
import torch

from snnet.anchors import split_model
from snnet.flops import part_costs, unfused_attention

DEFAULT = ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "swin_tiny_patch4_window7_224", "resnet18",
           "resnet50", "convnext_tiny", "levit_192", "levit_256", "swinv2_tiny_window8_256", "eva02_tiny_patch14_224",
           "regnety_004", "efficientnet_b0", "mobilenetv3_large_100"]


def main(argv: list[str]) -> int:
    try:
        from fvcore.nn import FlopCountAnalysis
    except ImportError:
        print("fvcore is not installed: pip install fvcore", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)  # fvcore logs every op it does not count
    torch.set_num_threads(1)
    bad = 0
    print(f"{'model':<36} {'fvcore':>16} {'snnet':>16}  fvcore by operator")
    for arg in argv or DEFAULT:
        name, _, size = arg.partition("@")
        model = timm.create_model(name).eval()
        res = int(size) if size else model.pretrained_cfg["input_size"][-1]
        x = torch.zeros(1, 3, res, res)
        with torch.no_grad(), unfused_attention(model):  # as timm's models ran when the paper counted
            fa = FlopCountAnalysis(model, x)
            fa.unsupported_ops_warnings(False)
            fa.uncalled_modules_warnings(False)
            theirs, ops = fa.total(), dict(fa.by_operator())
        ours = part_costs(split_model(model), (3, res, res)).total[0]
        bad += ours != theirs
        mark = "" if ours == theirs else "  <-- differs"
        print(f"{name + '@' + str(res):<36} {theirs:>16,} {ours:>16,}  {ops}{mark}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
