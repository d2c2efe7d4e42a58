#!/usr/bin/env bash
# Cut the shared datasets down to what benchmarks/gpu_smoke.sh needs, into a git-ignored folder of the repo
# that a GPU call can carry (the call carries at most 64 MiB, code included). Run it on the CPU machine:
#
#   bash benchmarks/prepare_gpu_data.sh .carry/data          # then carry .carry on the GPU call
#
# DEST gets the layouts the tasks read (see src/beit/configs/*.yaml and /work/shared/data/README.md):
#   cifar10/{train,test}/<class>/NNNN.jpg       ImageFolder classes (tokenizer, pretrain, finetune, linprobe)
#   CamVid/{train.txt,val.txt,train,trainannot,val,valannot}   segment_camvid.yaml's "list" format
#   docbank/{annotations.json,images/}          layout_docbank.yaml (holdout split inside the one JSON)
#   publaynet/{train.json,train/,val.json,val/} layout_publaynet_base.yaml
# Sizes are env variables (defaults below). Prints the size of DEST and of the repository's working tree.
set -euo pipefail

DEST=${1:?usage: prepare_gpu_data.sh DEST [SRC]   (DEST: a git-ignored folder, e.g. .carry/data)}
SRC=${2:-${BEIT_SHARED_DATA:-/work/shared/data}}
PYTHON=${PYTHON:-python3}
CIFAR_TRAIN_PER_CLASS=${CIFAR_TRAIN_PER_CLASS:-300}   # 3,000 train images
CIFAR_TEST_PER_CLASS=${CIFAR_TEST_PER_CLASS:-100}     # 1,000 test images
CAMVID_TRAIN=${CAMVID_TRAIN:-48}                      # of 240 (480x360 JPEG + PNG mask, ~80 KB a pair)
CAMVID_VAL=${CAMVID_VAL:-16}                          # of 101
DOCBANK_PAGES=${DOCBANK_PAGES:-40}                    # of 100 (the preset holds out 20 of them for eval)
PUBLAYNET_VAL=${PUBLAYNET_VAL:-4}                     # of its 20 pages; the rest train
MAX_MIB=${MAX_MIB:-50}                                # DEST + repo must stay under this

for f in cifar10/train.tar.gz cifar10/test.tar.gz camvid_subset/camvid_subset.tar \
         docbank_subset/docbank_subset.tar.gz docbank_subset/annotations.json \
         publaynet_subset/publaynet_subset_images.tar publaynet_subset/annotations.json; do
  [ -f "$SRC/$f" ] || { echo "prepare_gpu_data: missing $SRC/$f" >&2; exit 1; }
done
if git -C "$(dirname "$DEST")" rev-parse --is-inside-work-tree >/dev/null 2>&1 \
   && ! git -C "$(dirname "$DEST")" check-ignore -q "$(basename "$DEST")" 2>/dev/null; then
  echo "prepare_gpu_data: warning: $DEST is not git-ignored; it would travel (and could be committed)" >&2
fi
rm -rf "$DEST"
mkdir -p "$DEST"

"$PYTHON" - "$SRC" "$DEST" "$CIFAR_TRAIN_PER_CLASS" "$CIFAR_TEST_PER_CLASS" "$CAMVID_TRAIN" "$CAMVID_VAL" \
    "$DOCBANK_PAGES" "$PUBLAYNET_VAL" <<'PY'
import json
import sys
import tarfile
from pathlib import Path

src, dest = Path(sys.argv[1]), Path(sys.argv[2])
cifar_train, cifar_test, cam_train, cam_val, doc_pages, pub_val = map(int, sys.argv[3:9])


def extract(tar_path: Path, out: Path, keep) -> int:
    """Extract the regular files whose names ``keep(name)`` accepts; returns how many."""
    n = 0
    with tarfile.open(tar_path) as tar:
        for m in tar:
            if m.isfile() and keep(m.name):
                target = out / m.name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(m).read())
                n += 1
    return n


def evenly(items: list, k: int) -> list:
    """``k`` items spread evenly over ``items`` (all of them when k >= len)."""
    if k >= len(items):
        return list(items)
    return [items[round(i * (len(items) - 1) / max(k - 1, 1))] for i in range(k)]


# CIFAR-10: the first N images of every class (<class>/NNNN.jpg)
for split, per_class in (("train", cifar_train), ("test", cifar_test)):
    n = extract(src / "cifar10" / f"{split}.tar.gz", dest / "cifar10" / split,
                lambda name, k=per_class: name.endswith(".jpg") and int(Path(name).stem) < k)
    print(f"cifar10/{split}: {n} images")

