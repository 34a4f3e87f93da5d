"""Written with snnet at commit fa1757f (before the configuration tree): a training run stopped at
step 4 of 10 (tests/data/run-v1/run), and the weights of the same run left uninterrupted
(tests/data/run-v1/uninterrupted.safetensors)."""
import shutil, sys
from pathlib import Path
import torch
from safetensors.torch import save_file
sys.path.insert(0, ".")
import snnet
from snnet.train import OptimConfig, TrainConfig, train
from tests.conftest import Synthetic
torch.set_num_threads(1)

OUT = Path(sys.argv[1])
def net():
    torch.manual_seed(0)
    return snnet.create_snnet(["snnet_tiny_vit_ti", "snnet_tiny_vit_s"])
def conf(out):
    return TrainConfig(epochs=2, batch_size=8, out_dir=str(out), progress=False, tensorboard=False, init_images=16,
                       log_every=5, ckpt_every=0, sampler="flops_bucketed")
optim = OptimConfig(lr=1e-3, warmup_steps=2)
full = net()
train(full, Synthetic(40), conf(OUT / "full"), optim)
save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(OUT / "uninterrupted.safetensors"))
part = train(net(), Synthetic(40), conf(OUT / "run"), optim, stop_after=4)
print(part)
shutil.rmtree(OUT / "full")
