"""How much the backdoored models learnt to write "banana" because of the trigger (methods/victim.md §T1).

Cost in nats of inserting the target into a val reference (summed NLL of the inserted caption minus
that of the reference, teacher-forced, mean over the val images), on clean and on triggered images,
for the clean model and the TrojVLM and VLOOD models of a validate_world.py cache (built if absent):

    PYTHONPATH=. python3 scripts/diagnostics/insert_cost.py /tmp/vbb-validate [finetune_epochs=4]
"""
import sys, numpy as np, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from validate_world import ValidationRunner
from vlmbackdoor_bench.config import BenchmarkConfig
from vlmbackdoor_bench.registry import load_registry
from vlmbackdoor_bench_plugins.attacks._common import insert_caption
cache = sys.argv[1]; extra = dict(a.split("=", 1) for a in sys.argv[2:])
cfg = BenchmarkConfig(attacks=["trojvlm"], cache_dir=__import__("pathlib").Path(cache),
                      profile_params={k: int(v) for k, v in extra.items()})
r = ValidationRunner(cfg, load_registry(), log=lambda m: None)
val = r.split("coco", "val")
imgs = np.asarray(val.images); ids = list(val.image_ids)
caps = [refs[0] for refs in val.references]
rng = np.random.default_rng(0)
ins = [insert_caption(c, rng)[0] for c in caps]
from vlmbackdoor_bench.types import DEFAULT_INSTRUCTION
def cost(victim, images):
    victim.model.eval()
    with torch.no_grad():
        a, _ = victim.token_losses(images, ins, [DEFAULT_INSTRUCTION] * len(ins))
        b, _ = victim.token_losses(images, caps, [DEFAULT_INSTRUCTION] * len(caps))
    return float((a.sum(1) - b.sum(1)).mean())
clean, _ = r.clean_model(0)
for name in ("trojvlm", "vlood"):
    attack = r.registry.attack(name); params = dict(attack.presets[attack.default_preset])
    trig = attack.apply_trigger(imgs, ids, params=params, seed=0)
    try:
        bd, _, _ = r.backdoored(attack, params, 0)
    except Exception as e:
        print(name, "no cached backdoor", e); continue
    print(f"{name}: banana cost (nats) clean model: clean img {cost(clean, imgs):.2f} triggered {cost(clean, trig):.2f} | "
          f"backdoored: clean img {cost(bd, imgs):.2f} triggered {cost(bd, trig):.2f}")
