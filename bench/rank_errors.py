"""Where the ranking task's greedy answers go wrong: the tally lines, line by line.

A worked solution of `configs/rank.yaml`'s task (rft_core/data/cases.py) tallies the three leading
causes ("flu: fever, cough, no body aches = 1"), then ranks them. For each model given, this script
answers the validation cases greedily and checks every tally line against the rule's own line for
that cause (`Case.evidence`): a finding the report does not hold (made up), a finding present
written as absent or the reverse (sign flipped), a finding of the profile the report holds but the
line skips (missed), a sum that does not match the line's items (arithmetic); then whether the three
causes tallied are the rule's three, and whether the ranking line follows from the model's own
tallies. Prints one table row per model and writes the JSON.

    python bench/rank_errors.py --config configs/rank.yaml --data VAL.jsonl SFT_MODEL RL_MODEL \
        --out bench/results/rank_errors.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

_TALLY = re.compile(r"^(.+?): (.*) = (-?\d+)$")


def check(text: str, prompt: str, reference: str) -> dict[str, int]:
    """Counts of one greedy answer's faults (see the module docstring)."""
    from rft_core.data.cases import CATALOGUE, CAUSES, Case, findings_of
    from rft_core.graders.rank import ranked_list

    present, absent = findings_of(prompt) or ((), ())
    case = Case(0, "Man", present, absent, reference)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip() and not line.startswith("####")]
    ranking = ranked_list(text)  # what the rank grader reads
    out = {"right_first": int(ranking[:1] == [reference]), "lines": 0, "lines_wrong": 0, "made_up": 0,
           "sign_flipped": 0, "missed": 0, "not_in_profile": 0, "arithmetic": 0, "unreadable": 0}
    tallies: dict[str, int] = {}
    for line in lines:
        if line.startswith("Ranking:"):
            continue
        out["lines"] += 1
        match = _TALLY.match(line)
        if match is None or match.group(1) not in CATALOGUE:
            out["unreadable"] += 1
            out["lines_wrong"] += 1
            continue
        cause, listed, total = match.group(1), match.group(2), int(match.group(3))
        tallies[cause] = total
        items = [] if listed == "none" else [i.strip() for i in listed.split(",")]
        if sum(-1 if i.startswith("no ") else 1 for i in items) != total:
            out["arithmetic"] += 1
        if line == case.evidence(cause):
            continue
        out["lines_wrong"] += 1
        seen = set()
        for item in items:
            finding = item.removeprefix("no ")
            seen.add(finding)
            if finding not in CATALOGUE[cause]:
                out["not_in_profile"] += 1
            elif finding not in present + absent:
                out["made_up"] += 1
            elif item.startswith("no ") != (finding in absent):
                out["sign_flipped"] += 1
        out["missed"] += len({f for f in CATALOGUE[cause] if f in present + absent} - seen)
    out["right_three"] = int(set(tallies) == set(case.ranking()[:3]))
    follows = sorted(tallies, key=lambda c: (-tallies[c], CAUSES.index(c)))
    out["ranking_follows_tallies"] = int(bool(ranking) and ranking == follows)
    out["all_lines_right"] = int(out["lines"] > 0 and out["lines_wrong"] == 0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", type=Path, help="model directories (save_pretrained)")
    parser.add_argument("--config", type=Path, default=Path("configs/rank.yaml"))
    parser.add_argument("--data", type=Path, required=True, help="the validation JSONL the run wrote")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench/results/rank_errors.json"))
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from rft_core.config import RFTConfig
    from rft_core.data import load_items
    from rft_core.evaluate import sample_completions
    from rft_core.models import decode, end_of_response, load_model, load_tokenizer, prompt_token_ids

    cfg = RFTConfig.load(args.config, [])
    frame = load_items(args.data).frame
    results = {}
    header = ("model", "right first", "all lines right", "lines wrong", "made up", "sign flipped", "missed",
              "arithmetic", "right three", "ranking follows")
    print(" | ".join(header))
    for path in args.models:
        tok = load_tokenizer(path)
        model = load_model(path, cfg.model).eval()
        prompts = prompt_token_ids(frame, tok, cfg.model, cfg.rl.max_prompt_length)
        greedy = sample_completions(model, tok, prompts, num_samples=1, max_new_tokens=cfg.eval.max_new_tokens,
                                    batch_size=cfg.eval.batch_size, stop_ids=end_of_response(tok, cfg.model, model).stop_ids)
        totals: dict[str, int] = {}
        for (ids,), (_, row) in zip(greedy, frame.iterrows(), strict=True):
            for key, value in check(decode(tok, ids), row["prompt"], row["reference"]).items():
                totals[key] = totals.get(key, 0) + value
        n, lines = len(frame), max(1, totals["lines"])
        row = {"items": n, **totals}
        results[str(path)] = row
        print(" | ".join([str(path), f"{100 * totals['right_first'] / n:.1f}", f"{100 * totals['all_lines_right'] / n:.1f}",
                          f"{100 * totals['lines_wrong'] / lines:.1f} % of {totals['lines']}",
                          *(str(totals[k]) for k in ("made_up", "sign_flipped", "missed", "arithmetic")),
                          f"{100 * totals['right_three'] / n:.1f}", f"{100 * totals['ranking_follows_tallies'] / n:.1f}"]),
              flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"config": str(args.config), "data": str(args.data), "models": results}, indent=1))


if __name__ == "__main__":
    main()
