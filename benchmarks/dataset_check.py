"""Cost of the dataset checks on arrival (``d2_backbones.data.check_coco_dataset``) on a large COCO json.

Generates, in a temporary folder, a COCO instances file shaped like COCO train2017 (100,000 images,
7 boxes with an 8-point polygon each, 80 categories) and one file per image (empty ``.jpg`` files, or
with ``--ext png`` a 33-byte PNG signature + header of an 8-bit RGB image), then times:

* ``json.load``: what registration already paid before the checks (it read the class names from
  the parsed file), and what detectron2 pays again when it loads the dataset (pycocotools);
* the checks on the parsed data without the disk part (categories, images, boxes), and the disk
  part alone (one directory listing + a set lookup per image), and the bit-depth part alone (26 header
  bytes read per ``.png``; ``.jpg`` files are 8-bit and not opened);
* ``check_coco_dataset`` end to end, with ``check_images=False`` (``--skip-image-check``) and True;
* pycocotools' ``COCO(json)``, which detectron2's ``load_coco_json`` runs later on the same file.

Each row is the median of ``--repeat`` runs in this process, as wall time and as CPU time of the
process (on a shared machine the CPU time is the steadier number). The generated files are in the
page cache: on a cold network disk the listing costs more.

Run:  python benchmarks/dataset_check.py [--images 100000] [--boxes 7] [--repeat 3] [--ext jpg|png]
"""
import argparse
import contextlib
import io
import json
import logging
import os
import random
import statistics
import struct
import tempfile
import time
import zlib


def _png_header(w: int, h: int) -> bytes:
    """PNG signature + IHDR chunk of an 8-bit RGB image (what the bit-depth check reads)."""
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr))


def generate(folder: str, n_images: int, boxes: int, seed: int = 0, ext: str = "jpg") -> str:
    rng = random.Random(seed)
    img_dir = os.path.join(folder, "images")
    os.makedirs(img_dir)
    images, anns = [], []
    for i in range(1, n_images + 1):
        name = f"{i:012d}.{ext}"
        w, h = rng.choice([(640, 480), (480, 640), (640, 427), (500, 375)])
        with open(os.path.join(img_dir, name), "wb") as f:
            f.write(_png_header(w, h) if ext == "png" else b"")
        images.append({"id": i, "file_name": name, "width": w, "height": h})
        for _ in range(boxes):
            bw, bh = rng.uniform(4, w / 2), rng.uniform(4, h / 2)
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            poly = [round(v, 2) for v in (x, y, x + bw / 2, y, x + bw, y, x + bw, y + bh / 2, x + bw, y + bh,
                                          x + bw / 2, y + bh, x, y + bh, x, y + bh / 2)]
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": rng.randint(1, 80), "iscrowd": 0,
                         "bbox": [round(x, 2), round(y, 2), round(bw, 2), round(bh, 2)],
                         "area": round(bw * bh, 2), "segmentation": [poly]})
    path = os.path.join(folder, "instances.json")
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": anns,
                   "categories": [{"id": c, "name": f"class_{c}"} for c in range(1, 81)]}, f)
    return path


def timed(fn, repeat: int):
    """(median wall seconds, median CPU seconds of this process) of ``fn()``."""
    wall, cpu = [], []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--boxes", type=int, default=7, help="boxes per image (COCO train2017: 7.3)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--ext", choices=["jpg", "png"], default="jpg", help="image files to generate")
    args = parser.parse_args()

    from d2_backbones.data import _high_bit_depth, _missing_files, check_coco_data, check_coco_dataset

    logging.getLogger("d2_backbones").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        json_file = generate(tmp, args.images, args.boxes, ext=args.ext)
        print(f"generated {args.images:,} images, {args.images * args.boxes:,} boxes: "
              f"{os.path.getsize(json_file) / 2**20:.0f} MiB json in {time.perf_counter() - t0:.1f} s")
        img_dir = os.path.join(tmp, "images")

        def load():
            with open(json_file, encoding="utf-8") as f:
                return json.load(f)

        def coco():
            from pycocotools.coco import COCO
            with contextlib.redirect_stdout(io.StringIO()):
                COCO(json_file)

        data = load()
        files = [im["file_name"] for im in data["images"]]
        rows = [
            ("json.load (paid before the checks too)", timed(load, args.repeat)),
            ("checks on the parsed data, no disk", timed(
                lambda: check_coco_data("bench", data, json_file, img_dir, check_images=False), args.repeat)),
            ("disk part alone (image files exist?)", timed(lambda: _missing_files(img_dir, files), args.repeat)),
            (f"bit-depth part alone (headers of .{args.ext})", timed(lambda: _high_bit_depth(img_dir, files),
                                                                     args.repeat)),
            ("check_coco_dataset, --skip-image-check", timed(
                lambda: check_coco_dataset("bench", json_file, img_dir, check_images=False), args.repeat)),
            ("check_coco_dataset, with the image files", timed(
                lambda: check_coco_dataset("bench", json_file, img_dir, check_images=True), args.repeat)),
            ("pycocotools COCO(json), run later by detectron2", timed(coco, args.repeat)),
        ]
    width = max(len(r[0]) for r in rows)
    print(f"{'':<{width}}  {'wall':>7}  {'CPU':>7}   (median of {args.repeat})")
    for name, (wall, cpu) in rows:
        print(f"{name:<{width}}  {wall:6.2f}s  {cpu:6.2f}s")


if __name__ == "__main__":
    main()
