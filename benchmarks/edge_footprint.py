"""What a device pays to run a bundle: installed dependencies, bundle bytes, cold start, peak RSS.

For each bundle (and each runtime memory setting), in fresh processes: cold start (new
process -> bundle verified -> sessions open -> first caption) and peak RSS while captioning
batch 1 and batch 8; next to open_clip doing the same job in PyTorch (import, model build,
first caption, peak RSS) for the bundle's architecture. Also the installed size of the
runtime's dependencies, measured in a torch-free venv (``pip install ".[ort]"``), next to
the PyTorch + open_clip stack. Prints ratio tables and writes JSON. Not a test.

    # the lead's run (quiet machine): FP32 and quantized B-32 bundles
    .venv/bin/python benchmarks/edge_footprint.py --bundle b32-fp32=bundles/b32 \\
        --bundle b32-int8=bundles/b32-int8 --memory default,lean,low --external-data \\
        --json benchmarks/results/edge_footprint.json
    # smoke test (a few minutes): a test-tiny bundle exported on the fly, open_clip built from its config
    .venv/bin/python benchmarks/edge_footprint.py --tiny

Cold starts are those of a device that has loaded the bundle before (verified-hash and
optimised-graph caches warm; the first load's extra time is printed), and again without the
optimised-graph cache.

Both sides caption the same image with greedy decoding and exactly ``--tokens`` new tokens
(end token suppressed until then), so random-weight models do the same amount of work.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh process of the device's Python: times are seconds since the parent started it.
RUNTIME_CHILD = textwrap.dedent("""
    import json, resource, sys, time
    t0 = float(sys.argv[1]); args = json.loads(sys.argv[2])
    def rss():  # peak RSS of this process image: VmHWM resets at exec, ru_maxrss keeps the forking parent's
        try:
            return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
        except OSError:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {"start": time.time() - t0}
    from coca_edge.runtime import Bundle, EdgeCoCa, MemoryConfig
    out["import"] = time.time() - t0
    model = EdgeCoCa.load(args["bundle"], memory=MemoryConfig(**args["memory"]), threads=args["threads"],
                          optimized_cache=args["optimized_cache"])
    out["sessions"] = time.time() - t0; out["rss_loaded"] = rss()
    images = [args["image"]] * args["batch"]
    ids = model.caption_ids(images, max_new_tokens=args["tokens"], min_new_tokens=args["tokens"],
                            batch_size=args["batch"])
    out["first_caption"] = time.time() - t0; out["rss_peak"] = rss()
    runs = []
    for _ in range(args["repeats"]):
        t = time.perf_counter()
        model.caption_ids(images, max_new_tokens=args["tokens"], min_new_tokens=args["tokens"],
                          batch_size=args["batch"])
        runs.append(time.perf_counter() - t)
    out["caption_s"] = runs; out["rss_peak"] = rss(); out["tokens"] = [len(s) for s in ids.sequences]
    # What the cold start spent verifying hashes (after the fact, so the timeline above is untouched).
    t = time.perf_counter(); Bundle.load(args["bundle"], hash_cache=False); out["verify_s"] = time.perf_counter() - t
    t = time.perf_counter(); Bundle.load(args["bundle"]); out["verify_cached_s"] = time.perf_counter() - t
    print("RESULT " + json.dumps(out))
