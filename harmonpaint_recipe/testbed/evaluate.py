"""Table III on the testbed world, with the background kept in view and controls that must fail.

``run_testbed_eval(EvalSettings(out=...))``:

1. writes ``items`` held-out scenes (split ``eval``) to ``out/data`` (background image, mask,
   object-only prompt) and the reference renderings to ``out/references/<name>/<id>.png``:
   the flat and styled ground truths, and both passed through the model's VAE;
2. generates with every recipe method through attnctl's resumable evaluation runner (same
   items, same noise seed for every method): the Table III variants of ``harmonpaint``, the
   steer-step readings (normalized step, update restricted to the mask), the recipes shipped
   for the testbed demo, a MAKVS lambda sweep and the stock model told the style in words;
3. derives the paste-back rows and the matched-noise control from those outputs
   (:mod:`.derived`) and scores everything with the fidelity and harmony judges and the
   background error outside the mask;
4. scores the harmony judge's controls on the same scenes' ground truth (:mod:`.controls`);
5. writes ``table_iii.md`` / ``table_iii.json`` (means with 95% bootstrap CIs over items,
   paired differences from SDI), ``lambda.png`` and ``comparison.png``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from attnctl.errors import InputError
from harmonpaint_recipe.files import atomic_save_image, atomic_write_json, atomic_write_text, iter_jsonl_objects
from harmonpaint_recipe.testbed import report
from harmonpaint_recipe.testbed.derived import DETAIL_SIGMA
from harmonpaint_recipe.testbed.samples import write_samples

RECIPE = "harmonpaint"
TABLE_VARIANTS = ("none", "+sams", "+sams+steer", "full")
#: readings of the steer update (strategies.steer.*) applied to full HarmonPaint
STEP_READINGS = {
    "full-normalized": ("strategies.steer.step_rule=normalized", "strategies.steer.step_size=0.1"),
    "full-normalized-0.01": ("strategies.steer.step_rule=normalized", "strategies.steer.step_size=0.01"),
    "full-masked": ("strategies.steer.step_region=mask",),
    # the shipped recipe harmonpaint-masked-step
    "full-masked-0.01": ("strategies.steer.step_rule=normalized", "strategies.steer.step_size=0.01",
                         "strategies.steer.step_region=mask"),
}
#: derived rows: name -> (method whose outputs they derive from, kind)
DERIVED = {"none+paste": ("none", "paste"), "full+paste": ("full", "paste"),
           "full-masked-0.01+paste": ("full-masked-0.01", "paste"), "none+noise": ("none", "noise")}
LABELS = {
    "none": "SDI",
    "+sams": "+SAMS",
    "+sams+steer": "+SAMS+L_s",
    "full": "+SAMS+L_s+MAKVS (HarmonPaint)",
    "full-normalized": "HarmonPaint, normalized step (0.1 std)",
    "full-normalized-0.01": "HarmonPaint, normalized step (0.01 std)",
    "full-masked": "HarmonPaint, step restricted to the mask",
    "full-masked-0.01": "harmonpaint-masked-step (mask, 0.01 std)",
    "none+paste": "SDI + paste-back",
    "full+paste": "HarmonPaint + paste-back",
    "full-masked-0.01+paste": "harmonpaint-masked-step + paste-back",
    "none+noise": "control: SDI + noise matched to HarmonPaint's, in the mask",
    "none+style-words": "SDI, prompt + \"in <style> style\"",
    "truth-flat": "ground truth, flat object",
    "truth-styled": "ground truth, styled object",
    "truth-flat-vae": "ground truth, flat, through the VAE",
    "truth-styled-vae": "ground truth, styled, through the VAE",
}
REFERENCES = ("truth-flat", "truth-styled", "truth-flat-vae", "truth-styled-vae")
FULL_LAMBDA = 1.4
PASTE_BLUR = 2.0


@dataclass
class EvalSettings:
    """What ``attnctl testbed eval`` runs."""

    out: Path
    items: int = 100
    start: int = 0
    mask_kind: str = "box"
    seed: int = 0
    model: str = "testbed"
    lambdas: tuple[float, ...] = (0.8, 3.0)
    steps: int | None = None
    bootstrap: int = 2000
    grid_items: int = 8

    def check(self) -> None:
        if self.items < 2:
            raise InputError(f"--items must be at least 2 (confidence intervals need several items), got {self.items}")
        if self.bootstrap < 100:
            raise InputError(f"--bootstrap must be at least 100, got {self.bootstrap}")
        if self.steps is not None and self.steps < 1:
            raise InputError(f"--steps must be positive, got {self.steps}")
        for lam in self.lambdas:
            if not lam > 0:
                raise InputError(f"--lambdas: MAKVS lambda must be positive, got {lam}")
        if self.model != "testbed" and not (Path(self.model) / "model_index.json").is_file():
            raise InputError(f"--model '{self.model}' is not a pipeline folder (no model_index.json); "
                             "give 'testbed' or a folder written by `attnctl testbed train`")


def lambda_name(value: float) -> str:
    return f"full-lambda{value:g}"


def _model_dir(model: str) -> Path:
    from harmonpaint_recipe.testbed.models import WEIGHTS_DIR

    return WEIGHTS_DIR if model == "testbed" else Path(model).resolve()


def generation_methods(settings: EvalSettings) -> list:
    """The methods that generate: Table III variants, step readings, lambda sweep, style words."""
    from harmonpaint_recipe.evaluation.ablation import ablation_methods
    from harmonpaint_recipe.evaluation.methods import Method

    model = settings.model if settings.model == "testbed" else str(Path(settings.model).resolve())
    base = [f"model.pretrained={model}"] + ([f"sampler.steps={settings.steps}"] if settings.steps else [])
    variants = {m.name: m for m in ablation_methods(RECIPE, base)}
    full = variants["full"]
    methods = [variants[name] for name in TABLE_VARIANTS]
    methods += [Method(name=name, recipe=RECIPE, overrides=full.overrides + extra) for name, extra in STEP_READINGS.items()]
    for lam in settings.lambdas:
        if abs(lam - FULL_LAMBDA) > 1e-9:
            methods.append(Method(name=lambda_name(lam), recipe=RECIPE,
                                  overrides=full.overrides + (f"strategies.makvs.scale={lam:g}",), meta={"lambda": lam}))
    none = variants["none"]
    methods.append(Method(name="none+style-words", recipe=RECIPE, overrides=none.overrides, meta={"style_words": True}))
    return methods


def stored_methods(settings: EvalSettings) -> list:
    """Methods whose outputs are files made here: the references and the derived rows."""
    from harmonpaint_recipe.evaluation.methods import Method

    return ([Method(name=ref, outputs_dir=settings.out / "references" / ref) for ref in REFERENCES]
            + [Method(name=name, outputs_dir=settings.out / "derived" / name) for name in DERIVED])


def _write_references(settings: EvalSettings, records: list[dict]) -> None:
    """Ground-truth renderings (and their VAE round trips) as precomputed method outputs."""
    import torch

    from harmonpaint_recipe.testbed.data import to_tensor, to_uint8
    from harmonpaint_recipe.testbed.models import load_testbed_pipeline

    data_dir, refs = settings.out / "data", settings.out / "references"
    todo = [r for r in records if not (refs / "truth-styled-vae" / f"{r['id']}.png").is_file()]
    if not todo:
        return
    vae = load_testbed_pipeline(_model_dir(settings.model)).vae.eval()
    for kind in ("flat", "styled"):
        images = np.stack([np.asarray(Image.open(data_dir / r[f"truth_{kind}"]).convert("RGB")) for r in todo])
        with torch.no_grad():
            decoded = to_uint8(vae.decode(vae.encode(to_tensor(images)).latent_dist.mean).sample)
        for r, image, round_trip in zip(todo, images, decoded):
            atomic_save_image(refs / f"truth-{kind}" / f"{r['id']}.png", Image.fromarray(image))
            atomic_save_image(refs / f"truth-{kind}-vae" / f"{r['id']}.png", Image.fromarray(round_trip))


def _write_derived(settings: EvalSettings, records: list[dict]) -> dict[str, float]:
    """The paste-back rows and the matched-noise control; returns the noise sigmas' summary."""
    from harmonpaint_recipe.testbed.derived import write_matched_noise, write_paste_back

    outputs, data = settings.out / "outputs", settings.out / "data"
    noise = {}
    for name, (base, kind) in DERIVED.items():
        target = settings.out / "derived" / name
        if kind == "paste":
            write_paste_back(outputs, base, target, records, data, PASTE_BLUR)
        else:
            sigmas = write_matched_noise(outputs, base, "full", target, records, data, seed=settings.seed)
            noise = {"mean": float(np.mean(sigmas)), "median": float(np.median(sigmas)), "max": float(np.max(sigmas))}
    return noise


