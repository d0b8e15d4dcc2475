"""A small real-photo retrieval set from the sample images of Debian's ``opencv-doc`` package
(``/usr/share/doc/opencv-doc/examples/data``; ``apt-get install opencv-doc``), in the pairs format of
:mod:`aggnets.retrieval.pairs`: the photos are copied into ``--out`` and ``--out/pairs.csv`` lists every
(query, positive) pair of a group, in both directions.

    python scripts/opencv_retrieval_set.py --out outputs/opencv_set
    python scripts/retrieval_check.py --data outputs/opencv_set

Groups (same scene or object; every image of a group is a query whose positives are the other images of it):

=============  ==========================================  =============================================
group          files                                       what changes between the images
=============  ==========================================  =============================================
books          left.jpg, right.jpg                         stereo pair (two books on a table)
aloe           aloeL.jpg, aloeR.jpg                        Middlebury stereo pair (potted aloe)
aerial         aero1.jpg, aero3.jpg                        aerial photos of a town, other viewpoint
notebook       ela_original.jpg, ela_modified.jpg          the same photo, edited (a logo pasted in)
rubberwhale    rubberwhale1.png, rubberwhale2.png          Middlebury optical-flow frames
basketball     basketball1.png, basketball2.png            consecutive video frames (grayscale)
leuven         leuvenA.jpg, leuvenB.jpg                    street in Leuven, viewpoint change
graffiti       graf1.png, graf3.png                        Oxford affine set, strong viewpoint change
box            box.png, box_in_scene.png                   object alone vs. the object in a cluttered scene
calibration    left01.jpg, right01.jpg                     stereo pair of the chessboard calibration set
text           text_defocus.jpg, text_motion.jpg           the same printed page, defocus vs. motion blur
=============  ==========================================  =============================================

Distractors (real photos, no pair): apple, baboon, orange, fruits, butterfly, messi5, chicky_512, squirrel_cls,
building, home, board, stuff, blox, sudoku, licenseplate_motion — 22 group images + 15 distractors = 37 images,
22 queries with one positive each.

Left out: synthetic drawings and renders (pic1-6, cards, detect_blob, ellipses, gradient, pca_test1, smarties,
Blender_Suzanne1/2, chessboard.png, digits, notes, imageText*, HappyFish, ml, logos, mask, templ/tmpl), the aloe
disparity map (aloeGT), a painting (starry_night), and 24 of the 26 chessboard calibration photos. Those
left02..14 / right02..14 *are* real photos, but of one and the same scene (the same person holding the same board
in the same office, from the same stereo rig): as separate stereo-pair groups they would be near-duplicate
distractors of each other (no global descriptor could, or should, tell pair 02 from pair 07), and as one group
of 26 they would outweigh the ten other groups in the mean. One stereo pair of them (01) is kept as a group.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import os
import shutil
import sys
from typing import Optional, Sequence

DEFAULT_SOURCE = "/usr/share/doc/opencv-doc/examples/data"

GROUPS: dict[str, tuple[str, ...]] = {
    "books": ("left.jpg", "right.jpg"),
    "aloe": ("aloeL.jpg", "aloeR.jpg"),
    "aerial": ("aero1.jpg", "aero3.jpg"),
    "notebook": ("ela_original.jpg", "ela_modified.jpg"),
    "rubberwhale": ("rubberwhale1.png", "rubberwhale2.png"),
    "basketball": ("basketball1.png", "basketball2.png"),
    "leuven": ("leuvenA.jpg", "leuvenB.jpg"),
    "graffiti": ("graf1.png", "graf3.png"),
    "box": ("box.png", "box_in_scene.png"),
    "calibration": ("left01.jpg", "right01.jpg"),
    "text": ("text_defocus.jpg", "text_motion.jpg"),
}
DISTRACTORS: tuple[str, ...] = (
    "apple.jpg", "baboon.jpg", "orange.jpg", "fruits.jpg", "butterfly.jpg", "messi5.jpg", "chicky_512.png",
    "squirrel_cls.jpg", "building.jpg", "home.jpg", "board.jpg", "stuff.jpg", "blox.jpg", "sudoku.png",
    "licenseplate_motion.jpg",
)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write the images and pairs.csv to")
    parser.add_argument("--source", default=DEFAULT_SOURCE, help="opencv-doc's examples/data folder")
    parser.add_argument("--groups", nargs="+", default=None, help=f"subset of the groups ({', '.join(GROUPS)})")
    parser.add_argument("--distractors", type=int, default=None, help="keep only the first N distractors")
    return parser.parse_args(argv)


def find_source_file(source: str, name: str) -> str:
    """``source/name``, or its gzipped form ``source/name.gz`` (Debian compresses some docs)."""
    for candidate in (os.path.join(source, name), os.path.join(source, name + ".gz")):
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"{name} not found in {source} (apt-get install opencv-doc, or pass --source)")


def _copy(src: str, dst: str) -> None:
    if src.endswith(".gz"):
        with gzip.open(src, "rb") as fin, open(dst, "wb") as fout:
            shutil.copyfileobj(fin, fout)
    else:
        shutil.copyfile(src, dst)


def build_set(out: str, source: str = DEFAULT_SOURCE, groups: Optional[Sequence[str]] = None,
              distractors: Optional[int] = None) -> dict:
    """Copy the chosen photos into ``out`` and write ``out/pairs.csv``; returns a summary dict."""
    if not os.path.isdir(source):
        raise FileNotFoundError(f"opencv-doc sample folder not found: {source} (apt-get install opencv-doc)")
    chosen = list(GROUPS) if groups is None else list(groups)
    unknown = [g for g in chosen if g not in GROUPS]
    if unknown:
        raise ValueError(f"unknown group(s) {unknown}; choose from {list(GROUPS)}")
    extra = list(DISTRACTORS if distractors is None else DISTRACTORS[:distractors])
    files = [name for g in chosen for name in GROUPS[g]] + extra
    sources = {name: find_source_file(source, name) for name in files}  # fail before writing anything
    os.makedirs(out, exist_ok=True)
    for name, src in sources.items():
        _copy(src, os.path.join(out, name))
    rows = [(query, positive) for g in chosen for query in GROUPS[g] for positive in GROUPS[g] if positive != query]
    with open(os.path.join(out, "pairs.csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["query", "positive"])
        writer.writerows(rows)
    return {"out": out, "images": len(files), "groups": len(chosen), "group_images": len(files) - len(extra),
            "distractors": len(extra), "pairs": len(rows)}


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    try:
        summary = build_set(args.out, args.source, args.groups, args.distractors)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(str(err)) from None
    print(f"{summary['images']} images ({summary['groups']} groups: {summary['group_images']} images; "
          f"{summary['distractors']} distractors), {summary['pairs']} pairs -> {os.path.join(args.out, 'pairs.csv')}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
