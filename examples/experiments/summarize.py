#!/usr/bin/env python3
"""Mean and spread over seeds of the translate trainer's results.json files: one markdown table
row per model (the README's experiment tables). Usage: summarize.py runs/seeds/seed*/results.json"""
import json
import statistics
import sys


def spread(values, digits=2):
    mean = statistics.mean(values)
    deviation = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {deviation:.{digits}f}"


def main(paths):
    runs = {}
    for path in paths:
        with open(path) as file:
            for run in json.load(file)["runs"]:
                runs.setdefault((run["model"], run["attention"]), []).append(run)
    print(f"{len(paths)} seeds; mean ± standard deviation over seeds\n")
    print("| model | attention | parameters | tokens/s | valid loss | BLEU | BLEU LibreOffice | BLEU Ding | chrF | MI token-expert (shuffled) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for (model, attention), group in runs.items():
        def column(key, sub=None, digits=2):
            return spread([r[key][sub]["bleu"] if sub else r[key] for r in group], digits)
        information = "-"
        if all("mutual_information" in r for r in group):
            mean = [statistics.mean(site["tokens"] for site in r["mutual_information"].values()) for r in group]
            shuffled = [statistics.mean(site["shuffled"] for site in r["mutual_information"].values()) for r in group]
            information = f"{spread(mean, 3)} ({spread(shuffled, 3)})"
        print(f"| {model} | {attention} | {group[0]['parameters']:,} | {statistics.mean(r['tokens_per_second'] for r in group):,.0f} "
              f"| {column('valid_loss', digits=3)} | {column('bleu')} | {column('bleu_by_corpus', 'libreoffice')} "
              f"| {column('bleu_by_corpus', 'ding')} | {column('chrf')} | {information} |")
    p_values = []
    for path in paths:
        with open(path) as file:
            document = json.load(file)
            if "paired_bootstrap_p" in document:
                p_values.append(f"{document['paired_bootstrap_p']:.3f}")
    if p_values:
        print(f"\npaired bootstrap p-values (first model against the second), per seed: {', '.join(p_values)}")


if __name__ == "__main__":
    main(sys.argv[1:])