""")

OPENCLIP_CHILD = textwrap.dedent("""
    import json, resource, sys, time
    t0 = float(sys.argv[1]); args = json.loads(sys.argv[2])
    def rss():  # peak RSS of this process image: VmHWM resets at exec, ru_maxrss keeps the forking parent's
        try:
            return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
        except OSError:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {"start": time.time() - t0}
    import torch, open_clip
    from PIL import Image
    out["import"] = time.time() - t0
    torch.set_num_threads(args["threads"])
    if args["open_clip_name"]:
        model = open_clip.create_model(args["open_clip_name"], pretrained=None)
    else:  # an architecture open_clip has no name for: its config, translated by coca-edge
        from coca_edge.models import CoCaConfig
        from coca_edge.models.openclip import config_to_open_clip
        cfg = dict(config_to_open_clip(CoCaConfig.from_dict(args["config"]))["model_cfg"])
        cfg.pop("custom_text")
        model = open_clip.CoCa(**cfg)
    with torch.no_grad():  # left as torch.empty by open_clip (FACTS.md)
        model.text_decoder.text_projection.normal_(std=model.text_decoder.text_projection.shape[0] ** -0.5)
    model.eval()
    preprocess = open_clip.image_transform(model.visual.image_size, is_train=False)
    out["built"] = time.time() - t0; out["rss_loaded"] = rss()
    n = args["tokens"]
    def caption():
        pixels = torch.stack([preprocess(Image.open(args["image"]).convert("RGB"))] * args["batch"])
        with torch.no_grad():
            return model.generate(pixels, generation_type="top_k", top_k=1, seq_len=n + 1, min_seq_len=n)
    ids = caption()
    out["first_caption"] = time.time() - t0; out["rss_peak"] = rss()
    runs = []
    for _ in range(args["repeats"]):
        t = time.perf_counter(); caption(); runs.append(time.perf_counter() - t)
    out["caption_s"] = runs; out["rss_peak"] = rss(); out["tokens"] = [int(ids.shape[1]) - 1] * args["batch"]
    print("RESULT " + json.dumps(out))
""")


def _child(python: str, code: str, args: dict, cwd: Path) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    start = time.time()
    proc = subprocess.run([python, "-c", code, repr(start), json.dumps(args)], capture_output=True, text=True,
                          cwd=cwd, env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"benchmark child failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


# -- installed size ----------------------------------------------------------------------

SIZE_CHILD = textwrap.dedent("""
    import json, re, sys
    from importlib import metadata
    norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
    dists = {norm(d.metadata["Name"]): d for d in metadata.distributions()}
    def size(d):
        total = 0
        for f in d.files or []:
            try:
                total += f.locate().stat().st_size
            except OSError:
                pass
        return total
    def closure(names):
        seen, todo = set(), [norm(n) for n in names]
        while todo:
            n = todo.pop()
            if n in seen or n not in dists:
                continue
            seen.add(n)
            for req in dists[n].requires or []:
                if "extra ==" in req:
                    continue
                todo.append(norm(re.split(r"[\\s<>=!~;\\[(]", req, maxsplit=1)[0]))
        return seen
    roots = json.loads(sys.argv[1])
    names = closure(roots) - {norm(r) for r in json.loads(sys.argv[2])}
    print("RESULT " + json.dumps({n: size(dists[n]) for n in sorted(names)}))
