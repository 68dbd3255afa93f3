"""Instance-level evaluation tasks (revisited Oxford/Paris protocol) beside the class-level ones.

A task in ``evaluate.instance_tasks`` names a revisitop-style dataset the user downloaded
(``<root>/<name>/jpg/`` + ``gnd_<name>.pkl``; nothing is bundled or downloaded). Every model variant
embeds the database images and the queries cropped to their bounding boxes, ranks the database by
cosine similarity and is scored with the official Easy/Medium/Hard mAP and mP@k.
"""
from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from grappa.config import ConfigError, InstanceTask
from grappa.core.augment import image_transform
from grappa.core.evaluation import markdown_table
from grappa.core.revisited import crop_query, evaluate_revisited, find_dataset, load_ground_truth
from grappa.io.datasets import ImageDataset, encode
from grappa.io.sources import ImageDecodeError, decode_image
from grappa.io.storage import StorageError, read_bytes


class CroppedQueries(Dataset):
    """Query images cropped to their ground-truth box before the evaluation transform."""

    is_images = True

    def __init__(self, uris: list[str], boxes: list, transform):
        self.uris, self.boxes, self.transform = uris, boxes, transform

    def __len__(self) -> int:
        return len(self.uris)

    def __getitem__(self, i: int):
        try:
            image = decode_image(read_bytes(self.uris[i]), 1, 1 << 40)
        except (ImageDecodeError, StorageError) as err:
            return i, None, str(err)
        return i, self.transform(crop_query(image, self.boxes[i])), None


def locate(task: InstanceTask) -> tuple[Path, dict]:
    """The task's image folder and validated ground truth, or a one-line ConfigError."""
    try:
        images_dir, gnd_path = find_dataset(task.root, task.name)
        return images_dir, load_ground_truth(gnd_path)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"evaluate.instance_tasks[{task.name}]: {err}") from None


def evaluate_instance_task(model, task: InstanceTask, preprocess, modes: list[str], batch_size: int,
                           num_workers: int) -> dict[str, dict]:
    """{mode: {"easy"|"medium"|"hard": {"map", "mp@1", "mp@5", "mp@10"}}} for one dataset."""
    images_dir, cfg = locate(task)
    transform = image_transform(preprocess, train=False)
    ext = cfg.get("ext", ".jpg")
    database = ImageDataset([str(images_dir / f"{name}{ext}") for name in cfg["imlist"]], transform, 1, 1 << 40)
    queries = CroppedQueries([str(images_dir / f"{name}{ext}") for name in cfg["qimlist"]],
                             [q["bbx"] for q in cfg["gnd"]], transform)
    results = {}
    for mode in modes:
        db_vectors, _ = encode(model, database, mode, batch_size, num_workers, desc=f"{task.name} db {mode}")
        q_vectors, _ = encode(model, queries, mode, batch_size, num_workers, desc=f"{task.name} queries {mode}")
        results[mode] = evaluate_revisited(q_vectors @ db_vectors.T, cfg)
    return results


def instance_table(task: str, results: dict[str, dict]) -> str:
    rows = [[name, *(f"{100 * res[protocol]['map']:.1f}" for protocol in ("easy", "medium", "hard")),
             f"{100 * res['medium']['mp@10']:.1f}"] for name, res in results.items()]
    return markdown_table(f"{task}: mAP (%) Easy / Medium / Hard (revisited protocol)",
                          ["method", "E", "M", "H", "mP@10 M"], rows)
