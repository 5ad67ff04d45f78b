#!/usr/bin/env bash
# The demo, end to end on the embedded real dataset, from a fresh machine:
#   data -> train -> evaluate -> export -> predict
#   bash scripts/demo.sh [extra training flags, e.g. --epochs=2 --lr_decay_epochs=1]
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
# shellcheck disable=SC1091
. scripts/setup.sh

echo "== 1/5 the demo dataset (real Fashion-MNIST outfits) -> data/demo"
if [ ! -f data/demo/tfrecords/test_report.json ]; then
  python -m pipelines.demo_dataset --output_dir=data/demo
fi

echo "== 2/5 train (configs/demo.flags: crl, small CNN, 96 px) -> runs/demo"
python -m mlcrl_tf.train --flagfile=configs/demo.flags --export_dir= "$@"

echo "== 3/5 evaluate the final checkpoint (Table 1 row, Table 2 per-class AP)"
python -m mlcrl_tf.evaluate --model_dir=runs/demo --per_class

echo "== 4/5 export the inference branch -> saved_models/demo/<version>"
python -m mlcrl_tf.export --model_dir=runs/demo --export_dir=saved_models/demo
version=$(ls saved_models/demo | grep -E '^[0-9]+$' | sort -n | tail -1)

echo "== 5/5 predict with the export (saved_models/demo/$version)"
python -m mlcrl_tf.predict --saved_model="saved_models/demo/$version" \
  data/demo/images/test/test_000000.jpg data/demo/images/test/test_000001.jpg \
  data/demo/images/test/test_000002.jpg data/demo/images/test/test_000003.jpg \
  data/demo/images/test/test_000004.jpg
python - <<'PY'
import json
coco = json.load(open("data/demo/annotations/instances_test.json"))
names = {c["id"]: c["name"] for c in coco["categories"]}
truth = {}
for a in coco["annotations"]:
    truth.setdefault(a["image_id"], set()).add(names[a["category_id"]])
for image in coco["images"][:5]:
    print(f"truth {image['file_name']}: {sorted(truth.get(image['id'], []))}")
PY
