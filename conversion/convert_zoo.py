"""Convert the zoo's legacy checkpoints to safetensors and prepare (or publish) the Hugging Face mirror.

    python conversion/convert_zoo.py [NAME|PATTERN ...] [--all] [--source-dir DIR] [--out DIR]
                                     [--update-checksums] [--push --org ORG]

For each model: take its GitHub release ``.pth`` from --source-dir (the file named as in the card's URL) or
download it (verified, cached), convert it (checked against the architecture, refused by key name when it
does not fit), and write ``OUT/<name>/`` with ``model.safetensors``, ``config.json`` (the model card) and
``README.md`` (a Hugging Face model card: metrics, usage, citation, licence). The default is a dry run: the
folders are written for inspection and nothing is uploaded. ``--update-checksums`` records both files' sha256
in ``model_cards/checksums.toml``, which the registry reads; ``--push`` uploads each folder to
``ORG/<name>`` with huggingface_hub (needs HF_TOKEN).
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import sys
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import segtorch  # noqa: E402
from segtorch.files import atomic_write, sha256_file  # noqa: E402

METRIC_NAMES = {"miou": "mIoU", "miou_flip": "mIoU (flip)", "miou_ms_flip": "mIoU (ms+flip)"}


def model_readme(card, report, sha_pth: str, sha_st: str) -> str:
    rows = "\n".join(f"| {METRIC_NAMES[k]} | {v:.2f} |" for k, v in card.reported.items() if v is not None)
    metrics = (f"| metric ({card.reported_split} split) | value |\n|---|---|\n{rows}" if rows
               else "The model zoo publishes no figure for this checkpoint.")
    cite = f"```bibtex\n{card.citation}\n```" if card.citation else "See the SSSegmentation model zoo."
    return f"""---
license: apache-2.0
library_name: segtorch
tags: [semantic-segmentation, sssegmentation, {card.family}, {card.dataset}]
---
# {card.name}

{card.family} ({card.segmentor}) with a {card.backbone} backbone, trained on {card.dataset_title}
({card.num_classes} classes) by the [SSSegmentation](https://github.com/SegmentationBLWX/sssegmentation) toolbox,
converted to safetensors by segtorch. Weights unchanged; training-only keys dropped.

## Reported results
{metrics}

## Use
```python
import segtorch
seg = segtorch.load("{card.name}")
labels = seg.predict("image.jpg")            # the card's own test pipeline
```

## Provenance
- original file: {card.url} (sha256 `{sha_pth}`)
- this file: `model.safetensors` (sha256 `{sha_st}`)
- conversion: era "{report.era}", renamed {report.renamed or 'nothing'}, dropped {report.dropped or 'nothing'}
- upstream config: `{card.upstream_config}`

## Citation
{cite}

## Licence
{card.license}
"""


def source_file(card, source_dir: Path | None) -> Path:
    if source_dir is None:
        from segtorch.checkpoint import check_format
        from segtorch.weights import release_url

        return segtorch.download(release_url(card), sha256=card.sha256, validate=check_format)
    path = source_dir / Path(urlsplit(card.url).path).name
    if not path.is_file():
        raise FileNotFoundError(f"{card.name}: {path} not found in --source-dir")
    return path


def convert_one(name: str, out: Path, source_dir: Path | None) -> dict:
    card = segtorch.model_card(name)
    src = source_file(card, source_dir)
    folder = out / card.name
    folder.mkdir(parents=True, exist_ok=True)
    report = segtorch.convert(src, folder / "model.safetensors", name=card.name)
    sha_pth, sha_st = report.source_sha256, sha256_file(folder / "model.safetensors")
    if card.sha256 and card.sha256 != sha_pth:
        raise ValueError(f"{card.name}: {src} has sha256 {sha_pth}, the card says {card.sha256}")
    atomic_write(folder / "config.json", json.dumps(card.to_dict(), indent=2) + "\n")
    atomic_write(folder / "README.md", model_readme(card, report, sha_pth, sha_st))
    print(f"{card.name}: {folder} (dropped {sum(report.dropped.values())}, renamed {sum(report.renamed.values())})")
    return {"pth": sha_pth, "safetensors": sha_st}


def update_checksums(sums: dict[str, dict]) -> Path:
    import tomli_w

    from segtorch.registry import _load_toml, cards_dir

    path = cards_dir() / "checksums.toml"
    data = _load_toml(path) if path.is_file() else {}
    data.update(sums)
    text = "# sha256 of each model's GitHub release file (pth) and mirror file (safetensors).\n"
    text += "# Written by conversion/convert_zoo.py --update-checksums.\n\n" + tomli_w.dumps(dict(sorted(data.items())))
    return atomic_write(path, text)


def push(folder: Path, repo_id: str) -> None:
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="model", exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                      commit_message="segtorch conversion")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="names or fnmatch patterns")
    ap.add_argument("--all", action="store_true", help="every model card")
    ap.add_argument("--source-dir", type=Path, help="folder holding the release .pth files (else download)")
    ap.add_argument("--out", type=Path, default=Path("hf_mirror"), help="where the mirror folders go")
    ap.add_argument("--update-checksums", action="store_true", help="record sha256 values in model_cards/")
    ap.add_argument("--push", action="store_true", help="upload to the Hugging Face Hub (default: dry run)")
    ap.add_argument("--org", default="segtorch", help="Hugging Face organisation for --push")
    args = ap.parse_args(argv)
    everything = [n for n in segtorch.list_models() if not segtorch.model_card(n).demo]
    names = everything if args.all else sorted({n for n in everything for p in args.names if fnmatch.fnmatchcase(n, p)})
    if not names:
        ap.error("no model selected: give names/patterns or --all")
    sums, failed = {}, []
    for name in names:
        try:
            sums[name] = convert_one(name, args.out, args.source_dir)
            if args.push:
                push(args.out / name, f"{args.org}/{name}")
        except Exception as e:  # noqa: BLE001 - report every model, fail at the end
            failed.append(name)
            print(f"{name}: FAILED: {e}", file=sys.stderr)
    if args.update_checksums and sums:
        print(f"checksums: {update_checksums(sums)}")
    print(f"{len(sums)} converted, {len(failed)} failed" + ("" if args.push else " (dry run: nothing uploaded)"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
