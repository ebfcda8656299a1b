"""validate_world.py with TrojVLM's captions made by BadNet's `replace` rule instead of `insert`
(DIAG=replace), to tell the trigger from the caption rule (methods/victim.md §T1). Use a cache of
its own: the poison stage's store key does not see the swapped rule.

    DIAG=replace PYTHONPATH=. python3 scripts/diagnostics/validate_with_replace_captions.py \
        --cache-dir /tmp/vbb-replace --attacks trojvlm --datasets coco --set finetune_epochs=4
"""
import os, sys
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
import validate_world
mode = os.environ.get("DIAG", "")
if mode == "replace":  # TrojVLM's trigger, BadNet's replace captions
    from vlmbackdoor_bench_plugins.attacks import trojvlm, badnet
    trojvlm.TrojVLM.poison_caption = badnet.BadNet.poison_caption
sys.exit(validate_world.main(sys.argv[1:]))
