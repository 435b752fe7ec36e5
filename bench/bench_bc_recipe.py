"""Does the default dataset leave room for alignment?

For each task: generate the default (perturbed) dataset and the clean scripted dataset,
train BC on each with the default config, and evaluate the success rate (95% Wilson CI)
at the default evaluation horizon. Prints a markdown table and writes
``bench/results/bench_bc_recipe.json``.

    python bench/bench_bc_recipe.py [--tasks metaworld/door-open-v3 metaworld/button-press-v3]
        [--episodes 100] [--steps 4000] [--eval-episodes 50]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fkpd.config import to_json_dict
from fkpd.data import DataRecipe, dataset_info, generate_dataset, load_dataset
from fkpd.policy.rollout import evaluate
from fkpd.train.bc import BCConfig, train_bc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["metaworld/door-open-v3", "metaworld/button-press-v3"])
    ap.add_argument("--recipes", nargs="+", default=["default", "clean"])
    ap.add_argument("--episodes", type=int, default=100)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--eval-episodes", type=int, default=50)
    ap.add_argument("--out", default="runs/bench_bc_recipe")
    ap.add_argument("--json", default="bench/results/bench_bc_recipe.json")
    ap.add_argument("--recipe", default="{}", help="JSON overrides of DataRecipe fields for the default recipe")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for training (0: default)")
    args = ap.parse_args()
    rows = []
    for task in args.tasks:
        for recipe_name in args.recipes:
            t0 = time.time()
            root = Path(args.out) / task.replace("/", "_") / recipe_name
            overrides = json.loads(args.recipe)
            fields = {**to_json_dict(DataRecipe.for_task(task)), **overrides}
            fields["miscal_radius"] = tuple(fields["miscal_radius"])
            recipe = DataRecipe.clean() if recipe_name == "clean" else DataRecipe(**fields)
            data = root / "data.hdf5"
            if not data.exists():
                generate_dataset(task, args.episodes, data, recipe=recipe, seed=0)
            info = dataset_info(load_dataset(data, task))
            ckpt = train_bc(BCConfig(task=task, dataset=str(data), out_dir=str(root / "bc"), steps=args.steps,
                                     eval_every=0, threads=args.threads))
            res = evaluate(ckpt, episodes=args.eval_episodes)
            row = {"task": task, "recipe": recipe_name, "recipe_fields": to_json_dict(recipe), "data_success_rate": info.get("success_rate"),
                   **res.summary(), "wall_s": time.time() - t0}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print("| task | data | data success | BC success (95% CI) | BC mean return |")
    print("|---|---|---|---|---|")
    for r in rows:
        lo, hi = r["success_ci95"]
        print(f"| {r['task']} | {r['recipe']} | {r['data_success_rate']:.0%} | {r['success_rate']:.0%} "
              f"({lo:.0%}-{hi:.0%}) | {r['mean_return']:.1f} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