# CamVid: evenly spaced pairs of each list, lists rewritten to the kept pairs
with tarfile.open(src / "camvid_subset" / "camvid_subset.tar") as tar:
    lists = {s: tar.extractfile(f"CamVid/{s}.txt").read().decode().split("\n") for s in ("train", "val")}
keep_lines = {}
for split, k in (("train", cam_train), ("val", cam_val)):
    lines = [ln for ln in lists[split] if ln.strip()]
    keep_lines[split] = evenly(lines, k)
wanted = {f"CamVid/{p}" for lines in keep_lines.values() for ln in lines for p in ln.split()}
n = extract(src / "camvid_subset" / "camvid_subset.tar", dest, lambda name: name in wanted)
for split, lines in keep_lines.items():
    (dest / "CamVid" / f"{split}.txt").write_text("\n".join(lines) + "\n")
print(f"CamVid: {len(keep_lines['train'])} train / {len(keep_lines['val'])} val pairs ({n} files)")
if n != len(wanted):
    sys.exit(f"CamVid: {len(wanted) - n} listed files missing from the tar")


def cut_coco(coco: dict, images: list[dict]) -> dict:
    ids = {im["id"] for im in images}
    out = {k: v for k, v in coco.items() if k not in ("images", "annotations")}
    out["images"] = images
    out["annotations"] = [a for a in coco["annotations"] if a["image_id"] in ids]
    return out


# DocBank: evenly spaced pages, one annotations.json with images/ next to it (the preset's holdout splits it)
doc = json.loads((src / "docbank_subset" / "annotations.json").read_text())
doc_images = evenly(sorted(doc["images"], key=lambda im: im["id"]), doc_pages)
names = {f"images/{im['file_name']}" for im in doc_images}
n = extract(src / "docbank_subset" / "docbank_subset.tar.gz", dest / "docbank", lambda name: name in names)
(dest / "docbank" / "annotations.json").write_text(json.dumps(cut_coco(doc, doc_images)))
print(f"docbank: {n} pages, {len(cut_coco(doc, doc_images)['annotations'])} boxes")
if n != len(names):
    sys.exit(f"docbank: {len(names) - n} annotated pages missing from the tar")

# PubLayNet: its 20 pages split into train/ + train.json and val/ + val.json (the last pub_val by id)
pub = json.loads((src / "publaynet_subset" / "annotations.json").read_text())
pub_images = sorted(pub["images"], key=lambda im: im["id"])
splits = {"train": pub_images[:-pub_val] if pub_val else pub_images, "val": pub_images[-pub_val:] if pub_val else []}
where = {f"images/{im['file_name']}": split for split, ims in splits.items() for im in ims}
with tarfile.open(src / "publaynet_subset" / "publaynet_subset_images.tar") as tar:
    for m in tar:
        if m.isfile() and m.name in where:
            target = dest / "publaynet" / where[m.name] / Path(m.name).name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(m).read())
for split, ims in splits.items():
    if ims:
        (dest / "publaynet" / f"{split}.json").write_text(json.dumps(cut_coco(pub, ims)))
    print(f"publaynet/{split}: {len(ims)} pages")
PY

dest_kib=$(du -sk --apparent-size "$DEST" | cut -f1)
repo=$(git -C "$(dirname "$DEST")" rev-parse --show-toplevel 2>/dev/null || echo .)
# what a GPU call sends besides DEST: the tracked and untracked-not-ignored files of the working tree
repo_kib=$(cd "$repo" && git ls-files -z --cached --others --exclude-standard \
           | xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {printf "%d", (s + 1023) / 1024}')
total_kib=$(( dest_kib + repo_kib ))
du -sh --apparent-size "$DEST"/* | sed 's/^/  /'
awk -v d="$dest_kib" -v r="$repo_kib" -v m="$MAX_MIB" -v p="$DEST" 'BEGIN {
  printf "DEST %s: %.1f MiB; repository working tree: %.1f MiB; together %.1f MiB (limit %s MiB)\n",
         p, d / 1024, r / 1024, (d + r) / 1024, m }'
if [ "$total_kib" -gt $(( MAX_MIB * 1024 )) ]; then
  echo "prepare_gpu_data: over ${MAX_MIB} MiB: lower CAMVID_TRAIN / DOCBANK_PAGES / CIFAR_TRAIN_PER_CLASS" >&2
  exit 1
fi
