"""The resumable evaluation loop: generate (or reuse) outputs, score them, summarize.

Every per-item artifact is its own atomically written file (see :mod:`.store`), so a run
killed at any point resumes where it stopped: existing outputs are not regenerated and
existing metric values are not recomputed (a ``null`` value is retried, since it holds no
number). Each ``accelerate`` process handles its share of items; the main process merges.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from attnctl.errors import InputError
from harmonpaint_recipe.progress import progress
from harmonpaint_recipe.metrics import Metric, MetricOptions, MetricUnavailable, Sample, build_metrics
from harmonpaint_recipe.files import atomic_write_jsonl
from harmonpaint_recipe.evaluation.grids import write_grids
from harmonpaint_recipe.evaluation.items import EvalItem
from harmonpaint_recipe.evaluation.methods import InpaintFn, Method, default_inpaint_factory
from harmonpaint_recipe.evaluation.sharding import Shard, current_shard
from harmonpaint_recipe.evaluation.store import REFERENCE, Store
from harmonpaint_recipe.evaluation.tables import summarize, write_tables

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class EvalConfig:
    """Everything one evaluation needs."""

    items: list[EvalItem]
    methods: list[Method]
    out: Path
    metric_names: list[str]
    metric_options: MetricOptions = field(default_factory=MetricOptions)
    seed: int = 0
    reference_dir: Path | None = None
    title: str = "Evaluation"


@dataclass
class EvalResult:
    """Where the merged results went (only filled on the main process)."""

    per_item: Path | None = None
    summary_csv: Path | None = None
    summary_md: Path | None = None
    grids: list[Path] = field(default_factory=list)
    summary: list[dict] = field(default_factory=list)


def _reference_images(config: EvalConfig) -> list[tuple[str, Callable[[], Image.Image]]]:
    if config.reference_dir is None:
        return [(f"item-{it.id}", lambda it=it: Image.open(it.image_path).convert("RGB")) for it in config.items]
    ref = Path(config.reference_dir)
    if not ref.is_dir():
        raise InputError(f"--reference-dir '{ref}' is not a folder")
    files = sorted(p for p in ref.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"--reference-dir '{ref}' has no images")
    return [(f"file-{p.stem}", lambda p=p: Image.open(p).convert("RGB")) for p in files]


class Runner:
    """One evaluation run in this process."""

    def __init__(
        self,
        config: EvalConfig,
        metrics: dict[str, Metric] | None = None,
        inpaint_factory: Callable[[Method], InpaintFn] = default_inpaint_factory,
        shard: Shard | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics if metrics is not None else build_metrics(config.metric_names, config.metric_options)
        self.inpaint_factory = inpaint_factory
        self.shard = shard or current_shard()
        self.store = Store(config.out)

    # --- per process -------------------------------------------------------------------
    def _item_metrics(self) -> list[Metric]:
        return [m for m in self.metrics.values() if m.per_item]

    def _cmmd(self):
        return self.metrics.get("cmmd")

    def _embed(self, method: str, key: str, image: Callable[[], Image.Image]) -> None:
        cmmd = self._cmmd()
        path = self.store.embedding(method, key)
        if cmmd is None or path.is_file():
            return
        try:
            cmmd.load()
        except MetricUnavailable:
            return  # reported once, by the main process, when it merges
        self.store.save_array(path, cmmd.embed([image()])[0])

    def _run_item(self, method: Method, item: EvalItem, inpaint: list) -> None:
        out_path = self.store.output(method.name, item.id)
        source, mask_img, mask = item.load()
        if out_path.is_file():
            generated = Image.open(out_path).convert("RGB")
        else:
            if not inpaint:
                inpaint.append(self.inpaint_factory(method))
            seed = item.seed if item.seed is not None else self.config.seed
            generated = inpaint[0](source, mask_img, item.prompt, seed=seed, item_id=item.id).convert("RGB")
            self.store.save_image(out_path, generated)
        rec_path = self.store.record(method.name, item.id)
        record = self.store.read_json(rec_path) or {"metrics": {}, "unavailable_reason": {}}
        changed = False
        sample = Sample(image=generated, prompt=item.prompt, source=source, mask=mask)
        for metric in self._item_metrics():
            if all(record["metrics"].get(k) is not None for k in metric.keys):
                continue
            result = metric.safe_score(sample)
            for k in metric.keys:
                record["metrics"][k] = result.values.get(k)
                record["unavailable_reason"].pop(k, None)
                if k in result.unavailable:
                    record["unavailable_reason"][k] = result.unavailable[k]
            changed = True
        if changed:
            self.store.write_json(rec_path, record)
        self._embed(method.name, item.id, lambda: generated)

    def run_shard(self) -> None:
        """Generate and score this process's share of the items, for every method."""
        cfg = self.config
        opts = asdict(cfg.metric_options)
        for volatile in ("local_files_only", "device"):
            opts.pop(volatile)
        self.store.check_settings(self.store.root / "metrics.json", opts, "metric models")
        mine = self.shard.take(cfg.items)
        for method in cfg.methods:
            self.store.check_settings(
                self.store.root / "outputs" / method.name / "method.json", method.fingerprint(cfg.seed), f"method '{method.name}'"
            )
            inpaint: list = []  # created on first need, so a fully cached method loads no pipeline
            rank = f" [{self.shard.rank}/{self.shard.world}]" if self.shard.world > 1 else ""
            for item in progress(mine, desc=f"eval{rank} {method.name}", unit="item"):
                self._run_item(method, item, inpaint)
        if self._cmmd() is not None:
            for key, image in self.shard.take(_reference_images(cfg)):
                self._embed(REFERENCE, key, image)

    # --- main process ---------------------------------------------------------------------
    def _cmmd_value(self, method: str) -> tuple[float | None, str | None]:
        cmmd = self._cmmd()
        try:
            cmmd.load()
        except MetricUnavailable as exc:
            return None, str(exc)
        gen = [self.store.load_array(self.store.embedding(method, it.id)) for it in self.config.items]
        ref = [self.store.load_array(self.store.embedding(REFERENCE, k)) for k, _ in _reference_images(self.config)]
        if any(e is None for e in gen + ref):
            return None, "some CMMD embeddings are missing; run the same command again to finish them"
        return cmmd.compute(np.stack(gen), np.stack(ref)), None

    def merge(self) -> EvalResult:
        """Collect every record into per_item.jsonl, then write the tables and grids."""
        cfg, root = self.config, self.store.root
        keys = [k for m in self._item_metrics() for k in m.keys]
        rows = []
        for method in cfg.methods:
            for it in cfg.items:
                rec = self.store.read_json(self.store.record(method.name, it.id))
                if rec is None:
                    raise InputError(f"no result for method '{method.name}' item '{it.id}'; run the same command again")
                row = {"method": method.name, "id": it.id, "prompt": it.prompt,
                       "output": str(self.store.output(method.name, it.id).relative_to(root))}
                row.update({k: rec["metrics"].get(k) for k in keys})
                reasons = {k: v for k, v in rec["unavailable_reason"].items() if k in keys}
                if reasons:
                    row["unavailable_reason"] = reasons
                rows.append(row)
        set_metrics = {}
        if self._cmmd() is not None:
            set_metrics["cmmd"] = {m.name: self._cmmd_value(m.name) for m in cfg.methods}
        result = EvalResult(per_item=root / "per_item.jsonl")
        atomic_write_jsonl(result.per_item, rows)
        result.summary = summarize(rows, [m.name for m in cfg.methods], keys, set_metrics)
        result.summary_csv, result.summary_md = write_tables(result.summary, root, cfg.title, self.metrics)
        result.grids = write_grids(cfg.items, [m.name for m in cfg.methods], self.store)
        return result

    def run(self) -> EvalResult:
        """Run this process's shard, wait for the others, merge on the main process."""
        self.run_shard()
        self.shard.barrier()
        result = self.merge() if self.shard.is_main else EvalResult()
        self.shard.barrier()
        return result


def run_evaluation(config: EvalConfig, **kwargs) -> EvalResult:
    """Convenience wrapper: ``Runner(config, **kwargs).run()``."""
    return Runner(config, **kwargs).run()
