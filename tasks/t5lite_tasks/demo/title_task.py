"""The fine-tuning demo task: a paragraph of Python's documentation -> the title of its page.

Built from the bundled demo corpus (data/{train,validation}.jsonl.gz, records {"text", "url",
"title"}, one page or a group of whole paragraphs of a page per record). Every paragraph (one
line of a record's text) of at least `MIN_WORDS` words becomes an example
`paragraph<TAB>page title`. The split is the corpus's own, by document: a document (a
page, or a part of a long page) goes to validation by the hash of its url, so the demo model
was pretrained on train documents only (28 of the 997 validation paragraphs, boilerplate such
as "Changed in version 3.11: ...", occur verbatim in train documents too). Titles are shared, though: 25 of the 35
validation titles (868 of the 997 validation examples) also head train documents (other parts
of the same pages), so the task is mostly "which page is this paragraph from" among the 478
train titles, and partly "name an unseen page" (on module pages the module's name is usually
in the paragraph). Examples are shuffled with a fixed seed (the decoding eval reads the first
validation examples, which then cover all validation pages).

    python tasks/t5lite_tasks/demo/title_task.py make --output_dir=runs/finetune_demo/data
    python tasks/t5lite_tasks/demo/title_task.py compare runs/finetune_demo/pretrained \\
        runs/finetune_demo/scratch

`make` writes train.tsv.gz and validation.tsv.gz (byte-identical on every run); `compare`
prints the last validation metrics of the given model dirs (metrics.jsonl) side by side.
`make finetune-demo` runs both around two `t5lite train` runs (see the README).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import sys

# Run as a script: importing the t5lite_tasks package would load TensorFlow and register tasks.
DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")

MIN_WORDS = 12
SEED = 0


def examples(split: str) -> list[tuple[str, str]]:
    """(paragraph, title) pairs of the corpus split, shuffled with a fixed seed."""
    out = []
    with gzip.open(os.path.join(DATA_DIR, f"{split}.jsonl.gz"), "rt", encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            title = " ".join(record["title"].split())
            if not title:
                continue
            for paragraph in record["text"].split("\n"):
                words = paragraph.split()  # also turns tabs into spaces
                if len(words) >= MIN_WORDS:
                    out.append((" ".join(words), title))
    random.Random(SEED).shuffle(out)
    return out


def make(output_dir: str) -> dict[str, int]:
    os.makedirs(output_dir, exist_ok=True)
    counts = {}
    for split in ("train", "validation"):
        rows = examples(split)
        path = os.path.join(output_dir, f"{split}.tsv.gz")
        tmp = path + ".tmp"
        with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
            for paragraph, title in rows:
                f.write(f"{paragraph}\t{title}\n".encode("utf-8"))
        os.replace(tmp, path)
        counts[split] = len(rows)
    return counts


def last_eval(model_dir: str) -> dict:
    path = os.path.join(model_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise SystemExit(f"error: {path} not found; train the model first")
    last = None
    with open(path, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if record.get("split") == "eval":
                last = record
    if last is None:
        raise SystemExit(f"error: {path} has no eval record")
    return last


def compare(model_dirs: list[str]) -> str:
    evals = [last_eval(d) for d in model_dirs]
    keys = ["step", "loss", "accuracy", "decode/exact_match", "decode/rouge1", "decode/rouge2",
            "decode/rougeL", "decode/num_examples"]
    width = max(len(d) for d in model_dirs) + 2
    lines = ["validation metrics (last eval; loss/accuracy teacher-forced per token, decode/* "
             "on greedy outputs, %)", "metric".ljust(22) + "".join(d.ljust(width)
                                                                  for d in model_dirs)]
    for key in keys:
        if any(key in e for e in evals):
            cells = [(f"{e[key]:.4f}" if isinstance(e.get(key), float) else str(e.get(key, "-")))
                     for e in evals]
            lines.append(key.ljust(22) + "".join(c.ljust(width) for c in cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_make = sub.add_parser("make", help="write train.tsv.gz / validation.tsv.gz")
    p_make.add_argument("--output_dir", required=True)
    p_cmp = sub.add_parser("compare", help="print the last eval metrics of model dirs")
    p_cmp.add_argument("model_dirs", nargs="+")
    args = parser.parse_args(argv)
    if args.command == "make":
        counts = make(args.output_dir)
        print(f"wrote {args.output_dir}/train.tsv.gz ({counts['train']} examples) and "
              f"validation.tsv.gz ({counts['validation']} examples)")
    else:
        print(compare(args.model_dirs))


if __name__ == "__main__":
    main(sys.argv[1:])
