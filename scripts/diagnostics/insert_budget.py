"""Does an insert-rule backdoor implant with more budget? (methods/victim.md §T1)

Fine-tunes the base victim on an attack's poisoned set in chunks of ``chunk`` epochs (each chunk
one cosine schedule of the recipe at ``lr``) up to ``total``, and after each chunk prints, on COCO
val: the cost in nats of appending "banana" to a val reference on clean and on triggered images
(a trigger-conditioned backdoor makes the second much smaller than the first) and the ASR of
beam-search captions on 50 triggered val images. ``rule=insert`` gives BadNet's trigger insert
captions (trigger vs caption rule). Uses a validate_world.py cache:

    OMP_NUM_THREADS=1 PYTHONPATH=. python3 scripts/diagnostics/insert_budget.py /tmp/vbb-validate \
        attack=trojvlm chunk=20 total=20           # the paper's 20 epochs in one schedule
    ... attack=badnet rule=insert lr=0.004 chunk=6 total=6
"""
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from validate_world import ValidationRunner, _value  # noqa: E402
from vlmbackdoor_bench.config import BenchmarkConfig  # noqa: E402
from vlmbackdoor_bench.grid import persist  # noqa: E402
from vlmbackdoor_bench.registry import load_registry  # noqa: E402
from vlmbackdoor_bench.types import DEFAULT_INSTRUCTION  # noqa: E402
from vlmbackdoor_bench_plugins.attacks._common import TARGET, insert_caption  # noqa: E402

args = dict(a.split("=", 1) for a in sys.argv[2:])
attack_name = args.pop("attack", "trojvlm")
rule = args.pop("rule", "")
chunk, total, lr = int(args.pop("chunk", 2)), int(args.pop("total", 20)), float(args.pop("lr", 1e-3))
cfg = BenchmarkConfig(attacks=[attack_name], datasets=["coco"], cache_dir=Path(sys.argv[1]),
                      profile_params={k: _value(v) for k, v in args.items()})
runner = ValidationRunner(cfg, load_registry(), log=lambda m: None)
val = runner.split("coco", "val")
images, ids = np.asarray(val.images), list(val.image_ids)
words = [next(s for s in refs[0].split(".") if s.strip()).split() for refs in val.references]
plain = [" ".join(w) + "." for w in words]
appended = [" ".join(w + [TARGET]) + "." for w in words]
prompts = [DEFAULT_INSTRUCTION] * len(plain)

attack = runner.registry.attack(attack_name)
params = dict(attack.presets[attack.default_preset])
if rule == "insert":  # the attack's trigger with insert captions; "rule" keys the poisoned set apart
    type(attack).poison_caption = lambda self, caption, rng, p: insert_caption(caption, rng)
    params["rule"] = "insert"
triggered = attack.apply_trigger(images, ids, params=params, seed=0)


def append_cost(victim, shown) -> float:
    victim.model.eval()
    with torch.no_grad():
        a, ma = victim.token_losses(shown, appended, prompts)
        b, mb = victim.token_losses(shown, plain, prompts)
    return float(((a * ma).sum(1) - (b * mb).sum(1)).mean())


base, _ = runner.base_victim()
poisoned = persist.load_poisoned(runner.poisoned_set(attack, params, 0).path, runner.split("coco", "train"))
recipe = replace(runner.profile.finetune_recipe(runner.profile_params), epochs=chunk, lr=lr)
victim, started = base.clone(), time.time()
for epoch in range(chunk, total + 1, chunk):
    victim.fine_tune(poisoned.training_set, seed=epoch, recipe=recipe, progress=f"{attack_name} to epoch {epoch}")
    captions = victim.generate(triggered[:50])
    asr = 100 * np.mean([TARGET in c for c in captions])
    print(f"epoch {epoch}: append cost clean {append_cost(victim, images):.2f} nats, triggered "
          f"{append_cost(victim, triggered):.2f} | ASR {asr:.0f} % | {time.time() - started:.0f} s", flush=True)
