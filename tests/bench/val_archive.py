#!/usr/bin/env python3
"""Builds a validation archive from the IMDB archive: the training reviews of 20% of the
training movies (seeded choice of IMDB title ids from train/urls_{pos,neg}.txt) become its
"test" split, the other training reviews its "train" split; the official test set is left
out. Pipeline-level choices (rules of the aggregator, for example) are measured on it so that
the official test set only feeds reports.

Usage: val_archive.py SOURCE.tar.gz OUT.tar.gz [SEED]
"""
import io
import random
import re
import sys
import tarfile


def movie(url):
    return url.split("/title/")[1].split("/")[0]


def main():
    source, out_path = sys.argv[1], sys.argv[2]
    seed = int(sys.argv[3]) if len(sys.argv) > 3 else 11
    reviews, urls = [], {}
    with tarfile.open(source) as src:
        for m in src:
            if not m.isfile():
                continue
            u = re.match(r"aclImdb/train/urls_(pos|neg)\.txt$", m.name)
            r = re.match(r"aclImdb/train/(pos|neg)/(\d+)_(\d+)\.txt$", m.name)
            if u:
                urls[u.group(1)] = src.extractfile(m).read().decode().splitlines()
            elif r:
                reviews.append((r.group(1), int(r.group(2)), r.group(3), src.extractfile(m).read()))
    movies = sorted({movie(u) for lines in urls.values() for u in lines})
    random.Random(seed).shuffle(movies)
    held = set(movies[: len(movies) // 5])
    counts = {"train": 0, "test": 0}
    with tarfile.open(out_path, "w:gz", compresslevel=1) as out:
        for label, i, rating, text in reviews:
            split = "test" if movie(urls[label][i]) in held else "train"
            counts[split] += 1
            info = tarfile.TarInfo(f"aclImdb/{split}/{label}/{i}_{rating}.txt")
            info.size = len(text)
            out.addfile(info, io.BytesIO(text))
    print(f"{out_path}: {counts['train']} training reviews, {counts['test']} held out (seed {seed})")


if __name__ == "__main__":
    main()