def _inpaint_factory(styled_prompts: dict[str, str]):
    from harmonpaint_recipe.evaluation.methods import default_inpaint_factory

    def factory(method):
        run = default_inpaint_factory(method)
        if not method.meta.get("style_words"):
            return run

        def with_style(image, mask, prompt, *, seed, item_id):
            return run(image, mask, styled_prompts[item_id], seed=seed, item_id=item_id)

        return with_style

    return factory


def _metrics(settings: EvalSettings) -> dict:
    from harmonpaint_recipe.testbed.judges import FidelityJudge, HarmonyJudge
    from harmonpaint_recipe.testbed.metrics import JUDGES_DIR, BackgroundMetric, FidelityMetric, HarmonyMetric

    judges = _model_dir(settings.model) / "judges"
    if not (judges / "fidelity.safetensors").is_file():
        judges = JUDGES_DIR
    return {"fidelity": FidelityMetric(FidelityJudge.load(judges / "fidelity.safetensors")),
            "harmony": HarmonyMetric(HarmonyJudge.load(judges / "harmony.safetensors")),
            "background": BackgroundMetric()}


def write_report(settings: EvalSettings, stats: dict[str, dict], rows: list[dict], records: list[dict],
                 lambda_methods: list[tuple[float, str]], controls: dict, noise: dict, seconds: float) -> Path:
    steps = settings.steps or 50
    labels = {**LABELS, **{name: f"λ = {lam:g}" + (" (recipe default)" if name == "full" else "")
                           for lam, name in lambda_methods}}

    def table(methods: list[str], delta: bool = True) -> list[str]:
        return report.method_table(stats, methods, LABELS, delta)

    lines = [
        "# Table III on the testbed world",
        "",
        f"{settings.items} held-out scenes (split `eval`, scenes {settings.start}..{settings.start + settings.items - 1}, "
        f"{settings.mask_kind} masks), prompt = the object alone (\"a red circle\"), model `{settings.model}`, "
        f"recipe `{RECIPE}` defaults (DDIM {steps} steps, CFG 7.5), noise seed {settings.seed} for every item and "
        f"method. Cells: mean [95% bootstrap CI over items, {settings.bootstrap} resamples]; Δ columns are paired "
        "differences from SDI on the same items and seeds. Fidelity: the judge sees the asked shape and colour in "
        "the mask. Harmony: 0 = the object continues the background's pattern (styled ground truth), 1 = a flat "
        "paste (flat ground truth); lower is more harmonious; judged with the output's masked region on the "
        "input's background (the picture the user keeps), and, in the next column, in the output's own picture. "
        "Background: mean absolute error (0-255 levels) and "
        "PSNR between the output and the input outside the mask.",
        "",
        "## Table III",
        "",
        *table(list(TABLE_VARIANTS) + ["none+noise"]),
        "",
        f"The control row adds Gaussian noise inside the mask to SDI's output, per scene as strong as the "
        f"detail energy (finer than a Gaussian of σ {DETAIL_SIGMA:g} px) HarmonPaint adds there over SDI (σ mean {noise.get('mean', 0):.1f}, median "
        f"{noise.get('median', 0):.1f}, max {noise.get('max', 0):.1f} levels).",
        "",
        "## Readings of the steer update, and paste-back",
        "",
        *table(["full", *STEP_READINGS, "none+paste", "full+paste", "full-masked-0.01+paste"]),
        "",
        "## MAKVS lambda sweep (SAMS + L_s + MAKVS)",
        "",
        *report.method_table(stats, [name for _, name in lambda_methods], labels, True),
        "",
        "## References",
        "",
        *table(["none+style-words", *REFERENCES], False),
        "",
        "## Controls of the harmony judge (ground truth of the same scenes)",
        "",
        f"AUC styled vs flat truth: {controls['auc_styled_vs_flat']:.3f}.",
        "",
        *report.controls_table(controls, _control_labels()),
        "",
        "## Harmony by background style",
        "",
        *report.by_style_table(rows, records, [*TABLE_VARIANTS, *STEP_READINGS, "none+noise", "none+style-words",
                                               "truth-flat-vae", "truth-styled-vae"], LABELS),
        "",
        f"Generation and scoring took {seconds / 60:.1f} min in this run (cached outputs are not regenerated).",
    ]
    path = settings.out / "table_iii.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    atomic_write_json(settings.out / "table_iii.json", {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(settings).items()},
        "stats": stats, "labels": {m: labels.get(m, m) for m in stats}, "controls": controls, "matched_noise": noise,
    })
    return path


