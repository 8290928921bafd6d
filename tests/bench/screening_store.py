"""Screening through the store: the profile of tests/bench/screening.py fitted and run the
way a user does it, with `actmap scan --squeeze --benign`, `screen fit` and `screen run`.

Run from the repository root (no attack library needed):

    nice -n 10 .venv/bin/python tests/bench/screening_store.py [--cache /tmp/actmap-screen]

Owns one store-path measurement on the bench's data and model (screening.py: the same
split, the same DigitsNet trained with noise augmentation, cached in --cache): the 1,000
reference digits and the 1,000 test digits written as 8-bit PNGs in label folders, the first
TEST_ATTACKED test digits attacked by FGSM at eps 0.2 (workers/extraction/attacks.py) and
written as PNGs too; the reference scanned embedded with --squeeze --benign, the profile
fitted with `screen fit --fpr 0.05` (default detectors and combination), and the clean and
the attacked test digits screened with `screen run`. Prints, for that profile and for
--seeds - 1 more fitted with other seeds (the split of the reference into fitting and
held-out digits) on the same stored reference, the realised clean FPR and the AUROC of the
successful attacks (clean digit right, attacked copy wrong) against the clean test digits,
and the share of them flagged. Nothing here is an assertion.
"""

from __future__ import annotations

import sys
from pathlib import Path

# As in screening.py: tests/bench/api.py would shadow the standard library's queue.
BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from api.cli.main import main as actmap  # noqa: E402
from tests.bench.screening import FPR, TEST_ATTACKED, Pixels, parsed, prepared  # noqa: E402
from workers.analysis.profiles import fit_profile, load_profile, score_job  # noqa: E402
from workers.extraction.attacks import fgsm  # noqa: E402
from workers.storage.layout import open_job, read  # noqa: E402

LAYERS = "conv1,block1,conv2,block2,conv3,pool"


def write_pngs(folder: Path, x: torch.Tensor, labels: np.ndarray, tag: str) -> None:
    for i, (image, label) in enumerate(zip(x, labels, strict=True)):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        pixels = (image[0].numpy() * 255).round().clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / str(label) / f"{tag}-{i:04d}.png")


def run(argv: list[str]) -> dict[str, object]:
    """`actmap ARGV --json`, its last line parsed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = actmap([*argv, "--json"])
    if code != 0:
        raise SystemExit(f"actmap {' '.join(argv)} exited {code}")
    found: dict[str, object] = json.loads(out.getvalue().strip().splitlines()[-1])
    return found


def screened(store: str, job_id: str) -> tuple[np.ndarray, list[str]]:
    """(preds, source file names) of a screening job, in row order."""
    group = open_job(store, job_id, mode="r")
    names = [Path(str(p)).name for p in read(group, "source")]
    return np.asarray(read(group, "pred")), names


def label_of(labels: np.ndarray, names: list[str], tag: str) -> tuple[np.ndarray, np.ndarray]:
    """(labels, test-split index) of screened files named {tag}-{index}.png."""
    index = [int(n.split("-")[1].split(".")[0]) for n in names]
    assert all(n.startswith(tag) for n in names)
    return labels[index], np.asarray(index)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="profile fits (split seeds)")
    args = parsed(parser)
    started = time.perf_counter()

    data = prepared(args.cache, args.epochs)
    x01, targets, model, weights = data.x01, data.targets, data.model, data.weights
    ref_rows, test_rows = data.ref_rows, data.test_rows
    labels = targets.numpy()
    print(f"model ready in {time.perf_counter() - started:.0f} s")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = str(root / "store")
        n = TEST_ATTACKED
        write_pngs(root / "ref", x01[ref_rows], labels[ref_rows], "ref")
        write_pngs(root / "clean", x01[test_rows], labels[test_rows], "clean")
        adv = fgsm(Pixels(model), x01[test_rows][:n], targets[test_rows][:n], 0.2)
        write_pngs(root / "fgsm", adv.detach(), labels[test_rows][:n], "fgsm")
        model_args = ["--model", "workers.demo.digits:digits_cnn", "--weights", str(weights)]
        t0 = time.perf_counter()
        ref = run(["scan", str(root / "ref"), *model_args, "--layers", LAYERS,
                   "--labels-from-dirs", "--squeeze", "--benign", "--dtype", "float32",
                   "--batch-size", "250", "--out", store])  # fmt: skip
        print(f"reference scanned with --squeeze --benign in {time.perf_counter() - t0:.0f} s")
        t0 = time.perf_counter()
        fitted = run(["screen", "fit", "--reference", str(ref["job_id"]), "--fpr", str(FPR),
                      "--store", store])  # fmt: skip
        print(f"profile fitted in {time.perf_counter() - t0:.0f} s: squeeze {fitted['squeeze']}, "
              f"benign copies {fitted['benign_copies']}")  # fmt: skip
        jobs = {}
        for name in ("clean", "fgsm"):
            argv = ["screen", "run", str(root / name), "--profile", str(fitted["profile_id"])]
            jobs[name] = str(run([*argv, "--store", store])["job_id"])
        clean_pred, clean_names = screened(store, jobs["clean"])
        adv_pred, adv_names = screened(store, jobs["fgsm"])
        y_clean, i_clean = label_of(labels[test_rows], clean_names, "clean")
        y_adv, i_adv = label_of(labels[test_rows], adv_names, "fgsm")
        right = dict(zip(i_clean.tolist(), (clean_pred == y_clean).tolist(), strict=True))
        fooled = np.asarray([right[i] for i in i_adv.tolist()]) & (adv_pred != y_adv)
        print(f"FGSM eps 0.2 (8-bit PNG): {int(fooled.sum())} of {n} successful")
        print(f"{'fit seed':<10}{'threshold':>10}{'clean FPR':>11}{'AUROC':>8}{'flagged':>9}")
        for seed in range(args.seeds):
            # Seed 0 is the profile `screen fit` made; the others refit it as the analysis
            # task does (fit_profile) and score the same screening jobs again (score_job).
            profile = str(fitted["profile_id"])
            if seed:
                profile = fit_profile(store, str(ref["job_id"]), fpr=FPR, seed=seed)
                for job in jobs.values():
                    score_job(store, job, profile)
            threshold = load_profile(store, profile).threshold
            clean = np.asarray(read(open_job(store, jobs["clean"], mode="r"), "screen/score"))
            scores = np.asarray(read(open_job(store, jobs["fgsm"], mode="r"), "screen/score"))
            positives = scores[fooled]
            target = np.r_[np.ones(positives.size), np.zeros(clean.size)]
            auroc = roc_auc_score(target, np.r_[positives, clean])
            print(f"{seed:<10}{threshold:>10.3f}{np.mean(clean > threshold):>11.3f}"
                  f"{auroc:>8.3f}{np.mean(positives > threshold):>9.3f}")  # fmt: skip
    print(f"clean FPR on {clean.size} test digits, target {FPR}")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
