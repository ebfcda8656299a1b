"""How visible each attack's trigger is to the tiny victim's frozen encoder (EfficientNet-Lite0 to
block 15: 7 x 7 cells of 32 px), methods/victim.md §T1: pixels changed, the token change at the most
changed cell over that cell's spread across clean images, and a 5-fold linear probe (clean vs
triggered) on that cell's token, over 200 val + test images of a generated world:

    PYTHONPATH=. python3 scripts/diagnostics/trigger_probe.py /tmp/vbb-validate/world/world-v3-seed0 \
        badnet blended trojvlm vlood
"""
import sys, numpy as np, torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from vlmbackdoor_bench.data.karpathy import load_karpathy_split
from vlmbackdoor_bench.data.world import world_paths
from vlmbackdoor_bench.victims.efficientnet import EfficientNetLite0, pretrained_efficientnet_lite0
from vlmbackdoor_bench.registry import load_registry
torch.set_num_threads(1)
from pathlib import Path; world = Path(sys.argv[1])
j, root = world_paths(world, "coco")
imgs = []
for split in ("val", "test"):
    s = load_karpathy_split(j, root, split, dataset="w", cache_dir=None, workers=1)
    imgs.append(np.asarray(s.images)); ids = s.image_ids
images = np.concatenate(imgs)[:200]; ids = list(range(len(images)))
net = pretrained_efficientnet_lite0().eval()
def tokens(x):
    with torch.no_grad():
        t = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
        return torch.cat([net.features(t[i:i+25], 15).flatten(2).transpose(1, 2) for i in range(0, len(t), 25)]).numpy()
clean = tokens(images)
cell_std = np.sqrt(((clean - clean.mean(0)) ** 2).sum(-1).mean(0))  # per cell, across images
reg = load_registry()
extra = {}
for name in sys.argv[2:]:
    attack = reg.attack(name)
    params = dict(attack.presets[attack.default_preset])
    trig = attack.apply_trigger(images, ids, params=params, seed=0)
    t = tokens(trig)
    delta = np.linalg.norm(t - clean, axis=-1)  # (N, 49)
    top = delta.argmax(1)
    snr = delta / cell_std[None]
    changed_px = (trig != images).any(-1).mean()
    # probe: clean vs triggered from the most-changed cell's token (fixed cell for fixed triggers)
    cell = np.bincount(top).argmax()
    X = np.concatenate([clean[:, cell], t[:, cell]]); y = np.r_[np.zeros(len(t)), np.ones(len(t))]
    acc_cell = cross_val_score(LogisticRegression(max_iter=2000, C=0.1), X, y, cv=5).mean()
    # position-free probe: each image's max-change cell token vs a clean token at the same cell
    Xp = np.concatenate([clean[np.arange(len(t)), top], t[np.arange(len(t)), top]])
    acc_pos = cross_val_score(LogisticRegression(max_iter=2000, C=0.1), Xp, y, cv=5).mean()
    print(f"{name:10s} pixels changed {100*changed_px:.2f}%  max-cell SNR mean {snr.max(1).mean():.2f} "
          f"(cell {cell}: {np.mean(top == cell)*100:.0f}% of images)  probe@cell{cell} {acc_cell*100:.1f}%  probe@own-cell {acc_pos*100:.1f}%")