def _control_labels() -> dict[str, str]:
    from harmonpaint_recipe.testbed.controls import CONTROL_LABELS

    return CONTROL_LABELS


def _grid_folders(settings: EvalSettings, names: list[str]) -> dict[str, Path]:
    def folder(name: str) -> Path:
        if name in REFERENCES:
            return settings.out / "references" / name
        if name in DERIVED:
            return settings.out / "derived" / name
        return settings.out / "outputs" / name
    return {name: folder(name) for name in names}


def run_testbed_eval(settings: EvalSettings) -> Path | None:
    """Run the evaluation (resumable) and write the report; returns ``table_iii.md`` (None on the
    other processes of a sharded run, which only generate)."""
    from harmonpaint_recipe.evaluation.items import load_items
    from harmonpaint_recipe.evaluation.runner import EvalConfig, Runner
    from harmonpaint_recipe.testbed.controls import control_scores

    settings.check()
    settings.out = Path(settings.out)
    started = time.perf_counter()
    records = write_samples(settings.out / "data", count=settings.items, start=settings.start, split="eval",
                            mask_kind=settings.mask_kind)
    _write_references(settings, records)
    metrics = _metrics(settings)
    items = load_items(settings.out / "data" / "items.jsonl")
    factory = _inpaint_factory({r["id"]: r["styled_prompt"] for r in records})
    generating = generation_methods(settings)

    def config(methods: list) -> EvalConfig:
        return EvalConfig(items=items, methods=methods, out=settings.out, metric_names=[], seed=settings.seed,
                          title="Table III on the testbed world")

    first = Runner(config(generating), metrics=metrics, inpaint_factory=factory)
    first.run_shard()
    first.shard.barrier()  # every shard's outputs exist before they are derived from
    noise = _write_derived(settings, records) if first.shard.is_main else {}
    first.shard.barrier()
    methods = generating + stored_methods(settings)
    Runner(config(methods), metrics=metrics, inpaint_factory=factory).run()
    if not first.shard.is_main:
        return None
    per_item = settings.out / "per_item.jsonl"
    rows = [row for _, _, row in iter_jsonl_objects(per_item, lambda n: f"{per_item}:{n}")]
    names = [m.name for m in methods]
    stats = report.summarize_rows(rows, names, [r["id"] for r in records], settings.bootstrap, seed=settings.seed)
    controls = control_scores(metrics["harmony"].judge, settings.items, settings.start, "eval", settings.mask_kind,
                              settings.seed).summary(settings.bootstrap, settings.seed)
    lambda_methods = sorted([(FULL_LAMBDA, "full")] + [(m.meta["lambda"], m.name) for m in methods if "lambda" in m.meta])
    path = write_report(settings, stats, rows, records, lambda_methods, controls, noise, time.perf_counter() - started)
    report.lambda_plot(stats, lambda_methods, LABELS, settings.out / "lambda.png")
    columns = ["truth-styled", *TABLE_VARIANTS, "full-masked-0.01", "none+style-words"]
    grid = report.comparison_grid(_grid_folders(settings, columns), settings.out / "data", records, columns, LABELS,
                                  settings.grid_items)
    atomic_save_image(settings.out / "comparison.png", grid)
    return path