""")


def _dist_sizes(python: str, roots: list[str], exclude: list[str]) -> dict[str, int]:
    proc = subprocess.run([python, "-c", SIZE_CHILD, json.dumps(roots), json.dumps(exclude)], capture_output=True,
                          text=True, check=True)
    return json.loads(proc.stdout.split("RESULT ", 1)[1])


def make_device_venv(where: Path) -> Path:
    """A fresh venv with the device install (`pip install -c constraints.txt ".[ort]"`), from a copy
    of the source so the build leaves nothing in the working tree."""
    src = where / "src"
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in files:
        if rel and not rel.startswith(("tests/", "benchmarks/", "recipes/")) and (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    venv = where / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "-c", str(ROOT / "constraints.txt"), f"{src}[ort]"],
                   check=True, capture_output=True)
    return venv


def external_data_copy(src: Path, dest: Path) -> Path:
    """A copy of a bundle with every graph's weights in ``<graph>.onnx.data`` (ONNX external data),
    the layout ORT maps from disk instead of parsing into memory (docs/edge.md)."""
    from coca_edge.runtime.bundle import externalize_weights, write_manifest

    shutil.copytree(src, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    for name, graph in manifest["graphs"].items():
        graph["data_files"] = externalize_weights(dest / graph["file"])
    extra = {k: v for k, v in manifest.items() if k not in ("format", "format_version", "coca_edge_version",
                                                            "source_model", "graphs", "files", "validated_with")}
    write_manifest(dest, manifest["graphs"], manifest["source_model"], manifest["coca_edge_version"], extra=extra)
    return dest


# -- measurements ------------------------------------------------------------------------

def _bundle_info(path: Path) -> dict:
    sys.path.insert(0, str(ROOT))
    from coca_edge.runtime import Bundle
    from coca_edge.runtime.weights import read_initializers

    bundle = Bundle.load(path, verify_hashes=False)
    unique: dict[tuple, int] = {}
    total = 0
    for name in bundle.manifest["graphs"]:
        for init in read_initializers(bundle.graph_path(name), min_bytes=0):
            a = init.array
            flat = a.reshape(-1).view("u1")
            unique.setdefault((a.dtype.str, a.shape, flat[:256].tobytes(), flat[-256:].tobytes()), a.nbytes)
            total += a.nbytes
    return {"bundle_bytes": sum(f["bytes"] for f in bundle.manifest["files"].values()),
            "weight_bytes": total, "unique_weight_bytes": sum(unique.values()),
            "config": bundle.config["model"], "precision": sorted({bundle.precision(g) for g in bundle.manifest["graphs"]})}


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _row(r: dict) -> dict:
    return {"cold_start_s": r["first_caption"], "import_s": r["import"], "ready_s": r.get("sessions", r.get("built")),
            "peak_rss": r["rss_peak"], "loaded_rss": r["rss_loaded"], "caption_s": _median(r["caption_s"])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", action="append", default=[], metavar="NAME=PATH", help="bundle to measure (repeat)")
    ap.add_argument("--memory", default="default,low", help="comma-separated EdgeCoCa memory presets")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2, help="warm captions after the first (speed column)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device-venv", help="an existing torch-free venv (else one is created in a temp dir)")
    ap.add_argument("--no-openclip", action="store_true", help="skip the open_clip rows")
    ap.add_argument("--external-data", action="store_true",
                    help="also measure a copy of each bundle with its weights in external data files")
    ap.add_argument("--tiny", action="store_true", help="smoke test: a test-tiny bundle exported on the fly")
    ap.add_argument("--no-optimized-cache-rows", action="store_true",
                    help="skip the rows that open sessions without the optimised-graph cache")
    ap.add_argument("--json", default=None, help="write all numbers here")
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT))
    from PIL import Image

    from coca_edge.runtime.runners import MEMORY_PRESETS

    tmp = Path(tempfile.mkdtemp(prefix="edge-footprint-"))
    try:
        bundles = dict(b.split("=", 1) for b in args.bundle)
        if args.tiny:
            import torch

            from coca_edge.exporters.bundle import export_bundle
            from coca_edge.models import CoCa, get_preset

            torch.manual_seed(0)
            bundles["test-tiny"] = str(export_bundle(CoCa(get_preset("test-tiny")).eval(), tmp / "tiny",
                                                     progress=False))
        if not bundles:
            ap.error("give --bundle NAME=PATH (or --tiny)")
        if args.external_data:
            for name, path in list(bundles.items()):
                bundles[f"{name} (external data)"] = str(external_data_copy(Path(path), tmp / f"{name}-external"))
        image = tmp / "image.png"
        Image.effect_mandelbrot((320, 240), (-2, -1.2, 1, 1.2), 60).convert("RGB").save(image)

        venv = Path(args.device_venv) if args.device_venv else None
        if venv is None:
            t = time.perf_counter()
            venv = make_device_venv(tmp)
            print(f"device venv (pip install \".[ort]\") created in {time.perf_counter() - t:.1f} s")
        device_python = str(venv / "bin" / "python")
        runtime_deps = _dist_sizes(device_python, ["coca-edge", "onnxruntime", "onnxruntime-gpu"], ["coca-edge"])
        torch_stack = {} if args.no_openclip else _dist_sizes(sys.executable, ["open-clip-torch"], [])
        results = {"deps": {"runtime": runtime_deps, "open_clip_stack": torch_stack}, "bundles": {}}
        print(f"\nruntime dependencies installed (torch-free venv): {sum(runtime_deps.values()) / 1e6:.1f} MB  "
              + ", ".join(f"{k} {v / 1e6:.1f}" for k, v in sorted(runtime_deps.items(), key=lambda kv: -kv[1])))
        if torch_stack:
            print(f"open_clip + PyTorch stack installed: {sum(torch_stack.values()) / 1e6:.1f} MB  "
                  f"(ratio runtime/open_clip {sum(runtime_deps.values()) / sum(torch_stack.values()):.3f})")

        batches = [int(b) for b in args.batches.split(",")]
        peers: dict[tuple[str, int], dict] = {}  # one open_clip run per architecture and batch
        from coca_edge.runtime import Bundle

        for name, path in bundles.items():
            info = _bundle_info(Path(path))
            # The cold starts below are those of a device that has loaded this bundle before (the
            # verified-hash cache is warm); the first load ever adds the uncached hashing, printed too.
            Bundle.load(path)
            entry = {**{k: v for k, v in info.items() if k != "config"}, "runs": {}}
            results["bundles"][name] = entry
            print(f"\n== {name} ({path}): bundle {info['bundle_bytes'] / 1e6:.1f} MB, weights "
                  f"{info['weight_bytes'] / 1e6:.1f} MB, unique weights {info['unique_weight_bytes'] / 1e6:.1f} MB, "
                  f"precision {info['precision']}")
            for batch in batches:
                common = {"image": str(image), "batch": batch, "tokens": args.tokens, "repeats": args.repeats,
                          "threads": args.threads}
                rows = {}
                for preset in args.memory.split(","):
                    memory = MEMORY_PRESETS[preset]
                    spec = {**common, "bundle": str(Path(path).resolve()), "memory": memory.__dict__}
                    # A device's first load of a bundle writes ORT's optimised graphs (runtime.optimized);
                    # the measured cold start is a later one, which opens sessions from them.
                    cache = tmp / f"optimized-{len(list(tmp.glob('optimized-*')))}"
                    first = _child(device_python, RUNTIME_CHILD, {**spec, "optimized_cache": str(cache)}, tmp)
                    r = _child(device_python, RUNTIME_CHILD, {**spec, "optimized_cache": str(cache)}, tmp)
                    rows[f"coca-edge {preset}"] = {**_row(r), "verify_s": r["verify_s"],
                                                    "verify_cached_s": r["verify_cached_s"],
                                                    "first_load_ready_s": first["sessions"], "raw": r,
                                                    "raw_first_load": first}
                    if args.no_optimized_cache_rows is False:
                        r = _child(device_python, RUNTIME_CHILD, {**spec, "optimized_cache": False}, tmp)
                        rows[f"coca-edge {preset} (no opt. cache)"] = {**_row(r), "raw": r}
                if not args.no_openclip:
                    oc_name = info["config"].get("name") if str(info["config"].get("name", "")).startswith("coca_") \
                        else None
                    key = (json.dumps(info["config"], sort_keys=True), batch)
                    if key not in peers:
                        r = _child(sys.executable, OPENCLIP_CHILD, {**common, "open_clip_name": oc_name,
                                                                     "config": info["config"]}, ROOT)
                        peers[key] = {**_row(r), "raw": r}
                    rows["open_clip"] = peers[key]
                entry["runs"][f"batch{batch}"] = rows
                _print_table(name, batch, rows, info["unique_weight_bytes"])
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(results, indent=2))
            print(f"\nwrote {args.json}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _print_table(name: str, batch: int, rows: dict, unique: int) -> None:
    peer = rows.get("open_clip")
    print(f"\n{name}, batch {batch}")
    header = (f"{'':<22}{'import s':>9}{'ready s':>8}{'cold start s':>13}{'caption s':>10}"
              f"{'peak RSS MB':>12}{'RSS/unique w':>13}{'cold vs oc':>11}{'RSS vs oc':>10}")
    print(header)
    print("-" * len(header))
    for label, r in rows.items():
        cold = f"{r['cold_start_s'] / peer['cold_start_s']:.3f}" if peer else "-"
        mem = f"{r['peak_rss'] / peer['peak_rss']:.3f}" if peer else "-"
        print(f"{label:<22}{r['import_s']:>9.2f}{r['ready_s']:>8.2f}{r['cold_start_s']:>13.2f}"
              f"{r['caption_s']:>10.3f}{r['peak_rss'] / 1e6:>12.1f}{r['peak_rss'] / unique:>13.2f}{cold:>11}{mem:>10}")
    for label, r in rows.items():
        if "verify_s" in r:
            print(f"  {label}: cold start above with a warm verified-hash cache ({r['verify_cached_s']:.3f} s) and "
                  f"optimised-graph cache; the first load ever hashes the bundle (+{r['verify_s'] - r['verify_cached_s']:.2f}"
                  f" s) and writes the optimised graphs (sessions ready at {r['first_load_ready_s']:.2f} s)")


if __name__ == "__main__":
    sys.exit(main())
